"""The seeds' design, for comparison: one Flask process holding the keys in a Python dict.

No replication, no journal, no forwarding: what a single unreplicated node of the seed projects
does, with kvs's REST API for keys (`PUT/GET/DELETE /kvs/keys/<key>`, same bodies and messages)
so the same load tool and requests measure both.

It is served by waitress with kvs's thread count (48) by default, so the comparison isolates
what replication and routing cost kvs rather than the choice of HTTP server; `--server werkzeug`
runs Flask's own threaded development server, which is what the seeds ran (`app.run`).

Usage: python benchmarks/flask_dict_server.py --port 18080 [--server waitress|werkzeug]
"""

from __future__ import annotations

import argparse
import threading

from flask import Flask, jsonify, request

MAX_KEY_LENGTH = 50
WAITRESS_THREADS = 48          # as kvs serve (kvs/server.py HTTP_THREADS)


def create_app() -> Flask:
    app = Flask(__name__)
    store: dict[str, str] = {}
    lock = threading.Lock()     # the dict is shared by every request thread

    @app.put("/kvs/keys/<key>")
    def put(key: str):
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or "value" not in body:
            return jsonify(error="Value is missing", message="Error in PUT"), 400
        if len(key) > MAX_KEY_LENGTH:
            return jsonify(error="Key is too long", message="Error in PUT"), 400
        with lock:
            replaced = key in store
            store[key] = body["value"]
        if replaced:
            return jsonify(message="Updated successfully", replaced=True), 200
        return jsonify(message="Added successfully", replaced=False), 201

    @app.get("/kvs/keys/<key>")
    def get(key: str):
        with lock:
            value = store.get(key)
        if value is None:
            return jsonify(doesExist=False, error="Key does not exist", message="Error in GET"), 404
        return jsonify(doesExist=True, message="Retrieved successfully", value=value), 200

    @app.delete("/kvs/keys/<key>")
    def delete(key: str):
        with lock:
            existed = store.pop(key, None) is not None
        if not existed:
            return jsonify(doesExist=False, error="Key does not exist", message="Error in DELETE"), 404
        return jsonify(doesExist=True, message="Deleted successfully"), 200

    @app.get("/kvs/key-count")
    def key_count():
        with lock:
            count = len(store)
        return jsonify({"message": "Key count retrieved successfully", "key-count": count}), 200

    @app.get("/health")
    def health():
        return jsonify(status="ok"), 200

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--server", choices=("waitress", "werkzeug"), default="waitress")
    args = parser.parse_args()
    app = create_app()
    if args.server == "waitress":
        import waitress
        waitress.serve(app, host=args.host, port=args.port, threads=WAITRESS_THREADS,
                       connection_limit=1000, ident="flask-dict")
    else:
        app.run(host=args.host, port=args.port, threaded=True)


if __name__ == "__main__":
    main()

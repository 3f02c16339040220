"""The floor of one Raft hop in Python on this machine: two bare processes, no kvs, no PySyncObj.

A kvs write at 1 client crosses processes four times (six through a follower) and threads twice
more; `latency_trace.py --hops` splits each crossing into the sender's send, the receiver's wake-up
and its decoding. This measures what the same crossing costs with nothing else in it: a process
sends a 470-byte frame (an AppendEntries' size) over loopback TCP to a peer blocked in `poll`, as
a tick thread is; the peer answers 100 bytes (an acknowledgement's); repeated `--count` times.

  idle:  a pause of `--gap-ms` between exchanges, as at 1 client: each exchange starts with the peer
         asleep and both processes' caches cooled by the others on the machine.
  busy:  no pause: the peer has only just gone back to `poll`.

Reported per mode: p50 and p90 of the send call (the kernel delivers on loopback inside it, and
wakes the peer), and of the round trip. A report, never a test.
Usage: python benchmarks/hop_floor.py [--count 3000] [--gap-ms 1.0] [--out results/hop_floor.json]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import sys
import time

FRAME, ANSWER = 470, 100


def _peer(port: int) -> None:
    conn = socket.create_connection(("127.0.0.1", port))
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    poll = select.poll()
    poll.register(conn, select.POLLIN)
    while True:
        poll.poll(5000)
        data = conn.recv(65536)
        if not data:
            os._exit(0)
        conn.sendall(b"a" * ANSWER)


def _percentiles(values: list[int]) -> dict:
    values = sorted(values)
    return {"p50_us": round(values[len(values) // 2] / 1000, 1),
            "p90_us": round(values[len(values) * 9 // 10] / 1000, 1)}


def measure(count: int, gap_s: float) -> dict:
    """{"send": ..., "round_trip": ...} over `count` exchanges `gap_s` apart."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    pid = os.fork()
    if pid == 0:
        listener.close()
        _peer(port)
    conn, _ = listener.accept()
    listener.close()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    poll = select.poll()
    poll.register(conn, select.POLLIN)
    frame, sends, trips = b"f" * FRAME, [], []
    try:
        for _ in range(count):
            started = time.perf_counter_ns()
            conn.sendall(frame)
            sent = time.perf_counter_ns()
            got = 0
            while got < ANSWER:
                if not poll.poll(5000):
                    raise RuntimeError("the peer did not answer within 5 s")
                got += len(conn.recv(65536))
            trips.append(time.perf_counter_ns() - started)
            sends.append(sent - started)
            if gap_s:
                time.sleep(gap_s)
    finally:
        conn.close()
        os.waitpid(pid, 0)
    return {"send": _percentiles(sends), "round_trip": _percentiles(trips)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--gap-ms", type=float, default=1.0)
    parser.add_argument("--out", help="also write the result, with the machine and the command, here")
    args = parser.parse_args(argv)
    result = {"idle": measure(args.count, args.gap_ms / 1000), "busy": measure(args.count, 0.0),
              "load_average": os.getloadavg()[0]}
    print(json.dumps(result, indent=2))
    if args.out:
        import harness
        with open(args.out, "w") as f:
            json.dump({"timestamp": harness.now_utc(), "command": " ".join(["python"] + sys.argv),
                       "machine": harness.machine(), **result}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `kvs` command's conventions (issue 14), on real processes: errors on stderr, distinct exit codes,
-o json|value|table, --endpoints tried in order, the missing commands, `local up` / `local down`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from kvs.cli.output import BAD_REQUEST, CONFLICT, NOT_FOUND, UNREACHABLE
from kvs.testing.cluster import find_free_base_port, wait_until

pytestmark = pytest.mark.cluster


def kvs(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvs", *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


def test_answers_go_to_stdout_errors_to_stderr_with_distinct_exit_codes(cluster):
    node = f"--endpoints={cluster.view[2]}"
    done = kvs("put", "cli-k", "v1", node)
    assert done.returncode == 0 and json.loads(done.stdout)["version"] > 0 and done.stderr == ""
    missing = kvs("get", "cli-missing", node)
    assert missing.returncode == NOT_FOUND and missing.stdout == "" and "does not exist" in missing.stderr
    version = json.loads(kvs("get", "cli-k", node).stdout)["version"]
    stale = kvs("put", "cli-k", "v2", "--if-match", str(version + 100), node)
    assert stale.returncode == CONFLICT and "Precondition failed" in stale.stderr
    too_long = kvs("put", "x" * 60, "v", node)
    assert too_long.returncode == BAD_REQUEST and "too long" in too_long.stderr
    dead = kvs("get", "cli-k", "--endpoints", "127.0.0.1:1,127.0.0.1:2", "--timeout", "2")
    assert dead.returncode == UNREACHABLE and "no endpoint answered" in dead.stderr


def test_output_formats_and_endpoints_tried_in_order(cluster):
    first_dead = f"127.0.0.1:1,{cluster.view[0]}"
    assert kvs("put", "cli-fmt", "hello world", "--endpoints", first_dead).returncode == 0
    assert kvs("get", "cli-fmt", "-o", "value", "--endpoints", first_dead).stdout == "hello world\n"
    assert kvs("get", "cli-fmt", "-o", "value", env={"KVS_ENDPOINTS": first_dead}).stdout == "hello world\n"
    assert kvs("shards", "-o", "value", "--node", cluster.view[1]).stdout.split() == ["1", "2"]
    assert int(kvs("key-count", "-o", "value", "--shard-id", "1", "--node", cluster.view[1]).stdout) >= 0
    table = kvs("get-many", "cli-fmt", "cli-none", "-o", "table", "--node", cluster.view[3]).stdout
    assert "hello world" in table and "Key does not exist" in table
    assert json.loads(kvs("get", "cli-fmt", "--node", cluster.view[3]).stdout)["value"] == "hello world"
    status = json.loads(kvs("view-change", "status", "--node", cluster.view[4]).stdout)
    assert status["phase"] is None and status["epoch"] >= 1
    assert kvs("--version").stdout.startswith("kvs ")


def test_local_up_reports_a_port_in_use_at_once_and_local_down_stops_what_up_started(tmp_path):
    base = find_free_base_port(3)
    with socket.socket() as held:
        held.bind(("127.0.0.1", base))
        held.listen()
        busy = kvs("local", "up", "--shards", "1", "--replicas", "1", "--base-port", str(base), timeout=30)
    assert busy.returncode == 1 and f"port {base} on 127.0.0.1 is not free" in busy.stderr and busy.stdout == ""
    data = tmp_path / "local"
    up = subprocess.Popen([sys.executable, "-m", "kvs", "local", "up", "--shards", "1", "--replicas", "1",
                           "--base-port", str(base), "--data-dir", str(data)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: (data / "kvs-local.json").exists() and kvs("get", "x", "--node",
                                                                       f"127.0.0.1:{base}").returncode == NOT_FOUND,
                   60, message="the local cluster serves")
        down = kvs("local", "down", "--data-dir", str(data))
        assert down.returncode == 0, down.stderr
        assert up.wait(timeout=60) == 0
        out = up.stdout.read()
        assert str(data) in out and "kvs local down" in out
    finally:
        if up.poll() is None:
            up.kill()
            up.wait(10)

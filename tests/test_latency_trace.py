"""The latency tracer of the benchmarks: its hooks still exist in kvs, and its timelines pick the right events.

Nothing is timed here: the timelines are built from made-up events, and the hooks are checked by
loading the tracer into a fresh interpreter."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import latency_trace  # noqa: E402
import report  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("hops", ["", "1"])
def test_every_hook_of_the_tracer_is_found_in_kvs(tmp_path, hops):
    # A renamed kvs or PySyncObj method would leave the tool's steps empty, reported only at the end of a
    # benchmark run; this finds it in the suite instead.
    (tmp_path / "tracer").mkdir()
    (tmp_path / "tracer" / "sitecustomize.py").write_text(latency_trace.TRACER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "tracer"), REPO_ROOT]),
               KVS_TRACE_DIR=str(tmp_path), ADDRESS="127.0.0.1:1", KVS_TRACE_HOPS=hops)
    # --hops wraps a poller's poll object: make one, as a replica's tick thread does
    code = "import kvs.raft.replica; from pysyncobj.poller import PollPoller; PollPoller().poll(0)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Error in sitecustomize" not in done.stderr, done.stderr
    trace = (tmp_path / "127.0.0.1_1").read_text()       # written at exit: the tracer was active
    assert "missing:" not in trace, trace


def event(t: int, who: str, label: str) -> tuple[int, str, str]:
    return (t * 1000, who, label)       # microseconds -> nanoseconds


def test_a_write_is_timed_through_the_follower_that_acknowledged_it_first():
    events = [event(0, "L", "http_in"), event(10, "L", "propose"), event(20, "L", "append"),
              event(25, "L", "send:append_entries"),
              # follower B acknowledges the previous write's commit first: it appends nothing, so it is no chain
              event(26, "B", "recv:append_entries"), event(27, "B", "send:next_node_idx"),
              event(30, "A", "recv:append_entries"), event(32, "A", "append"), event(40, "A", "fsynced"),
              event(41, "A", "send:next_node_idx"),
              event(35, "B", "recv:append_entries"), event(36, "B", "append"), event(60, "B", "fsynced"),
              event(61, "B", "send:next_node_idx"),
              event(28, "L", "recv:next_node_idx"),       # B's acknowledgement of the commit: before A's
              event(45, "L", "recv:next_node_idx"), event(50, "L", "callback"), event(55, "L", "loop_resumed"),
              event(70, "L", "recv:next_node_idx"), event(80, "L", "http_out"),
              event(90, "L", "http_in"), event(95, "L", "http_out")]    # a read: no proposal, no timeline
    [line] = latency_trace.writes(events)
    steps = [step for step, _, _ in latency_trace.STEPS]
    assert [line[s] // 1000 for s in steps] == [10, 10, 5, 5, 2, 8, 1, 4, 5, 5, 25]
    assert line["total (request parsed -> response written)"] == 80_000


def test_a_write_through_a_follower_is_timed_from_its_forward_to_its_result():
    events = [event(0, "E", "http_in"), event(5, "E", "forward"), event(9, "E", "send:kvs_forward"),
              event(12, "L", "recv:kvs_forward"), event(14, "L", "append"), event(15, "L", "send:append_entries"),
              # the entry follower E appends too; F acknowledges first, so the chain is F's
              event(17, "E", "recv:append_entries"), event(18, "E", "append"), event(30, "E", "fsynced"),
              event(31, "E", "send:next_node_idx"),
              event(16, "F", "recv:append_entries"), event(17, "F", "append"), event(25, "F", "fsynced"),
              event(26, "F", "send:next_node_idx"),
              event(28, "L", "recv:next_node_idx"), event(32, "L", "send:kvs_forward_result"),
              event(33, "L", "recv:next_node_idx"),
              event(36, "E", "recv:kvs_forward_result"), event(37, "E", "forward_resumed"), event(40, "E", "http_out"),
              event(50, "L", "http_in"), event(52, "L", "http_out")]        # the leader's own request: not a span
    [line] = latency_trace.writes(events, via="follower")
    steps = [step for step, _, _ in latency_trace.FOLLOWER_STEPS]
    assert [line[s] // 1000 for s in steps] == [5, 4, 3, 2, 1, 1, 1, 8, 1, 2, 4, 4, 1, 3]
    assert line[latency_trace.TOTAL] == 40_000


def test_hops_split_each_raft_message_into_send_wake_and_decode():
    events = [event(0, "L", "http_in"), event(10, "L", "propose"), event(20, "L", "append"),
              event(25, "L", "send:append_entries"), event(27, "L", "sent"),
              event(31, "A", "polled"), event(33, "A", "decode"), event(35, "A", "recv:append_entries"),
              event(36, "A", "append"), event(40, "A", "fsynced"), event(41, "A", "send:next_node_idx"),
              event(42, "A", "sent"),
              event(38, "L", "polled"),                   # the leader woke for something else before the ack
              event(46, "L", "polled"), event(47, "L", "decode"), event(48, "L", "recv:next_node_idx"),
              event(50, "L", "callback"), event(55, "L", "loop_resumed"), event(60, "L", "http_out")]
    [line] = latency_trace.writes(events, hops=True)
    assert line["leader: -> append_entries handed to the kernel"] == 2_000
    assert line["follower: -> woke for append_entries (poll returned)"] == 4_000
    assert line["follower: -> append_entries frame read, decoding"] == 2_000
    assert line["follower: -> AppendEntries received"] == 2_000
    assert line["follower: -> next_node_idx handed to the kernel"] == 1_000
    assert line["leader: -> woke for next_node_idx (poll returned)"] == 4_000
    assert line["leader: -> acknowledgement received"] == 1_000
    assert sum(v for k, v in line.items() if k != latency_trace.TOTAL) == line[latency_trace.TOTAL] == 60_000


def test_the_report_shows_each_step_and_etcds_p50():
    cpu = {"machine_busy_pct": 50.0, "server_cores": 0.5, "load_cores": 0.1, "irq_cores": 0.0,
           "steal_cores": 0.0, "other_cores": 0.0}
    payload = {"latency": {"kvs": {"fsync": "on", "writes_traced": 3, "missing_hooks": [],
                                   "hey": {"p50_ms": 1.5, "p99_ms": 3.0, "cpu": cpu},
                                   "steps": {"leader: request parsed -> batch proposed": {"p50_us": 80, "p90_us": 120}}},
                           "etcd": {"p50_ms": 1.1, "p99_ms": 2.0}}}
    text = "\n".join(report.latency_table(payload))
    assert "| leader: request parsed -> batch proposed | 80 | 120 |" in text
    assert "kvs traced 1.5 ms (3.0), etcd 1.1 ms (2.0)" in text
    assert "via a follower" not in text                 # a run that traced the leader only

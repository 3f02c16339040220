"""The coordinator of a view change is SIGKILLed: another node rolls the change back or finishes it."""

from __future__ import annotations

import threading

import pytest
import requests

from kvs.client import KvsClient
from kvs.testing.cluster import wait_until

from .test_view_change import change_view, grown

pytestmark = pytest.mark.cluster

KEYS = 1500


def phase(node: str) -> dict:
    return requests.get(f"http://{node}/kvs/view-change", timeout=5).json()


def load_and_start_change(cluster, extra, keys: int, prefix: str,
                          when: tuple[str, ...]) -> tuple[threading.Thread, dict]:
    """Load keys, start growing the view from cluster.view[0] in a thread, return once a phase in `when` shows."""
    client = KvsClient(cluster.view[3])
    for i in range(keys):
        assert client.put(f"{prefix}-{i}", f"v{i}")[0] == 201
    result: dict = {}

    def change() -> None:
        try:
            result["answer"] = change_view(cluster.view[0], cluster.view + extra)
        except requests.RequestException:
            pass                                    # its coordinator died: no answer

    changer = threading.Thread(target=change, daemon=True)
    changer.start()
    wait_until(lambda: phase(cluster.view[4])["phase"] in when, 60, interval=0.002, message=f"phase in {when}")
    return changer, result


def start_change_and_kill_coordinator(cluster, extra, when: tuple[str, ...]) -> str:
    load_and_start_change(cluster, extra, KEYS, "crash", when)
    cluster.kill(cluster.view[0])
    return cluster.view[0]


def assert_every_key_readable(node: str) -> None:
    reader = KvsClient(node)
    missing = [i for i in range(KEYS) if reader.get(f"crash-{i}")[1].get("value") != f"v{i}"]
    assert not missing, f"{len(missing)} keys lost, e.g. {missing[:5]}"


def shard_counts(node: str) -> dict[str, int]:
    client = KvsClient(node)
    return {sid: client.shard(sid)[1]["key-count"] for sid in client.shards()[1]["shards"]}


@pytest.mark.parametrize("when", ["prepared", "copying", "frozen", "committed"])
def test_a_killed_coordinator_s_change_is_rolled_back_or_finished_by_another_node(make_cluster, when):
    """SIGKILL the coordinator once the metadata group records `when`: before commit the change rolls
    back, after it another node finishes the clean-up. Phases are short, so the kill may land a step
    later than the one seen; what must hold is decided by whether the commit happened."""
    cluster = make_cluster(2, 3)
    extra = grown(cluster, 3)
    coordinator = start_change_and_kill_coordinator(cluster, extra, (when,))
    observer = cluster.view[4]
    wait_until(lambda: phase(observer)["phase"] is None, 90, interval=0.2, message="the change ended")
    epoch = phase(observer)["epoch"]
    if when != "committed":
        assert epoch in (1, 2)                  # the kill may land after a fast commit
    else:
        assert epoch == 2
    assert_every_key_readable(cluster.view[5])
    counts = shard_counts(cluster.view[5])
    assert len(counts) == (3 if epoch == 2 else 2)
    assert sum(counts.values()) == KEYS         # no copy left behind, nothing dropped twice
    if epoch == 1:
        # rolled back: the same change can be made again, with the coordinator back
        cluster.start_node(coordinator)
        cluster.wait_healthy([coordinator], timeout=60)
        status, body = change_view(cluster.view[1], cluster.view + extra)
        assert status == 200, body
        assert_every_key_readable(extra[0])
        assert sum(s["key-count"] for s in body["shards"]) == KEYS


def test_a_change_completes_when_a_source_replica_dies_during_the_copy(make_cluster):
    cluster = make_cluster(2, 3)
    extra = grown(cluster, 3)
    changer, result = load_and_start_change(cluster, extra, KEYS, "crash", ("prepared", "copying", "frozen"))
    cluster.kill(cluster.view[1])                   # a replica of source shard 1, not the coordinator
    changer.join(120)
    status, body = result["answer"]
    assert status == 200, body
    assert_every_key_readable(extra[2])
    assert sum(s["key-count"] for s in body["shards"]) == KEYS


def test_a_new_node_that_was_down_at_commit_catches_up_when_it_returns(make_cluster):
    cluster = make_cluster(2, 3)
    extra = grown(cluster, 3)
    changer, result = load_and_start_change(cluster, extra, 300, "late", ("copying", "frozen", "caught-up"))
    late = extra[2]                                 # a replica of the new shard; the other two keep it going
    cluster.kill(late)
    changer.join(120)
    assert result["answer"][0] == 200, result["answer"]
    cluster.start_node(late)                        # it missed the commit: it must catch up by itself
    wait_until(lambda: requests.get(f"http://{late}/kvs/status", timeout=2).json()["epoch"] == 2, 30,
               interval=0.2, message="the returning node knows epoch 2")
    reader = KvsClient(late)
    assert all(reader.get(f"late-{i}")[1].get("value") == f"v{i}" for i in range(300))

    # it was down when the metadata leader added it: it is told again and joins the metadata group
    def meta_of(node: str) -> dict:
        return requests.get(f"http://{node}/kvs/status", timeout=2).json()["groups"].get("meta") or {}

    wait_until(lambda: meta_of(late).get("leader") and len(meta_of(late)["members"]) == 9, 60,
               interval=0.2, message="the returning node is a metadata member")
    # a node that joined the metadata group later restarts with the members it saw, not its VIEW
    cluster.kill(extra[0])
    cluster.start_node(extra[0])
    cluster.wait_healthy([extra[0]], timeout=60)
    assert len(meta_of(extra[0])["members"]) == 9

"""TakeoverWatcher: who takes a stalled view change over, and when (fakes, no processes)."""

import threading
import time
from types import SimpleNamespace

import pytest

from kvs.reconfig import takeover
from kvs.reconfig.takeover import TakeoverWatcher

CHANGE = {"number": 2, "coordinator": "c:1", "steps": 3, "phase": "prepared"}


class FakeCoordinator:
    busy = False

    def __init__(self):
        self.taken: list[dict] = []

    def take_over(self, change):
        self.taken.append(change)


def watcher(*, me="m:1", leader=True, reachable=(False,), change=CHANGE):
    answers = iter(reachable)
    node = SimpleNamespace(has_metadata_replica=True, change=lambda: change,
                           metadata_group=SimpleNamespace(is_leader=lambda: leader),
                           settings=SimpleNamespace(address=me))
    remote = SimpleNamespace(reachable=lambda address: next(answers))
    coordinator = FakeCoordinator()
    return TakeoverWatcher(node, coordinator, remote), coordinator


@pytest.fixture(autouse=True)
def no_stall_wait(monkeypatch):
    monkeypatch.setattr(takeover, "TAKEOVER_SECONDS", 0.0)


def checks(w: TakeoverWatcher, rounds: int) -> None:
    for _ in range(rounds):
        w.check()


def test_the_metadata_leader_takes_over_after_the_coordinator_failed_two_probes_in_a_row():
    w, coordinator = watcher(reachable=(False, False))
    checks(w, 2)                    # the first check only notes the change, the second sees one miss
    assert coordinator.taken == []
    w.check()
    assert coordinator.taken == [CHANGE]


def test_a_coordinator_that_answers_in_between_is_not_taken_over():
    w, coordinator = watcher(reachable=(False, True, False))
    checks(w, 4)
    assert coordinator.taken == []


def test_a_member_that_is_not_the_leader_never_judges_another_coordinator_gone():
    w, coordinator = watcher(leader=False, reachable=())
    checks(w, 5)
    assert coordinator.taken == []


def test_a_restarted_coordinator_takes_its_own_change_over_leader_or_not():
    w, coordinator = watcher(me="c:1", leader=False, reachable=())
    checks(w, 2)
    assert coordinator.taken == [CHANGE]


def test_the_watcher_goes_on_after_a_check_that_raises(monkeypatch):
    monkeypatch.setattr(takeover, "WATCH_PERIOD", 0.01)
    w, coordinator = watcher(reachable=(False,) * 1000)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise TypeError("the change ended between two reads")
        return CHANGE
    w._node.change = flaky
    stopping = threading.Event()
    thread = threading.Thread(target=w.run, args=(stopping,))
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not coordinator.taken and time.monotonic() < deadline:
            stopping.wait(0.01)
        assert coordinator.taken == [CHANGE] and thread.is_alive()
    finally:
        stopping.set()
        thread.join(10)

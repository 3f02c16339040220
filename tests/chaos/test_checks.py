"""The chaos run's own logic, without a cluster: schedules, epochs over time, what excuses a failure."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest

from kvs.testing.linearizability import FAIL, OK, Operation
from kvs.config.epoch import ConfigEpoch
from kvs.reconfig.planner import plan_view_change

from .availability import AvailabilityCheck
from .driver import ClusterDriver, gathered_answers
from .epochs import SETTLE_GRACE, EpochTimeline, Transition
from .faults import FaultEvent, FaultLog
from .replacement import victims
from .runner import pick_keys
from .view_changes import MODES, dead_replica_replaced, grown_view, make_view_change_schedule

INITIAL_VIEW = tuple(f"10.0.0.{i}:13800" for i in range(2, 8))
SPARES = tuple(f"10.0.0.{i}:13800" for i in range(8, 12))
INITIAL = ConfigEpoch.initial(INITIAL_VIEW, 3)
GROWN = plan_view_change(INITIAL, grown_view(list(INITIAL_VIEW), list(SPARES), 3), 3).epoch


def test_the_view_change_schedule_is_a_pure_function_of_its_inputs():
    assert make_view_change_schedule(7, 40, 6, MODES) == make_view_change_schedule(7, 40, 6, MODES)
    assert [s.mode for s in make_view_change_schedule(7, 40, 6, MODES)] == list(MODES)
    assert {s.kill_at for seed in range(1, 30) for s in make_view_change_schedule(seed, 40, 6, MODES)} \
        == {None, "prepared", "copying", "frozen", "committed"}
    for seed in range(1, 30):
        steps = make_view_change_schedule(seed, 40, 6, MODES)
        assert [s.at for s in steps] == sorted(s.at for s in steps)
        assert all(8 <= s.at <= 40 * 0.7 and 0 <= s.coordinator < 6 for s in steps)
        assert all((s.kill_at is not None) == (s.mode == "kill_coordinator") for s in steps)
    assert len({s.victim for seed in range(1, 30) for s in make_view_change_schedule(seed, 40, 6, MODES)}) > 10
    assert make_view_change_schedule(1, 40, 6, ()) == []


def test_the_grown_view_adds_one_shard_of_spares_and_leaves_the_others_idle():
    assert GROWN.shards["3"] == SPARES[:3] and len(GROWN.shards) == 3
    assert grown_view(list(INITIAL_VIEW), list(SPARES), 3, {SPARES[1]}) == \
        list(INITIAL_VIEW) + [SPARES[0], SPARES[2], SPARES[3]]           # a replaced spare stays out


def test_a_replacement_kills_a_replica_that_no_client_or_coordinator_uses():
    members = list(INITIAL_VIEW)
    assert victims(members, INITIAL) == []                                # the grown view gives it some
    assert victims(members, GROWN) == [(node, "3") for node in SPARES[:3]]


def test_a_replacement_counts_once_its_removal_and_its_addition_committed():
    def change(request: str, outcome: str, mode: str = "replace_dead_replica") -> dict:
        return {"mode": mode, "request": request, "outcome": outcome}

    assert dead_replica_replaced([change("view-change", "committed", "change"), change("remove-member", "committed"),
                                  change("add-member", "committed")])
    assert not dead_replica_replaced([change("remove-member", "committed"), change("add-member", "rolled back")])
    assert not dead_replica_replaced([change("remove-member", "rolled back")])


class RecordingDriver:
    """The fault actions of a ClusterDriver, recorded instead of done."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []

    def __getattr__(self, action: str):
        if action not in ("kill", "start_node", "pause", "resume", "isolate", "heal"):
            raise AttributeError(action)
        return lambda node: self.calls.append((action, node))

    def wait_healthy(self, nodes: list[str], timeout: float) -> None:
        pass


def test_a_retired_node_stays_down_and_held_at_the_end_of_the_run():
    driver = RecordingDriver()
    faults = FaultLog(driver)
    replaced = faults.inject("kill_to_replace", "3", [SPARES[0]], leader=False)
    other = faults.inject("kill_follower", "1", [INITIAL_VIEW[0]], leader=False)
    faults.retire(replaced)
    faults.heal_everything()
    assert driver.calls == [("kill", SPARES[0]), ("kill", INITIAL_VIEW[0]), ("start_node", INITIAL_VIEW[0])]
    assert replaced.healed is None and other.healed is not None
    assert faults.retired_nodes() == {SPARES[0]} and faults.under_fault(SPARES[0])


def test_keys_are_picked_so_that_some_move_when_the_view_grows_and_the_others_do_not():
    keys = pick_keys(INITIAL, GROWN, 6)
    assert len(keys) == 12 and len(set(keys)) == 12
    moving = [k for k in keys if INITIAL.shard_for_key(k) != GROWN.shard_for_key(k)]
    assert len(moving) == 4 and all(GROWN.shard_for_key(k) == "3" for k in moving)
    assert pick_keys(INITIAL, None, 6)[:6] == [k for k in (f"chaos-{i}" for i in range(200))
                                              if INITIAL.shard_for_key(k) == "1"][:6]


def grow_between(started: float, settled: float, committed: bool = True) -> EpochTimeline:
    timeline = EpochTimeline(INITIAL)
    timeline.add(Transition(started, settled, INITIAL, GROWN, GROWN if committed else INITIAL))
    return timeline


def failed(key: str, call: float, ret: float, via: str = INITIAL_VIEW[0]) -> tuple[Operation, str]:
    return Operation("c0", "put", key, "v", call, ret, FAIL), via


def test_epochs_follow_the_changes():
    timeline = grow_between(10.0, 20.0)
    assert timeline.epochs_during(0, 5) == [INITIAL]
    assert timeline.epochs_during(12, 13) == [INITIAL, GROWN]
    assert timeline.epochs_during(30, 31) == [GROWN]
    assert grow_between(10.0, 20.0, committed=False).epochs_during(30, 31) == [INITIAL]
    assert timeline.epochs_during(19 + SETTLE_GRACE, 30)[0] == INITIAL        # just settled: either


def test_a_change_excuses_failures_of_moving_keys_only():
    keys = pick_keys(INITIAL, GROWN, 6)
    moving = next(k for k in keys if INITIAL.shard_for_key(k) != GROWN.shard_for_key(k))
    staying = next(k for k in keys if INITIAL.shard_for_key(k) == GROWN.shard_for_key(k))
    for committed in (True, False):             # a rolled-back change froze the same keys
        check = AvailabilityCheck([], grow_between(10.0, 20.0, committed), 0.0, 100.0)
        violations, windows = check.run([failed(moving, 12, 13), failed(staying, 12, 13)])
        assert len(violations) == 1 and staying in violations[0], violations
        assert windows["moving keys"] == [(12, 13)]
    check = AvailabilityCheck([], grow_between(10.0, 20.0), 0.0, 100.0)
    assert len(check.run([failed(moving, 40, 41)])[0]) == 1                   # long after the change


def test_faults_excuse_by_the_group_of_the_epoch_of_the_moment():
    key = next(k for k in pick_keys(INITIAL, GROWN, 6) if GROWN.shard_for_key(k) == "3")
    spares_killed = FaultEvent("kill_group", "3", list(SPARES), injected=30.0, healed=35.0)
    check = AvailabilityCheck([spares_killed], grow_between(10.0, 20.0), 0.0, 100.0)
    assert check.run([failed(key, 31, 32)])[0] == []                          # shard 3 had no majority
    rolled_back = AvailabilityCheck([spares_killed], grow_between(10.0, 20.0, committed=False), 0.0, 100.0)
    assert len(rolled_back.run([failed(key, 31, 32)])[0]) == 1                 # its group was shard 1 or 2


def test_two_faults_on_one_group_take_its_majority():
    shard_1 = list(INITIAL.replicas("1"))
    key = next(k for k in pick_keys(INITIAL, None, 6) if INITIAL.shard_for_key(k) == "1")
    coordinator = FaultEvent("kill_coordinator", "1", [shard_1[0]], injected=10.0, healed=30.0)
    follower = FaultEvent("pause_follower", "1", [shard_1[1]], injected=15.0, healed=18.0)
    through = INITIAL_VIEW[3]
    check = AvailabilityCheck([coordinator, follower], EpochTimeline(INITIAL), 0.0, 100.0)
    assert check.run([failed(key, 16, 17, through)])[0] == []                  # 2 of 3 down
    assert len(check.run([failed(key, 25, 26, through)])[0]) == 1            # 1 of 3 down: a follower fault
    ok = Operation("c0", "get", key, None, 16, 17, OK, None)
    assert check.run([(ok, through)])[0] == []


def test_soak_parts_of_one_commit_merge_into_one_summary_and_other_commits_are_refused(tmp_path):
    from .soak import _EMPTY_RUN, merge, summarize

    def part(seeds, commit, name):
        runs = [dict(_EMPTY_RUN, seed=s, **{"ops-ok": 10, "faults": ["kill"], "violation-count": 0}) for s in seeds]
        meta = {"commit": commit, "command": f"soak {name}", "started": name, "load-average-start": (0, 0, 0)}
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(summarize("process", 60.0, runs, meta)))
        return str(path)

    out = str(tmp_path / "all.json")
    assert merge([part([1, 2, 3], "abc", "a"), part([4, 5], "abc", "b")], out) == 0
    merged = json.loads(open(out).read())
    assert merged["runs"] == 5 and merged["operations"]["ok"] == 50 and merged["faults"] == {"kill": 5}
    assert [r["seed"] for r in merged["per-run"]] == [1, 2, 3, 4, 5] and len(merged["parts"]) == 2
    assert merge([part([1], "abc", "c"), part([2], "def", "d")], out) == 2          # another commit
    assert merge([part([1, 2], "abc", "e"), part([2, 3], "abc", "f")], out) == 2    # a seed twice


def test_members_that_gave_no_answer_are_asked_again_until_three_rounds_after_the_first_answer():
    # a: lagging; b: its first request lost, then the newest; c: dead (never answers)
    replies = {"a": iter([2, 2, 2]), "b": iter([None, 3, 3]), "c": iter([None] * 10)}
    asked: list[str] = []

    def ask(node, timeout):
        asked.append(node)
        return next(replies[node])
    assert sorted(gathered_answers(ask, ["a", "b", "c"], limit=10.0)) == [2, 3]
    assert asked == ["a", "b", "c", "b", "c", "c"]       # an answer is not asked for again; the dead node 3 times


def test_rounds_count_from_the_first_answer_and_nobody_answering_ends_at_the_limit():
    # Nobody answers for 3 rounds (a cluster restarting), then a lags and b's first answer is lost.
    replies = {"a": iter([None] * 3 + [2] * 5), "b": iter([None] * 4 + [3] * 5)}
    assert sorted(gathered_answers(lambda node, timeout: next(replies[node]), ["a", "b"], limit=10.0)) == [2, 3]
    asked: list[float] = []
    started = time.monotonic()
    assert gathered_answers(lambda node, timeout: asked.append(timeout), ["a"], limit=0.5) == []
    assert len(asked) >= 2 and 0.3 <= time.monotonic() - started < 2.0
    assert all(0.1 < t <= 0.5 for t in asked)             # none is given more than is left, none starts at the end


def test_a_driver_s_settled_epoch_and_planning_base_are_not_a_lagging_member_s_that_alone_answered_first():
    first = ConfigEpoch.initial(("a:1", "b:1"), 1)
    newer = replace(first, number=first.number + 1)
    Scripted = type("Scripted", (ClusterDriver,), {"nodes": lambda self: ["a:1", "b:1"]})
    Scripted.__abstractmethods__ = frozenset()          # only the epoch queries are used here
    scripted = Scripted()
    for settled in (scripted.settled_epoch, scripted.settled_planning_base):
        replies = {"a:1": iter([first] * 5), "b:1": iter([None, newer, newer])}    # b's first request is lost
        scripted.known_epochs = lambda node, timeout=2.0, replies=replies: _epochs(replies, node)
        assert settled(limit=10.0).number == newer.number


def _epochs(replies, node):
    epoch = next(replies[node])
    return {"active": epoch.to_dict()} if epoch is not None else None


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_soak_started_in_the_background_stops_through_its_clean_up_on_sigint_or_sigterm(signum):
    # As a shell starts a background job: SIGINT ignored, which Python then leaves ignored.
    child = subprocess.Popen(
        [sys.executable, "-c", "import time\nfrom tests.chaos.soak import interruptible\ninterruptible()\n"
         "try:\n    print('ready', flush=True)\n    time.sleep(60)\nfinally:\n    print('cleaned up', flush=True)\n"],
        stdout=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    try:
        assert select.select([child.stdout], [], [], 20)[0], "the child did not start"
        assert child.stdout.readline() == "ready\n"
        child.send_signal(signum)
        out, _ = child.communicate(timeout=20)
    finally:
        child.kill()
    assert out == "cleaned up\n" and child.returncode != 0

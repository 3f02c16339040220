"""Followers' write batches to their leader: the wire form, and group commit on the channel.

The channel runs on a real event loop against a scripted forwarder whose answers the test
releases, so the number of batches in flight and what each carries are observed directly.
"""

from __future__ import annotations

import asyncio

import pytest

from kvs.errors import Unavailable
from kvs.fsm.base import Invalid
from kvs.fsm.shard import Deleted, Mismatch, NotOwned, Written
from kvs.routing.keys import KeyRouter
from kvs.routing.peers import PeerResponse, PeerUnreachable
from kvs.routing.write_batches import (LeaderChannel, command_from_json, command_to_json, result_from_json,
                                       result_to_json)


@pytest.mark.parametrize("result", [Written(True, 3), Written(False, 1), Deleted(True), Mismatch(4), Mismatch(0),
                                    NotOwned(7), Invalid("no")])
def test_every_result_survives_its_wire_form(result):
    assert result_from_json(result_to_json(result)) == result


def test_an_unavailable_or_unknown_result_reads_as_not_taken():
    assert result_from_json({"unavailable": "deadline"}) is None
    assert result_from_json({"written": "yes"}) is None
    assert result_from_json(["written", True]) is None
    assert result_from_json({"written": [True, "3"]}) is None
    assert result_from_json({"mismatch": True}) is None


@pytest.mark.parametrize("row", [["put", "r", "k"], ["delete", "r"], ["get", "r", "k"], ["put", "r", "k", 5], "x",
                                 ["put", "r", "k", "v", "match"], ["delete", "r", "k", [["match"]]],
                                 ["put", "r", "k", "v", ["match", 1, 2]], ["put", "r", "k", "v", [], []], [], None])
def test_malformed_commands_are_refused(row):
    with pytest.raises(ValueError):
        command_from_json(row)


def test_commands_survive_their_wire_form():
    for command in (("put", "r1", "k", "v"), ("delete", "r2", "k"), ("put", "r3", "k", "v", ("match", 4)),
                    ("put", "r4", "k", "v", ("absent",)), ("delete", "r5", "k", ("exists",))):
        assert command_from_json(command_to_json(command)) == command


class ScriptedForwarder:
    def __init__(self, loop, fail: bool = False):
        self.loop, self.fail = loop, fail
        self.batches: list[list] = []
        self.answers: list[asyncio.Future] = []

    async def send(self, address, method, path, payload, request_id, deadline, body=None):
        import json
        commands = json.loads(body)["commands"]
        self.batches.append(commands)
        answer = self.loop.create_future()
        self.answers.append(answer)
        await answer
        if self.fail:
            raise PeerUnreachable("down")
        return PeerResponse(200, {"results": [{"written": [False, 1]} for _ in commands]}, None)


def test_writes_that_arrive_while_two_batches_are_in_flight_wait_and_share_the_next():
    async def scenario():
        loop = asyncio.get_running_loop()
        forwarder = ScriptedForwarder(loop)
        channel = LeaderChannel(forwarder, loop)
        channel.IN_FLIGHT = 2           # the rule with a cap of two (the class's own cap is larger)
        deadline = loop.time() + 60
        first = [loop.create_task(channel.write("l:1", "1", ("put", f"a{i}", "k", "v"), deadline)) for i in range(3)]
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        second = [loop.create_task(channel.write("l:1", "1", ("put", f"b{i}", "k", "v"), deadline)) for i in range(2)]
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        third = [loop.create_task(channel.write("l:1", "1", ("put", f"c{i}", "k", "v"), deadline)) for i in range(4)]
        for _ in range(5):
            await asyncio.sleep(0)
        assert [len(b) for b in forwarder.batches] == [3, 2]         # the third waits: two are in flight
        forwarder.answers[0].set_result(None)
        results = await asyncio.gather(*first)
        for _ in range(5):
            await asyncio.sleep(0)
        assert [len(b) for b in forwarder.batches] == [3, 2, 4]      # one answered: the waiting writes leave together
        for answer in forwarder.answers[1:]:
            answer.set_result(None)
        results += await asyncio.gather(*second, *third)
        assert results == [Written(False, 1)] * 9

    asyncio.run(scenario())


def test_a_leader_that_cannot_be_reached_hands_every_write_back():
    async def scenario():
        loop = asyncio.get_running_loop()
        forwarder = ScriptedForwarder(loop, fail=True)
        channel = LeaderChannel(forwarder, loop)
        writes = [loop.create_task(channel.write("l:1", "1", ("delete", f"r{i}", "k"), loop.time() + 60))
                  for i in range(3)]
        for _ in range(5):
            await asyncio.sleep(0)
        forwarder.answers[0].set_result(None)
        assert await asyncio.gather(*writes) == [None, None, None]

    asyncio.run(scenario())


class _Group:
    failure = None


class _Node:
    def group(self, shard_id):
        return _Group() if shard_id == "1" else None


class _Replica:
    """Fails the commands whose key is "down" with Unavailable, answers the others."""

    async def execute(self, command, deadline):
        if command[2] == "down":
            raise Unavailable("no commit before the deadline")
        return Written(False, 1)


@pytest.mark.parametrize("keys", [["down"], ["k"], ["k", "down", "k"]])
def test_the_leader_answers_each_write_of_a_batch_lone_or_not_with_its_result_or_its_error(keys):
    async def scenario():
        loop = asyncio.get_running_loop()
        router = KeyRouter(_Node(), None, loop)
        router._loop_group = lambda group: _Replica()
        return await router.write_batch("1", [("put", f"r{i}", k, "v") for i, k in enumerate(keys)],
                                        loop.time() + 60)

    outcomes = asyncio.run(scenario())
    assert [type(o) for o in outcomes] == [Unavailable if k == "down" else Written for k in keys]
    assert [result_from_json(result_to_json(o)) for o in outcomes] == \
        [None if k == "down" else Written(False, 1) for k in keys]      # "unavailable": the follower proposes it

"""The view-change benchmark's fixed-rate load (benchmarks/view_change.py): an open loop, whose writes
keep their schedule and count a stall for every write it delayed.

Against an HTTP server in this process that holds every request arriving in a 0.2 s window. Nothing
here is a speed target: the assertions are about what the load generator records."""

from __future__ import annotations

import asyncio
import os
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import view_change  # noqa: E402

RATE = 200.0
STALL_AT, STALL_SECONDS, RUN_SECONDS = 0.2, 0.2, 0.8


async def stalling_server(stall: list[float]) -> asyncio.AbstractServer:
    """Answers every PUT with 200 over keep-alive; a request read while stall[0] <= now < stall[1] is
    answered at stall[1]."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                now = time.monotonic()
                if stall[0] <= now < stall[1]:
                    await asyncio.sleep(stall[1] - now)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n{}")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
    return await asyncio.start_server(serve, "127.0.0.1", 0)


def run_against_a_stall(max_outstanding: int, stall_at: float = STALL_AT,
                        run_seconds: float = RUN_SECONDS) -> tuple[list, list[float], float]:
    out: list = []
    stall = [float("inf"), float("inf")]

    async def main() -> None:
        server = await stalling_server(stall)
        address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        started = time.monotonic()
        stall[:] = [started + stall_at, started + stall_at + STALL_SECONDS]
        asyncio.get_running_loop().call_later(run_seconds, stop.set)
        await view_change.fixed_rate(address, ["a", "b", "c"], RATE, max_outstanding, stop, out)
        server.close()
        await server.wait_closed()
    stop = view_change.Stop()
    asyncio.run(main())
    return out, stall, stop.at


@pytest.mark.parametrize("max_outstanding", [256, 2])
def test_writes_keep_their_schedule_and_a_stall_counts_for_every_write_it_delayed(max_outstanding):
    out, stall, stopped = run_against_a_stall(max_outstanding)
    assert out and all(status == 200 for _, _, status in out)
    dues = sorted(due for due, _, _ in out)
    # The schedule is the rate's, whatever the answers did: due times 1/RATE apart, none skipped.
    gaps = [b - a for a, b in zip(dues, dues[1:])]
    assert max(gaps) == pytest.approx(1 / RATE, abs=1e-6) and min(gaps) == pytest.approx(1 / RATE, abs=1e-6)
    assert stopped - 1 / RATE <= dues[-1] < stopped        # every write due before the stop was sent
    # A write due while the server held its requests waited at least until the stall ended, counted
    # from when it was due: also with 2 in flight, when the rest could not even be sent.
    during = [(due, latency) for due, latency, _ in out if stall[0] + 0.01 <= due < stall[1] - 0.01]
    assert len(during) >= 0.8 * (STALL_SECONDS - 0.02) * RATE
    assert all(latency >= stall[1] - due - 0.005 for due, latency in during)
    assert max(latency for _, latency, _ in out) >= STALL_SECONDS - 0.03


def test_a_stop_that_finds_writes_waiting_for_room_still_sends_every_write_due_before_it():
    # The stop comes in the middle of the stall, with both writes in flight held: the writes due
    # meanwhile wait for room, and leaving them out would drop the slowest writes of the run.
    out, stall, stopped = run_against_a_stall(2, stall_at=0.2, run_seconds=0.3)
    dues = sorted(due for due, _, _ in out)
    assert stall[0] < stopped < stall[1]
    assert stopped - 1 / RATE <= dues[-1] < stopped
    assert len(dues) == pytest.approx((stopped - dues[0]) * RATE, abs=2)
    assert all(status == 200 for _, _, status in out)

"""A node whose journal cannot grow, as local processes: a file-size limit on one running node (issue 11).

`prlimit` lowers RLIMIT_FSIZE of the shard leader's process while it runs (no
privilege is needed for one's own processes: a soft limit may be lowered, and
raised again up to the hard limit). The kernel then answers a journal write
past the limit as a full disk does: a short write, then an error (EFBIG, "File
too large"; Python ignores SIGXFSZ). The limit applies to every file the
process grows, its log file included, so it is set above the log's size (and
below the recovery's 1 MiB probe file, which fails as on a full disk).
"""

from __future__ import annotations

import os
import resource

import pytest

from kvs.raft import disk, records
from kvs.testing.cluster import wait_until

from .disk_full import SHARD, DiskFullScenario

pytestmark = [pytest.mark.cluster,
              pytest.mark.skipif(not hasattr(resource, "prlimit"), reason="needs prlimit (Linux)")]

HEADROOM = 96 * 1024        # bytes the journal may still grow once the limit is set


def test_a_leader_whose_journal_cannot_grow_halts_the_others_serve_and_it_catches_up_when_it_can(make_cluster):
    cluster = make_cluster(1, 3)
    leader = wait_until(lambda: cluster.leader_of(SHARD), 30, message="a leader of shard 1")
    pid = cluster.nodes[leader].process.pid
    journal = os.path.join(cluster.nodes[leader].data_dir, f"shard-{SHARD}", "journal")
    log_path = cluster.nodes[leader].log_path
    unlimited = resource.prlimit(pid, resource.RLIMIT_FSIZE)

    def take_space() -> None:
        # The limit is on the offset a write reaches: from the log's end, not the file's preallocated size.
        with open(journal, "rb") as f:
            log_end = records.scan(f.read())[2]
        limit = max(log_end, os.path.getsize(log_path)) + HEADROOM
        assert limit < disk._PROBE_BYTES, "the recovery's probe would pass while the limit holds"
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, unlimited[1]))

    def give_space_back() -> None:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, unlimited)

    scenario = DiskFullScenario(cluster.view, lambda node: node, leader, take_space, give_space_back,
                                error_text="File too large")
    try:
        scenario.run()
    except BaseException:
        give_space_back()
        print("\n".join(f"--- {a}\n{cluster.log_tail(a, 40)}" for a in cluster.view))
        raise
    assert cluster.alive(leader), "the node died instead of recovering"
    with open(log_path, errors="replace") as f:
        log = f.read()
    assert "acknowledges nothing more" in log and "reopened from disk" in log
    assert "failed _onTick" not in log, "PySyncObj logged a traceback per tick"

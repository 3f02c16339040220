"""Install commands are cut by size, so a moving range of any size fits the nodes' request limit."""

import json

from kvs.shard.reconfig import CHUNK_BYTES, _batches


def test_batches_stay_under_the_chunk_size_and_keep_every_row_in_order():
    items = [[f"key-{i}", "x" * 100] for i in range(20_000)]
    dedup = [[f"rid-{i}", ["put", f"key-{i}", "x"], f"key-{i}", ["Written", False]] for i in range(20_000)]
    deleted = [f"gone-{i}" for i in range(5_000)]
    batches = _batches(items, dedup, deleted)
    assert len(batches) > 10
    assert [row for b in batches for row in b[0]] == items
    assert [row for b in batches for row in b[1]] == dedup
    assert [row for b in batches for row in b[2]] == deleted
    assert all(len(json.dumps(b)) < 2 * CHUNK_BYTES for b in batches)


def test_an_empty_range_is_still_one_install_that_clears():
    assert _batches([], [], []) == [([], [], [])]

"""The spawner every distributed test and bench --distributed use fails, never hangs."""

import time

import pytest

from divmoe.parallel.spawn import spawn_ranks


def _hang(rank):
    time.sleep(3600)  # a rank stuck in a collective


def _fail(rank):
    if rank == 1:
        raise RuntimeError("rank 1 failed")


def test_a_hanging_rank_is_killed_at_the_deadline():
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="2 ranks did not finish within 3 s"):
        spawn_ranks(_hang, 2, (), 3.0, "hang")
    assert time.monotonic() - t0 < 30


def test_a_failing_rank_fails_the_run():
    with pytest.raises(Exception, match="rank 1 failed"):
        spawn_ranks(_fail, 2, (), 60.0, "fail")

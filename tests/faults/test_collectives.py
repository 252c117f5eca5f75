"""A rank that dies, or stops, in the middle of a sync round's all-reduce.

tests/dist/test_averager.py covers a peer that is dead or hung before a round starts (the
others fail in the round's pre-check). Here rank 3 of 2 replicas x 2 ranks passes the
pre-check with everyone, posts its first all-reduce of the round (a 16 MiB fp32 shard,
in place) and then is SIGKILLed, or SIGSTOPped like a wedged machine. Its replica-group
peer, rank 1, must fail within the QSR timeout with a ReplicaCommError that names the round
and the group; ranks 0 and 2 (the other replica group) are not in that all-reduce and
finish the round. Nobody hangs.
"""
from __future__ import annotations

import os
import signal
import time

import pytest

from tests.ranks import run_ranks

pytestmark = pytest.mark.timeout(120)

TIMEOUT_S = 4.0


def _worker(rank, world, mode):
    import torch
    import torch.distributed as dist

    from qsr_ds.sync.averager import ReplicaAverager
    from qsr_ds.topology import Topology

    topo = Topology.create(2, timeout_s=TIMEOUT_S)
    pids: list = [None] * world
    dist.all_gather_object(pids, os.getpid())
    gen = torch.Generator().manual_seed(rank)
    named = [("shard", torch.randn(4 * 2**20, generator=gen)), ("bias", torch.randn(1000, generator=gen).bfloat16())]
    averager = ReplicaAverager(named, topology=topo, kernel="torch", bucket_mb=1)
    averager.average(step=2)  # round 1: everyone alive
    if rank == 3:
        all_reduce = dist.all_reduce

        def posted_then_gone(tensor, *args, **kwargs):
            kwargs["async_op"] = True
            work = all_reduce(tensor, *args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL if mode == "die" else signal.SIGSTOP)
            return work

        def armed(tensor, *args, **kwargs):  # the checks and the bf16 bucket pass; the 4M-element shard kills
            return (posted_then_gone if tensor is named[0][1] else all_reduce)(tensor, *args, **kwargs)

        dist.all_reduce = armed
    start = time.perf_counter()
    try:
        averager.average(step=4)
        outcome = ("ok", "", time.perf_counter() - start)
    except Exception as err:  # noqa: BLE001 - reported to the test
        outcome = (type(err).__name__, str(err), time.perf_counter() - start)
    if rank == 1 and mode == "stop":
        os.kill(pids[3], signal.SIGKILL)  # the wedged peer: what torchrun's teardown would do
    # the world is broken now: leave without destroy_process_group (it could wait on the dead peer)
    path = os.environ["QSR_FAULT_OUT"] + f".{rank}"
    with open(path, "w") as f:
        f.write(repr(outcome))
    os._exit(0)


@pytest.mark.parametrize("mode", ["die", "stop"])
def test_rank_lost_mid_allreduce_fails_its_group_within_the_timeout(tmp_path, mode):
    out = str(tmp_path / "outcome")
    start = time.perf_counter()
    run_ranks(_worker, 4, mode, timeout_s=60, missing_ok=True, env={"QSR_FAULT_OUT": out, "OMP_NUM_THREADS": "1"})
    elapsed = time.perf_counter() - start
    outcomes = {}
    for rank in range(4):
        if os.path.exists(f"{out}.{rank}"):
            with open(f"{out}.{rank}") as f:
                outcomes[rank] = eval(f.read())  # noqa: S307 - our own repr of a tuple of str/float
    print(mode, outcomes)
    assert 3 not in outcomes  # the victim never got back
    kind, message, seconds = outcomes[1]
    assert kind == "ReplicaCommError", outcomes
    assert "sync round 2: all-reduce over the replica group (ranks [1, 3]) failed" in message, message
    assert "resume from the last checkpoint" in message
    assert seconds < TIMEOUT_S + 10, f"{mode}: rank 1 needed {seconds:.1f} s"
    if mode == "stop":
        assert seconds >= TIMEOUT_S * 0.9, "a stopped peer is only detected by the timeout"
    assert outcomes[0][0] == outcomes[2][0] == "ok", outcomes  # the other replica group is not affected
    assert elapsed < 60

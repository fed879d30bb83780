"""Training batches: order fixed by (seed, epoch); no batch of one."""

from __future__ import annotations

from tests.conftest import run_cli
from visionpipe.engine.loaders import EpochSampler


def test_an_epoch_never_ends_with_a_batch_of_one():
    sampler = EpochSampler(list(range(16)), seed=0, batch_size=5)  # 16 = 3 x 5 + 1
    firsts = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        order = [i for _, i in sampler]
        assert len(order) == len(sampler) == 15 and len(set(order)) == 15
        firsts.append(sorted(set(range(16)) - set(order))[0])
    assert len(set(firsts)) > 1  # a different image sits out each epoch
    assert len(EpochSampler(list(range(17)), seed=0, batch_size=5)) == 17  # last batch of 2: kept


def test_training_runs_when_the_last_batch_would_hold_one_image(tiny_pipeline, tmp_path):
    proc = run_cli("run", str(tiny_pipeline(epochs=1)), "--set", "train.batch_size=5",
                   "--set", "stages=[load, augment, model, train]", "--run-dir", "run", cwd=tmp_path)
    assert "training leaves out 1 of 16 images per epoch" in proc.stderr


def test_ranks_each_leave_out_one_image_when_their_last_batch_would_hold_one(monkeypatch):
    from visionpipe.engine import distributed as dist

    monkeypatch.setattr(dist, "world_size", lambda: 2)
    orders = []
    for rank in (0, 1):
        monkeypatch.setattr(dist, "rank", lambda r=rank: r)
        sampler = EpochSampler(list(range(11)), seed=0, batch_size=5)  # 6 per rank = 5 + 1
        orders.append([i for _, i in sampler])
        assert len(orders[-1]) == len(sampler) == 5
    assert len(set(orders[0]) | set(orders[1])) >= 9  # 11 images padded to 12, then one left out per rank

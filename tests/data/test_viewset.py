"""The view data set (``ldpipe.data.viewset``) and ``ldpipe train`` with ``[[data.augment]]``:
a fresh seeded view per image and epoch."""
from __future__ import annotations

import pytest
import torch

from ldpipe.data import DataError, VariantSampler, load_split
from ldpipe.data.views import compose, draw_view, view_rng
from ldpipe.data.viewset import ViewDataset, ViewTable
from ldpipe.engine.train import check_epochs, train

AUG = 'data.augment=[{type="Mosaic", img_scale=[80,80]}, {type="Resize", img_scale=[[160,96],[160,160]]}, {type="RandomFlip"}]'
SHORT = ("train.batch_size=2", "train.max_iters_per_epoch=2", "train.warmup_iters=2",
         "train.log_interval=1", "models.teacher.train={}")


def test_the_online_table_serves_the_seeded_view_of_each_image_and_epoch(make_tiny_pipe):
    pipe = make_tiny_pipe(AUG)
    split = load_split(pipe.data, "train")
    table = ViewTable(tuple(pipe.data.augment), "epochs", seed=5)
    ds = ViewDataset(split, pipe.data, table)
    for i, epoch in ((0, 0), (3, 0), (3, 1), (7, 4)):
        got = ds[(i, epoch)]
        want = compose(draw_view(pipe.data.augment, split.records, i, view_rng(5, i, epoch, 0)),
                       split.records, pipe.data)
        assert torch.equal(got["img"], want["img"]) and torch.equal(got["gt_boxes"], want["gt_boxes"])
        assert (got["meta"].index, got["meta"].variant_index, got["meta"].variant) == (i, epoch, f"v{epoch}")
    assert not torch.equal(ds[(3, 0)]["img"], ds[(3, 1)]["img"])  # another epoch, another view


def test_an_epoch_schedule_sampler_serves_the_epoch_as_the_slot():
    s = VariantSampler(6, 1, seed=0, by_epoch=True)
    s.set_epoch(3)
    pairs = list(s)
    assert sorted(i for i, _ in pairs) == list(range(6)) and {v for _, v in pairs} == {3}


def test_more_epochs_than_an_epoch_schedule_holds_is_refused():
    table = ViewTable((), "epochs", seed=0, count=4)
    check_epochs(table, 4)
    with pytest.raises(DataError, match="holds 4 epochs.*train.epochs = 6"):
        check_epochs(table, 6)
    check_epochs(ViewTable((), "pool", seed=0, count=4), 12)  # a pool serves any number


def test_train_with_augment_composes_views(make_tiny_pipe, tmp_path, monkeypatch):
    """``ldpipe train`` with [[data.augment]] feeds the composed views (2 epochs x 2 steps x 2)."""
    import ldpipe.data.viewset as vs
    seen = []
    real = vs.compose

    def spy(view, records, data, *a, **k):
        seen.append(view)
        return real(view, records, data, *a, **k)

    monkeypatch.setattr(vs, "compose", spy)
    pipe = make_tiny_pipe(*SHORT, AUG, "train.epochs=2")
    train(pipe, "teacher", str(tmp_path / "w"), device="cpu", progress=False)
    assert len(seen) >= 8 and all(len(v.draws) == 3 for v in seen)
    assert any(v.draws[0].partners for v in seen)  # mosaics were built

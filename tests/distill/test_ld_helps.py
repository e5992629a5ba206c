"""The LD terms must lower held-out localization loss: a student distilled from an oracle
teacher's cache localizes held-out objects better than the same student trained without LD
(see the test's docstring for what this does not yet catch: shuffled cache rows pass too).

The teacher is an *oracle*: at every anchor the cache stores, its edge distributions are a
Gaussian (sigma = 2 bins, over the ``reg_max + 1`` bins) around the true edge distances of that
anchor's ground truth (the ATSS-assigned GT for positives, the GT of highest IoU for the
other anchors of the ``ld`` region), and its class log-probabilities are sharp on that GT's
class.  Its rows go through the real dump (``dump_teacher`` with ``teacher_rows`` replaced by
the oracle: real regions, codec, writer, manifest and index) and the student reads them
through the real loader and LD / VLR / KD losses of ``ldpipe.distill``.  A trained tiny
teacher is no use here: in a test's budget it is barely better than the student.

The held-out measure is the student's own localization losses (DFL per edge and GIoU, the
GFL head's formulas, unweighted means) on the ATSS positives of the validation images, in
eval mode; no AP.
"""
from __future__ import annotations

import os

import pytest
import torch

from ldpipe.cache import codec as C
from ldpipe.cache.store import SampleRows
from ldpipe.config import load_pipeline
from ldpipe.data import TEST_VARIANT, DetectionDataset, load_split, sample_number, synthesize
from ldpipe.engine.student import train_student
from ldpipe.engine import dump as dump_mod
from ldpipe.engine.train import TrainCollate, train
from ldpipe.models import batch_targets, build_model
from ldpipe.models.anchors import grid_tensors, make_grid
from ldpipe.models.assigner import atss_assign
from ldpipe.models.boxes import anchor_centers, bbox2distance, distance2bbox
from ldpipe.models.checkpoint import load_weights, save_checkpoint
from ldpipe.models.losses import distribution_focal_loss, giou_loss

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# (its own copy of helpers.TINY_KVS: the file also runs as a script, without tests/ on sys.path)
TINY = ("depth=18", "base_channels=8", "channels=16", "stacked_convs=1")
# The oracle's edge distributions: a Gaussian over the bins, centred on the true distance.
# Tried by hand at this schedule, seed 0 (val GIoU; baseline 0.726): sigma 2 -> 0.625, sigma 1
# -> 0.635, DFL's two-bin split (log(w + 1e-2)) -> 0.761; sigma 0.5 gave a worse val DFL than
# the baseline at 3 and at 8 epochs (sharp targets at T = 10 drive the student's logits to
# extremes).
SIGMA = 2.0  # width of the Gaussian, in bins
CLS_LOGIT = 6.0  # the oracle's class logit on the GT class (0 elsewhere)


def ld_pipe(root: str, *extra: str):
    over = [f"data.root={root}", "data.train_scales=[[160, 160]]", "data.test_scale=[160, 160]",
            "train.workers=0", "cache.samples_per_shard=16", "cache.codec=int8",
            "train.log_interval=1000"]
    for model in ("teacher", "student"):
        over += [f"models.{model}.{kv}" for kv in TINY]
    return load_pipeline(os.path.join(ROOT, "pipelines", "demo.toml"), over + list(extra))


def edge_logits(dist: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """Oracle edge logits ``[..., reg_max + 1]`` for continuous edge distances ``dist`` (bins)."""
    return -(bins - dist[..., None]) ** 2 / (2 * SIGMA ** 2)


def oracle_rows(shuffle: bool = False):
    """A ``teacher_rows`` that ignores the network and answers with the ground truth of the
    batch; ``shuffle`` permutes each sample's rows across its anchors (wrong targets)."""

    def rows_of(model, batch, device, use_amp, store_cls, num_variants, cls_values="log_probs",
                reuse_idx=-1, upscale=None):
        assert upscale is None  # (the oracle answers on the student's own grid)
        cfg = model.cfg
        bins = torch.arange(cfg.reg_max + 1, dtype=torch.float32)
        out = []
        for b, meta in enumerate(batch["metas"]):
            gt, labels, idx = batch["gt_boxes"][b].float(), batch["gt_labels"][b], batch["region"][b]
            grid = make_grid(meta.pad_shape, cfg.strides, cfg.anchor_scale)
            anchors, strides = grid_tensors(grid)
            res = atss_assign(anchors, grid.num_level_anchors, gt, batch["ignore_boxes"][b],
                              cfg.assigner.topk, cfg.assigner.ignore_iof_thr)
            k = torch.where(res.gt_index[idx] > 0, res.gt_index[idx] - 1,
                            res.overlaps[idx].argmax(dim=1))
            s = strides[idx][:, None]
            dist = bbox2distance(anchor_centers(anchors[idx]) / s, gt[k] / s, cfg.reg_max)  # [n,4]
            box = C.log_probs(edge_logits(dist, bins))
            cls = C.log_probs(torch.nn.functional.one_hot(labels[k], model.num_classes).float()
                              * CLS_LOGIT)
            if shuffle:
                perm = torch.randperm(idx.shape[0], generator=torch.Generator().manual_seed(b))
                box, cls = box[perm], cls[perm]
            out.append(SampleRows(sample_number(meta.index, meta.variant_index, num_variants), meta,
                                  idx.to(torch.int32), box, cls if store_cls else None))
        return out

    return rows_of


def dump_oracle(pipe, ckpt: str, out: str, shuffle: bool = False) -> None:
    saved = dump_mod.teacher_rows
    dump_mod.teacher_rows = oracle_rows(shuffle)
    try:
        dump_mod.dump_teacher(pipe, "teacher", ckpt, out, device="cpu", progress=False)
    finally:
        dump_mod.teacher_rows = saved


@torch.no_grad()
def val_localization(pipe, ckpt: str) -> dict[str, float]:
    """Mean DFL (per edge) and GIoU loss of the checkpoint on the val images' ATSS positives."""
    cfg = pipe.model("student")
    split = load_split(pipe.data, "val")
    model = build_model(cfg, len(split.classes))
    load_weights(model, ckpt)
    model.eval()
    collate = TrainCollate(cfg, len(split.classes), with_vlr=False)
    ds = DetectionDataset(split, pipe.data, [TEST_VARIANT])
    dfl, giou, n = 0.0, 0.0, 0
    for i in range(len(ds)):
        batch = collate([ds[(i, 0)]])
        out = model(batch["img"])
        bt = batch_targets(batch["targets"], out.level_sizes, cfg.strides, cfg.anchor_scale,
                           model.num_classes, torch.device("cpu"))
        pos = torch.nonzero(bt.labels < model.num_classes).squeeze(1)
        s = bt.strides[pos][:, None]
        centers = anchor_centers(bt.anchors[pos]) / s
        reg = out.flat_reg()[pos]
        target = bt.bbox_targets[pos] / s
        pred = distance2bbox(centers, model.bbox_head.integral(reg))
        edges = bbox2distance(centers, target, cfg.reg_max).reshape(-1)
        dfl += float(distribution_focal_loss(reg.reshape(-1, cfg.reg_max + 1), edges).sum())
        giou += float(giou_loss(pred, target).sum())
        n += pos.numel()
    return {"dfl": dfl / (4 * n), "giou": giou / n, "positives": n}


# ------------------------------------------------------------------------------ the test
SEEDS = (0, 1, 2)
SCHEDULE = ("train.epochs=4", "train.batch_size=4", "train.lr=0.02", "train.steps=[100]")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: the numbers then do not depend on the host's core count."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def make_setup(base) -> dict:
    """48 train / 16 val synthetic images of ~160 px under ``base``, and the oracle's ``ld``
    cache (int8) of the train split."""
    root = str(base / "synth")
    synthesize(root, n_train=48, n_val=16, seed=0, size=160)
    pipe = ld_pipe(root, *SCHEDULE)
    torch.manual_seed(0)
    ckpt = str(base / "teacher.pth")  # never run: the manifest records it, the oracle answers
    save_checkpoint(ckpt, build_model(pipe.model("teacher"), 4), {})
    cache = str(base / "oracle.zarr")
    dump_oracle(pipe, ckpt, cache)
    return {"root": root, "base": base, "ckpt": ckpt, "cache": cache}


@pytest.fixture(scope="module")
def oracle_setup(tmp_path_factory, one_thread):
    return make_setup(tmp_path_factory.mktemp("ld-helps"))


def run_student(setup: dict, seed: int, cache: str | None, *extra: str) -> dict[str, float]:
    """Train the student (seed ``seed``; with LD from ``cache``, or the baseline without) and
    return its held-out localization losses."""
    pipe = ld_pipe(setup["root"], *SCHEDULE, f"train.seed={seed}", *extra)
    tag = os.path.basename(cache) if cache else "base"
    wd = str(setup["base"] / f"{tag}-{seed}-{len(extra)}")
    if cache is None:
        ckpt = train(pipe, "student", wd, device="cpu", progress=False)
    else:
        ckpt = train_student(pipe, "student", wd, cache=cache, device="cpu", progress=False)
    return val_localization(pipe, ckpt)


GIOU_MARGIN = 0.03
DFL_MARGIN = 0.05


def check_ld_helps(setup: dict, cache: str, *ld_extra: str) -> dict:
    """Baseline and LD student (from ``cache``, with overrides ``ld_extra``) for every seed;
    asserts LD beats the baseline by the margins on both losses; returns what it saw."""
    seen = {}
    for seed in SEEDS:
        base = run_student(setup, seed, None)
        ld = run_student(setup, seed, cache, *ld_extra)
        seen[seed] = (base, ld)
        assert base["positives"] == ld["positives"] > 100
    msg = "; ".join(f"seed {s}: baseline GIoU {b['giou']:.3f} DFL {b['dfl']:.3f}, "
                    f"LD GIoU {l['giou']:.3f} DFL {l['dfl']:.3f}" for s, (b, l) in seen.items())
    for base, ld in seen.values():
        assert ld["giou"] < base["giou"] - GIOU_MARGIN, msg
        assert ld["dfl"] < base["dfl"] - DFL_MARGIN, msg
    return seen


def test_ld_terms_lower_the_held_out_localization_loss(oracle_setup):
    """For each seed, the LD student (LD + VLR + class KD from the oracle's cache, the demo's
    weights) has a lower val GIoU loss and a lower val DFL than the baseline student of the
    same seed and schedule (48 steps).  Measured on this machine (2-core AMD EPYC, heavily
    loaded; one torch thread; pytest run 39.4 s user + 1.2 s sys), seeds 0/1/2:

        baseline GIoU 0.726/0.698/0.727   LD 0.625/0.624/0.651
        baseline DFL  2.123/1.973/2.146   LD 1.856/1.826/1.894

    The margins asserted (GIoU 0.03, DFL 0.05) are 40% / 34% of the smallest gap seen.

    What this does and does not guard (checked by hand, ``python tests/distill/test_ld_helps.py
    zero|shuffle``): with every LD weight 0 the student equals the baseline bit for bit and
    the test fails.  With the cached rows shuffled across each sample's anchors it still
    PASSES (LD GIoU 0.620/0.630/0.658, DFL 1.759/1.772/1.913): the gain is not specific to
    the right targets.  Likely reason: ATSS puts every positive at about anchor_scale / 2 = 4
    bins from its edges on every level, so a sigma-2 Gaussian around any stored anchor's
    distances is close to one shared prior.  Checked further on 2026-12-02 (AMD EPYC, 2 cores,
    one torch thread): the same setup with the student's own box losses off
    (``models.student.loss.dfl_weight=0`` and ``box_weight=0``, so that LD is the only
    localization signal), seeds 0/1/2, val GIoU / DFL.  The run was a scratch script doing
    what ``python tests/distill/test_ld_helps.py boxoff`` now does; that command has not been rerun.

        no LD          0.910 / 2.829   0.912 / 2.834   0.911 / 2.841
        oracle rows    0.627 / 1.786   0.634 / 1.821   0.629 / 1.814
        shuffled rows  0.630 / 1.799   0.625 / 1.858   0.627 / 1.813

    Even as the only signal, shuffled rows teach as much as the right ones: in 48 steps the
    student learns the prior of the edge distances, not image-specific edges, so no variant of
    this budget can tell right rows from wrong.  This test therefore catches the LD terms
    being switched off or made harmful, not wrong rows; row-to-anchor alignment is guarded by
    the cached == online tests (tests/distill/test_distill.py: the same losses per step from the
    cache as from the teacher itself, and each step reading its own batch).
    """
    check_ld_helps(oracle_setup, oracle_setup["cache"])


BOX_OFF = ("models.student.loss.dfl_weight=0", "models.student.loss.box_weight=0")


def box_off_study(setup: dict, shuffled: str) -> None:
    """The student with its own box losses off: no LD, LD from the oracle, LD from shuffled
    rows, per seed (val GIoU / DFL); see the test's docstring."""
    for seed in SEEDS:
        got = {"no LD": run_student(setup, seed, None, *BOX_OFF),
               "oracle": run_student(setup, seed, setup["cache"], *BOX_OFF),
               "shuffled": run_student(setup, seed, shuffled, *BOX_OFF)}
        print(f"seed {seed}: " + ", ".join(f"{k} {v['giou']:.3f} / {v['dfl']:.3f}" for k, v in got.items()))


if __name__ == "__main__":  # the negative checks: python tests/distill/test_ld_helps.py zero|shuffle|boxoff
    import sys
    import tempfile
    from pathlib import Path

    broken = sys.argv[1] if len(sys.argv) > 1 else ""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        setup = make_setup(Path(tmp))
        cache, extra = setup["cache"], ()
        if broken == "boxoff":
            cache = str(Path(tmp) / "shuffled.zarr")
            dump_oracle(ld_pipe(setup["root"], *SCHEDULE), setup["ckpt"], cache, shuffle=True)
            box_off_study(setup, cache)
            sys.exit(0)
        if broken == "zero":
            extra = ("distill.ld_weight=0", "distill.vlr_weight=0", "distill.kd_weight=0")
        elif broken == "shuffle":
            cache = str(Path(tmp) / "shuffled.zarr")
            dump_oracle(ld_pipe(setup["root"], *SCHEDULE), setup["ckpt"], cache, shuffle=True)
        elif broken:
            sys.exit("usage: python tests/distill/test_ld_helps.py [zero|shuffle|boxoff]")
        try:
            seen = check_ld_helps(setup, cache, *extra)
            print(f"{broken or 'intact'}: the test PASSES", seen)
        except AssertionError as exc:
            print(f"{broken or 'intact'}: the test FAILS: {exc}")

"""What several test files share: the repository's paths, the tiny model settings, the
synthetic set and a tiny COCO set, the CLI runner and its one-``Error:``-line check, the KL of
LD, brute-force VLR references, and the distillation tests' pipeline, batch and step.

Importable from every area as ``import helpers`` / ``from helpers import ...``: ``tests/`` has
no ``__init__.py``, so pytest (prepend import mode) puts it on ``sys.path`` for the root
``conftest.py``.  The session fixtures (``synth_root``, ``tiny_overrides``, ``make_tiny_pipe``,
``tiny_teacher_ckpt``, ``trained_tiny_teacher``) live in ``tests/conftest.py``; mmdetection's
checkpoint layouts in ``tests/mmdet_layout.py``.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEMO_PIPELINE = str(REPO / "pipelines" / "demo.toml")

# ------------------------------------------------------------------------ tiny models
# a ResNet-18 GFL with 8 base channels, 16 FPN / head channels and one stacked conv per tower:
# well under a second per batch on two CPU cores
TINY_MODEL = dict(depth=18, base_channels=8, channels=16, stacked_convs=1)
TINY_KVS = tuple(f"{k}={v}" for k, v in TINY_MODEL.items())  # ("depth=18", ...)


def tiny(model: str) -> tuple[str, ...]:
    """``-o`` overrides that make ``models.<model>`` the tiny network of ``TINY_MODEL``."""
    return tuple(f"models.{model}.{kv}" for kv in TINY_KVS)


TINY_TEACHER = tiny("teacher")
TINY_STUDENT = tiny("student")


def tiny_model_config(**changes):
    """A ``ModelConfig`` of ``TINY_MODEL`` (plus ``changes``), not yet resolved."""
    from ldpipe.config import ModelConfig
    return ModelConfig(**{**TINY_MODEL, **changes})


def synth_set(root, n_train: int, n_val: int, seed: int, **kw) -> str:
    """``ldpipe.data.synthesize`` into ``root``; returns ``root`` as a string."""
    from ldpipe.data import synthesize
    synthesize(str(root), n_train=n_train, n_val=n_val, seed=seed, **kw)
    return str(root)


def write_jpeg(path: Path, w: int, h: int, seed: int = 0, exif_orientation: int | None = None) -> None:
    """A ``w`` x ``h`` JPEG of uniform noise (seeded), with an EXIF orientation when given."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    im = Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))
    if exif_orientation is None:
        im.save(path, quality=90)
    else:
        exif = im.getexif()
        exif[0x0112] = exif_orientation
        im.save(path, quality=90, exif=exif)


def make_coco(root: Path, n: int = 4, w: int = 64, h: int = 48, edit=None) -> Path:
    """``n`` JPEGs with one box each in ``root``; ``edit(coco)`` may change the JSON."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    images, anns = [], []
    for i in range(n):
        write_jpeg(root / "images" / f"{i}.jpg", w, h, seed=i)
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "width": w, "height": h})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [4, 4, 30, 20],
                     "area": 600, "iscrowd": 0})
    # four classes, as the session's tiny teacher has
    cats = [{"id": k + 1, "name": name} for k, name in enumerate(("thing", "b", "c", "d"))]
    coco = {"images": images, "annotations": anns, "categories": cats}
    if edit is not None:
        edit(coco)
    (root / "annotations" / "a.json").write_text(json.dumps(coco))
    return root


# -------------------------------------------------------------------------------- CLI
def cli_args(*kvs: str) -> list[str]:
    """``("a=1", "b=2")`` -> ``["-o", "a=1", "-o", "b=2"]``."""
    return [a for kv in kvs for a in ("-o", kv)]


def invoke(*args: str):
    """``ldpipe ARGS...`` in-process through click (the code path of the ``ldpipe`` command)."""
    from click.testing import CliRunner

    from ldpipe.cli import main
    return CliRunner().invoke(main, [str(a) for a in args])


def error_line(res, *needles: str) -> str:
    """The run failed with exactly one ``Error:`` line, last, naming every needle; no traceback."""
    assert res.exit_code == 1, (res.exit_code, res.output, res.exception)
    lines = [ln for ln in res.output.replace("\r", "\n").splitlines() if ln.strip()]
    # (a progress bar cut short by the error may precede it on the same line)
    assert lines and "Error:" in lines[-1], res.output
    assert len(re.findall(r"(?<![A-Za-z])Error:", res.output)) == 1, res.output
    assert "Traceback" not in res.output, res.output
    last = lines[-1][lines[-1].index("Error:"):]
    for needle in needles:
        assert needle in last, (needle, last)
    return last


# --------------------------------------------------------------------------------- LD
def kl_rows(t: torch.Tensor, s: torch.Tensor, T: float = 10.0) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) of each row (the last dimension), in float64:
    ``[..., n] -> [...]``."""
    lt, ls = torch.log_softmax(t.double() / T, -1), torch.log_softmax(s.double() / T, -1)
    return (lt.exp() * (lt - ls)).sum(-1)


def ld_kl(t: torch.Tensor, s: torch.Tensor, T: float = 10.0) -> float:
    """LD-style loss in float64: mean over edge rows of KL(softmax(t/T) || softmax(s/T))."""
    return float(kl_rows(t, s, T).mean())


# -------------------------------------------------------------------------------- VLR
def reference_d(anchors: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """The LD reference's VLR test value, written out per coordinate: its IoU calculator in
    'diou' mode divides the intersection by the anchor's area (not the union)."""
    ax1, ay1, ax2, ay2 = (anchors[:, i:i + 1] for i in range(4))
    gx1, gy1, gx2, gy2 = (gt[:, i][None] for i in range(4))
    iw = (torch.minimum(ax2, gx2) - torch.maximum(ax1, gx1)).clamp(min=0)
    ih = (torch.minimum(ay2, gy2) - torch.maximum(ay1, gy1)).clamp(min=0)
    area = ((ax2 - ax1) * (ay2 - ay1)).clamp(min=1e-6)
    rho2 = ((gx1 + gx2) - (ax1 + ax2)) ** 2 / 4 + ((gy1 + gy2) - (ay1 + ay2)) ** 2 / 4
    cw = torch.maximum(ax2, gx2) - torch.minimum(ax1, gx1)
    ch = torch.maximum(ay2, gy2) - torch.minimum(ay1, gy1)
    return iw * ih / area - rho2 / (cw ** 2 + ch ** 2).clamp(min=1e-6)


def vlr_reference(anchors, gt, thr, region, low=0.25):
    """Brute force over every anchor: the highest IoU among GTs whose VLR holds the anchor."""
    from torchvision.ops import box_iou, distance_box_iou
    iou = box_iou(anchors, gt)
    diou = reference_d(anchors, gt) if region == "reference" else distance_box_iou(anchors, gt)
    inside = (diou >= low * thr[None]) & (diou < thr[None])
    return torch.where(inside, iou, torch.zeros_like(iou)).max(dim=1).values, inside


# --------------------------------------------------------- distillation (tests/distill/)
# the pipeline, batch and training step that test_distill.py and test_vlr_setting.py share;
# their module fixtures (synth, teacher_ckpt, caches) are in tests/distill/conftest.py
def distill_pipe(data_root: str, *extra: str):
    """The demo pipeline with a tiny teacher (24 channels) and student, 160 px, 4 samples per
    cache unit."""
    from ldpipe.config import load_pipeline
    over = [f"data.root={data_root}", "train.workers=0", "cache.samples_per_shard=4",
            "cache.batch_size=1", "data.train_scales=[[160, 160]]", "data.test_scale=[160, 160]"]
    for model in ("teacher", "student"):
        over += [f"models.{model}.{kv}" for kv in TINY_KVS]
    over.append("models.teacher.channels=24")
    return load_pipeline(DEMO_PIPELINE, over + list(extra))


def same_shape_batch(pipe, split, extra):
    """Two training samples with the same padded shape (so a batch adds no padding)."""
    from ldpipe.data import DetectionDataset, train_variants
    ds = DetectionDataset(split, pipe.data, [v for v in train_variants(pipe.data)], extra=extra)
    by_shape: dict = {}
    for i in range(len(ds)):
        for v in range(len(ds.variants)):
            s = ds[(i, v)]
            by_shape.setdefault(tuple(s["meta"].pad_shape), []).append(s)
    group = max(by_shape.values(), key=len)
    assert len(group) >= 2
    with_gt = [s for s in group if len(s["gt_boxes"])]
    return (with_gt + group)[:2]


def scored_teacher(pipe, path: str) -> str:
    """Save a seed-0 random teacher of ``pipe`` (4 classes) whose edge distributions and class
    scores are far from GFL's flat initialisation (scores not the prior's 0.01) at ``path``."""
    from ldpipe.models import build_model
    from ldpipe.models.checkpoint import save_checkpoint
    torch.manual_seed(0)
    model = build_model(pipe.model("teacher"), 4)
    with torch.no_grad():
        model.bbox_head.gfl_reg.weight.normal_(0, 0.3)
        model.bbox_head.gfl_cls.weight.normal_(0, 0.3)
        model.bbox_head.gfl_cls.bias.fill_(-1.0)
    save_checkpoint(path, model, {"ldpipe": {"model": "teacher"}})
    return path


def distill_criterion(pipe, teacher):
    from ldpipe.config import enabled_terms
    from ldpipe.distill import DistillCriterion
    return DistillCriterion(pipe.distill, enabled_terms(pipe), teacher)


def distill_step(pipe, hook, samples, split):
    """One student step (seed 0) on ``samples`` with teacher source ``hook``: its losses and the
    gradient of the distillation terms alone."""
    from ldpipe.engine.runtime import seed_everything
    from ldpipe.engine.train import TrainCollate, step_losses
    from ldpipe.models import build_model
    cfg = pipe.model("student")
    seed_everything(0)
    model = build_model(cfg, len(split.classes))
    collate = TrainCollate(cfg, len(split.classes), with_vlr=True)
    batch = collate(samples)
    hook.check(pipe, "student", split)
    losses = step_losses(model, model, batch, torch.device("cpu"), False, distill_criterion(pipe, hook))
    distill = {k: v for k, v in losses.items() if k in ("loss_ld", "loss_ld_vlr", "loss_kd")}
    total = sum(distill.values())
    model.zero_grad()
    total.backward()
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    return {k: float(v.detach()) for k, v in losses.items()}, grads


# ------------------------------------------------------------------ damaged caches, tiny COCO pipes
SHARD = "cache.samples_per_shard=2"  # the damaged cache: 4 images, no flip, units 000000, 000001


def _remove(rel: str):
    def damage(root: Path) -> None:
        for p in root.glob(rel):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return damage


def _empty(rel: str):
    def damage(root: Path) -> None:
        for p in root.glob(rel):
            p.write_bytes(b"")
    return damage


def _flip(rel: str):
    def damage(root: Path) -> None:
        for p in root.glob(rel):
            b = bytearray(p.read_bytes())
            b[len(b) // 2] ^= 0xFF
            p.write_bytes(bytes(b))
    return damage


def coco_overrides(root: Path, *extra: str) -> list[str]:
    return [f"data.root={root}", "data.train=annotations/a.json", "data.val=annotations/a.json",
            "data.train_images=images", "data.val_images=images", "data.train_scales=[[64,64]]",
            "data.test_scale=[64,64]", "data.flip=false", "train.workers=0", *TINY_TEACHER,
            "models.teacher.train={}", "train.epochs=1", "train.batch_size=4",
            "train.log_interval=1", *extra]


def coco_pipe(root: Path, *extra: str):
    from ldpipe.config import load_pipeline
    return load_pipeline(DEMO_PIPELINE, coco_overrides(root, *extra))

"""The commands users reach for: ``ldpipe predict``, ``ldpipe export``, ``ldpipe cache show``.

Each runs through the click CLI in-process (the same code path as the ``ldpipe`` command,
without a new interpreter per call) on the tiny fixtures of ``conftest.py``.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import cli_args as _o
from helpers import invoke
from ldpipe.cli import main as cli
from ldpipe.models import build_model
from ldpipe.models.checkpoint import load_file, load_weights, save_checkpoint

DEMO_PIPELINE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                             "pipelines", "demo.toml")

# a random tiny teacher scores ~0.01: let its own test threshold keep some detections
LOW_THR = "models.teacher.test.score_thr=0.01"


def _run(*args: str, ok: bool = True):
    res = invoke(*args)
    if ok:
        assert res.exit_code == 0, res.output + repr(res.exception)
    return res


def _error(res) -> str:
    """The CLI's last output line (after any progress-bar carriage returns)."""
    assert res.exit_code == 1, res.output
    line = re.split(r"[\r\n]", res.output.strip())[-1]
    assert line.startswith("Error: "), res.output
    return line


# ---------------------------------------------------------------------- predict
def test_predict_draws_each_image_and_lists_evals_detections(tiny_overrides, tiny_teacher_ckpt,
                                                             synth_root, tmp_path):
    """One PNG per image at its original size, and the JSON's boxes equal ``ldpipe eval``'s
    detections of that image at or above ``--score-thr`` (eval with batch size 1: no batch
    padding)."""
    val_dir = os.path.join(synth_root, "images", "val")
    over = _o(*tiny_overrides, LOW_THR)
    results = tmp_path / "eval.json"
    _run("eval", DEMO_PIPELINE, "--model", "teacher", "--checkpoint", tiny_teacher_ckpt,
         "--results", str(results), "--batch-size", "1", "--device", "cpu", *over)
    evaluated = json.loads(results.read_text())
    thr = float(np.median([d["score"] for d in evaluated]))  # --score-thr must filter half away

    out = tmp_path / "pred"
    _run("predict", DEMO_PIPELINE, "--model", "teacher", "--checkpoint", tiny_teacher_ckpt,
         "--out", str(out), "--score-thr", repr(thr), "--device", "cpu", val_dir, *over)
    result = json.loads((out / "detections.json").read_text())
    files = sorted(os.listdir(val_dir))
    assert [os.path.basename(e["file"]) for e in result["images"]] == files
    for e in result["images"]:
        with Image.open(e["file"]) as src, Image.open(out / e["png"]) as png:
            png.load()
            assert png.size == src.size == (e["width"], e["height"])
            assert png.mode == "RGB"

    gt = json.loads(open(os.path.join(synth_root, "annotations", "val.json")).read())
    id_of = {img["file_name"]: img["id"] for img in gt["images"]}
    name_of = {c["id"]: c["name"] for c in gt["categories"]}
    total = 0
    for e in result["images"]:
        iid = id_of[os.path.basename(e["file"])]
        ref = sorted((name_of[d["category_id"]], d["score"], *d["bbox"]) for d in evaluated
                     if d["image_id"] == iid and d["score"] >= thr)
        got = sorted((d["class"], d["score"], d["bbox"][0], d["bbox"][1], d["bbox"][2] - d["bbox"][0],
                      d["bbox"][3] - d["bbox"][1]) for d in e["detections"])
        assert len(got) == len(ref), (e["file"], len(got), len(ref))
        for g, r in zip(got, ref):
            assert g[0] == r[0]
            np.testing.assert_allclose(g[1:], r[1:], rtol=0, atol=1e-3)
        total += len(got)
    assert 0 < total < len(evaluated)
    # the drawn PNG is not the bare image: boxes were drawn on it
    first = next(e for e in result["images"] if e["detections"])
    with Image.open(first["file"]) as src, Image.open(out / first["png"]) as png:
        assert np.abs(np.asarray(png, np.int16) - np.asarray(src.convert("RGB"), np.int16)).max() > 100


def test_predict_names_a_missing_or_unreadable_image(tiny_overrides, tiny_teacher_ckpt, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    base = ["predict", DEMO_PIPELINE, "--model", "teacher", "--checkpoint", tiny_teacher_ckpt,
            "--out", str(tmp_path / "o"), "--device", "cpu"]
    for image in (str(tmp_path / "absent.jpg"), str(bad)):
        res = _run(*base, image, *_o(*tiny_overrides), ok=False)
        assert image in _error(res)
    empty = tmp_path / "empty"
    empty.mkdir()
    res = _run(*base, str(empty), *_o(*tiny_overrides), ok=False)
    assert str(empty) in _error(res)


def test_a_checkpoint_is_read_once(make_tiny_pipe, tiny_teacher_ckpt, monkeypatch):
    """Loading a detector for predict/export reads the checkpoint file once (it held the
    classes, the weights and the meta: three reads of one file before)."""
    from ldpipe.engine.predict import open_detector
    from ldpipe.models import checkpoint
    reads = []
    real = checkpoint.torch.load
    monkeypatch.setattr(checkpoint.torch, "load", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    model, classes, meta = open_detector(make_tiny_pipe(), "teacher", tiny_teacher_ckpt, torch.device("cpu"))
    assert len(reads) == 1 and classes and not model.training
    assert isinstance(meta, dict)


# ---------------------------------------------------------------------- export
@pytest.fixture(scope="module")
def full_checkpoint(make_tiny_pipe, tmp_path_factory):
    """A tiny teacher saved as training saves it: weights plus optimizer state after a step."""
    pipe = make_tiny_pipe()
    torch.manual_seed(1)
    model = build_model(pipe.model("teacher"), 4)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    out = model(torch.randn(2, 3, 128, 128))
    (out.cls.sum() + out.reg.sum()).backward()
    opt.step()
    path = str(tmp_path_factory.mktemp("full") / "epoch_1.pth")
    save_checkpoint(path, model, {"ldpipe": {"classes": ["a", "b", "c", "d"], "epoch": 1}},
                    optimizer=opt.state_dict(), iter=1)
    return path


def _outputs(pipe, path: str, x: torch.Tensor):
    model = build_model(pipe.model("teacher"), 4)
    load_weights(model, path)
    with torch.no_grad():
        out = model.eval()(x)
    return out.cls, out.reg


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_export_slim_checkpoint_reloads_to_the_same_outputs(fmt, make_tiny_pipe, tiny_overrides,
                                                           full_checkpoint, tmp_path):
    pipe = make_tiny_pipe()
    # the CLI below applies the pipeline's train.threads = 1 to this process; the reference
    # outputs must be computed with the same thread count to be bit-identical (the summation
    # order depends on it), also when this test runs first in its process
    torch.set_num_threads(pipe.train.threads)
    x = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    ref = _outputs(pipe, full_checkpoint, x)
    out = str(tmp_path / f"slim.{fmt}")
    res = _run("export", DEMO_PIPELINE, "--model", "teacher", "--checkpoint", full_checkpoint,
               "--out", out, *_o(*tiny_overrides))
    summary = json.loads(res.output.strip().splitlines()[-1])
    assert summary["format"] == fmt and summary["bytes"] < summary["source_bytes"]
    got = _outputs(pipe, out, x)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))  # bit-identical
    obj = load_file(out)
    assert set(obj) == {"meta", "state_dict"}  # no optimizer, scheduler or loop state
    assert obj["meta"]["ldpipe"]["classes"] == ["a", "b", "c", "d"]
    assert obj["meta"]["export"]["from"] == os.path.abspath(full_checkpoint)

    half = str(tmp_path / f"half.{fmt}")
    _run("export", DEMO_PIPELINE, "--model", "teacher", "--checkpoint", full_checkpoint,
         "--out", half, "--fp16", *_o(*tiny_overrides))
    state = load_file(half)["state_dict"]
    src = load_file(full_checkpoint)["state_dict"]
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}
    assert all(torch.equal(state[k], v.half() if v.is_floating_point() else v) for k, v in src.items())
    assert os.path.getsize(half) < 0.6 * os.path.getsize(out)
    got16 = _outputs(pipe, half, x)
    for a, b in zip(ref, got16):
        assert (a - b).abs().max() < 0.05 * a.abs().max() and not torch.equal(a, b)


GFOCAL = "models.teacher.head.type=GFocalHead"


@pytest.fixture(scope="module")
def gfocal_checkpoint(make_tiny_pipe, tmp_path_factory):
    """A tiny GFocalV2 teacher whose DGQP is far from its near-constant initial output."""
    torch.manual_seed(2)
    model = build_model(make_tiny_pipe(GFOCAL).model("teacher"), 4)
    with torch.no_grad():
        for conv in (model.bbox_head.reg_conf[0], model.bbox_head.reg_conf[2]):
            conv.weight.normal_(0, 0.5)
            conv.bias.normal_(0, 0.5)
    path = str(tmp_path_factory.mktemp("gfocal") / "gfocal.pth")
    save_checkpoint(path, model, {"ldpipe": {"classes": ["a", "b", "c", "d"]}})
    return path


@pytest.mark.parametrize("head", ["GFLHead", "GFocalHead"])
def test_export_onnx_equals_torch_and_fails_loudly(head, make_tiny_pipe, tiny_overrides, full_checkpoint,
                                                   gfocal_checkpoint, synth_root, tmp_path):
    """The ONNX graph of each head type gives the model's own forward (``cls``, ``reg``, for
    GFocalV2 ``quality``) and its detection scores within 1e-4 (checked by the command, and
    here on a real image at another size); a graph that does not match is an error, and no
    file is left."""
    import onnx
    import onnxruntime as ort

    from ldpipe.data import TEST_VARIANT, load_split, make_sample, load_image
    from ldpipe.engine.export import ONNX_OUTPUTS, DenseTensors, ExportError, export_checkpoint, verify_onnx
    extra = (GFOCAL,) if head == "GFocalHead" else ()
    ckpt = gfocal_checkpoint if head == "GFocalHead" else full_checkpoint
    pipe = make_tiny_pipe(*extra)
    out = str(tmp_path / "t.onnx")
    res = _run("export", DEMO_PIPELINE, "--model", "teacher", "--checkpoint", ckpt,
               "--out", out, *_o(*tiny_overrides, *extra))
    summary = json.loads(res.output.strip().splitlines()[-1])
    assert summary["onnx_max_abs_diff"] <= 1e-4
    assert summary["onnx_outputs"] == list(ONNX_OUTPUTS[head])
    assert sorted(os.listdir(tmp_path)) == ["t.onnx"]  # no temporary or external-data files

    model = build_model(pipe.model("teacher"), 4)
    load_weights(model, ckpt)
    model.eval()
    rec = load_split(pipe.data, "val").records[0]
    pipe_big = make_tiny_pipe("data.test_scale=[288, 224]", *extra)
    img = make_sample(rec, load_image(rec.file_name), TEST_VARIANT, pipe_big.data)["img"][None]
    assert tuple(img.shape[2:]) not in [tuple(s[2:]) for s in summary["onnx_checked_inputs"]]
    session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"img": img.numpy()})))
    assert list(got) == list(ONNX_OUTPUTS[head])
    with torch.no_grad():
        dense = model(img)  # the model's own forward, not the export wrapper
    ref = {"cls": dense.cls, "reg": dense.reg, "scores": dense.scores()}
    if head == "GFocalHead":
        ref["quality"] = dense.quality
        # the DGQP matters: the scores are sigmoid(cls) x quality, well below sigmoid(cls)
        assert (dense.scores() / dense.cls.sigmoid()).max() < 0.9
    h, w = img.shape[2:]
    n = sum(-(-h // s) * -(-w // s) for s in model.strides)  # ceil(H/s) x ceil(W/s) per level
    assert got["reg"].shape == (1, n, 4, model.reg_bins) and got["scores"].shape == (1, n, 4)
    for name, r in ref.items():
        assert got[name].shape == tuple(r.shape), name
        assert np.abs(got[name] - r.numpy()).max() <= 1e-4, name
    props = {p.key: json.loads(p.value) for p in onnx.load(out).metadata_props}
    assert props["ldpipe_classes"] == ["a", "b", "c", "d"] and props["ldpipe_strides"] == model.strides
    assert props["ldpipe_head"] == head and props["ldpipe_outputs"] == list(ONNX_OUTPUTS[head])
    if head == "GFocalHead":
        return

    # the check sees a graph that is not the model's ...
    with torch.no_grad():
        model.bbox_head.gfl_reg.bias.add_(1e-3)
    with pytest.raises(ExportError, match="differs from torch's"):
        verify_onnx(DenseTensors(model), out, [img])
    # ... and a failed check leaves no file
    bad = str(tmp_path / "bad.onnx")
    with pytest.raises(ExportError, match="differs from torch's"):
        export_checkpoint(pipe, "teacher", full_checkpoint, bad, atol=-1.0)
    assert sorted(os.listdir(tmp_path)) == ["t.onnx"]


def test_export_refusals(tiny_overrides, full_checkpoint, tmp_path):
    base = ["export", DEMO_PIPELINE, "--model", "teacher", "--checkpoint", full_checkpoint]
    for extra, words in ((["--out", str(tmp_path / "x.bin")], "--format"),
                         (["--out", str(tmp_path / "x.onnx"), "--fp16"], "--fp16"),
                         (["--out", full_checkpoint], "is the checkpoint being exported")):
        res = _run(*base, *extra, *_o(*tiny_overrides), ok=False)
        assert words in _error(res)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------- cache show
# the 4 validation images as the training split: a cache of 8 samples dumps quickly
SMALL_TRAIN = ("data.train=annotations/val.json", "data.train_images=images/val", "cache.codec=fp32")


@pytest.fixture(scope="module")
def small_cache(make_tiny_pipe, tiny_teacher_ckpt, tmp_path_factory) -> str:
    from ldpipe.engine.dump import dump_teacher
    path = str(tmp_path_factory.mktemp("show") / "c.zarr")
    dump_teacher(make_tiny_pipe(*SMALL_TRAIN), "teacher", tiny_teacher_ckpt, path, device="cpu",
                 progress=False)
    return path


def test_cache_show_plots_the_cached_distributions(make_tiny_pipe, tiny_teacher_ckpt, small_cache,
                                                   tmp_path):
    from ldpipe.cache.reader import CacheReader
    from ldpipe.data import Variant, load_image, load_split, make_sample
    from ldpipe.engine.show import show_sample
    from ldpipe.models.anchors import grid_tensors
    pipe = make_tiny_pipe(*SMALL_TRAIN)
    reader = CacheReader(small_cache)
    m = reader.manifest
    image_id = int(m.data.image_ids[1])
    png = str(tmp_path / "show.png")
    res = show_sample(pipe, small_cache, image_id, png, variant="s0f")
    with Image.open(png) as im:
        im.load()
        assert im.size == res["size"] and im.size[0] > 800
    assert res["variant"] == "s0f" and 1 <= len(res["anchors"]) <= 3

    # the plotted bars are the decoded cache rows ...
    rows = reader.read(1, m.variants.index("s0f"))
    pos = [int(np.flatnonzero(rows["anchor"].numpy() == a)[0]) for a in res["anchors"]]
    expected = torch.softmax(rows["box"][pos], dim=-1).numpy()
    assert res["probs"].shape == (len(pos), 4, m.geometry.reg_bins)
    np.testing.assert_allclose(res["probs"], expected, rtol=0, atol=1e-7)
    # ... which (fp32) are the teacher's own edge distributions at those anchors
    rec = load_split(pipe.data, "train").records[1]
    sample = make_sample(rec, load_image(rec.file_name), Variant(0, True), pipe.data)
    model = build_model(pipe.model("teacher"), 4)
    load_weights(model, tiny_teacher_ckpt)
    with torch.no_grad():
        out = model.eval()(sample["img"][None])
    teacher = torch.softmax(out.reg[0, res["anchors"]], dim=-1).numpy()
    np.testing.assert_allclose(res["probs"], teacher, rtol=0, atol=1e-5)
    # the default anchors lie in the largest GT box (ATSS positives of it)
    gt = sample["gt_boxes"]
    big = gt[((gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])).argmax()]
    anchors, _ = grid_tensors(m.geometry.grid(sample["meta"].pad_shape))
    c = (anchors[res["anchors"], :2] + anchors[res["anchors"], 2:]) / 2
    assert bool(((c[:, 0] > big[0]) & (c[:, 0] < big[2]) & (c[:, 1] > big[1]) & (c[:, 1] < big[3])).all())


def test_cache_show_cli_and_its_errors(tiny_overrides, small_cache, tmp_path):
    from ldpipe.cache.reader import CacheReader
    m = CacheReader(small_cache).manifest
    image_id = str(m.data.image_ids[0])
    rows = CacheReader(small_cache).read(0, 0)
    chosen = rows["anchor"][[0, -1]].tolist()
    base = ["cache", "show", DEMO_PIPELINE, small_cache, "--out", str(tmp_path / "a.png")]
    over = _o(*tiny_overrides, *SMALL_TRAIN)
    res = _run(*base, "--image", image_id, "--anchors", ",".join(map(str, chosen)), *over)
    assert f"anchors {chosen}" in res.output
    with Image.open(tmp_path / "a.png") as im:
        assert im.format == "PNG" and im.size[0] > 800
    stored = set(rows["anchor"].tolist())
    absent = next(a for a in range(100000) if a not in stored)
    for args, words in ((["--image", "999999"], "image id 999999"),
                        (["--image", image_id, "--anchors", str(absent)], f"anchors [{absent}]"),
                        (["--image", image_id, "--variant", "s7n"], "variant 's7n'")):
        res = _run(*base, *args, *over, ok=False)
        assert words in _error(res)
    # a pipeline over other data (the 12-image training split) is refused, naming the fingerprint
    res = _run(*base, "--image", image_id, *_o(*tiny_overrides, "cache.codec=fp32"), ok=False)
    assert "fingerprint" in _error(res)


@pytest.mark.parametrize("thr", ["nan", "inf", "-0.1", "1.5"])
def test_predict_refuses_a_score_threshold_outside_0_1(thr, tiny_teacher_ckpt, tmp_path):
    res = invoke("predict", DEMO_PIPELINE, "--model", "teacher", "--checkpoint",
                 tiny_teacher_ckpt, "--out", str(tmp_path / "p"), "--score-thr",
                 thr, str(tmp_path / "a.png"))
    assert res.exit_code == 2 and "--score-thr" in res.output and "not a score in [0, 1]" in res.output
    assert not (tmp_path / "p").exists()


def _commands_with_device(group=None, path=()):
    import click
    group = group or cli
    for name, cmd in sorted(group.commands.items()):
        if isinstance(cmd, click.Group):
            yield from _commands_with_device(cmd, (*path, name))
        elif any(p.name == "device" for p in cmd.params):
            yield (*path, name)


def test_every_device_option_follows_the_one_device_rule():
    """``--device tpu`` (and ``cuda`` on a machine without CUDA) is one error on every command
    that takes ``--device``, before anything runs."""
    names = list(_commands_with_device())
    assert {("train",), ("eval",), ("train-student",), ("chain",), ("predict",)} <= set(names)
    for path in names:
        res = invoke(*path, "--device", "tpu")
        assert res.exit_code == 2 and "Invalid value for '--device'" in res.output, (path, res.output)
        assert "choose 'cpu', 'cuda' or 'cuda:N'" in res.output and "Traceback" not in res.output
        if not torch.cuda.is_available():
            res = invoke(*path, "--device", "cuda")
            assert res.exit_code == 2 and "not available" in res.output, (path, res.output)

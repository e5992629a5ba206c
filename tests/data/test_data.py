"""Data path: records, mmdetection-equal geometry, data set, samplers, collate."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ldpipe.config import DataConfig
from ldpipe.data import (TEST_VARIANT, DataError, DetectionDataset, FixedSampler, Record,
                         Variant, VariantSampler, boxes_to_original, collate,
                         load_split, make_sample, train_variants)
from ldpipe.data.synth import synthesize

BCCD = Path(__file__).resolve().parents[3] / "shared/datasets/bccd"
BCCD_CLASSES = ["RBC", "WBC", "Platelets"]


def _data(**keys) -> DataConfig:
    return DataConfig(**keys)


def _raw_data(scale: list[int], flip: bool = True) -> DataConfig:
    """Identity normalisation, so the tensor holds the (BGR) pixels."""
    return _data(train_scales=[scale], test_scale=scale, flip=flip, mean=[0.0] * 3,
                 std=[1.0] * 3, to_rgb=False, pad_divisor=32)


def _record(w: int, h: int, boxes, labels=None, ignore=None, file_name="mem.jpg") -> Record:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    labels = np.zeros(len(boxes), np.int64) if labels is None else np.asarray(labels, np.int64)
    ignore = np.zeros((0, 4), np.float32) if ignore is None else np.asarray(ignore, np.float32)
    return Record(image_id=7, file_name=file_name, width=w, height=h, boxes=boxes,
                  labels=labels, ignore=ignore.reshape(-1, 4))


# ------------------------------------------------------------------- geometry
def test_variants_and_keys():
    data = _data(train_scales=[[1333, 800], [1000, 600]], flip=True)
    keys = [v.key for v in train_variants(data)]
    assert keys == ["s0n", "s0f", "s1n", "s1f"]
    assert [v.key for v in train_variants(_data(flip=False))] == ["s0n"]
    assert TEST_VARIANT.key == "test" and TEST_VARIANT.scale_idx == -1


def test_flip_consistency():
    rng = np.random.default_rng(0)
    h, w = 97, 131
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    boxes = [[3, 5, 40, 60], [70, 10, 131, 97], [0, 0, 12, 20]]
    rec = _record(w, h, boxes, labels=[0, 1, 2])
    data = _raw_data([w, h])  # scale factor exactly 1
    plain = make_sample(rec, image, Variant(0, False), data)
    flipped = make_sample(rec, image, Variant(0, True), data)
    assert plain["meta"].scale_factor == (1.0, 1.0)
    a, b = plain["img"], flipped["img"]
    assert torch.equal(a[:, :h, :w], torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32)))
    assert torch.equal(b[:, :h, :w], a[:, :h, :w].flip(-1))
    assert torch.equal(flipped["gt_labels"], plain["gt_labels"])
    for box, fbox in zip(plain["gt_boxes"].long(), flipped["gt_boxes"].long()):
        x1, y1, x2, y2 = box.tolist()
        fx1, fy1, fx2, fy2 = fbox.tolist()
        assert (fy1, fy2) == (y1, y2) and fx2 - fx1 == x2 - x1
        assert torch.equal(b[:, fy1:fy2, fx1:fx2], a[:, y1:y2, x1:x2].flip(-1))
    # double flip is the identity; boxes_to_original undoes the flip
    back = boxes_to_original(flipped["gt_boxes"], flipped["meta"])
    assert torch.allclose(back, plain["gt_boxes"])
    twice = make_sample(_record(w, h, flipped["gt_boxes"].numpy()), image[:, ::-1].copy(),
                        Variant(0, True), data)
    assert torch.equal(twice["img"], a)
    assert torch.allclose(twice["gt_boxes"], plain["gt_boxes"])


def test_resize_scale_and_pad_known_numbers():
    image = np.zeros((480, 640, 3), np.uint8)
    rec = _record(640, 480, [[64, 48, 640, 480], [10, 20, 30, 40]],
                  ignore=[[0, 0, 6, 6]])
    data = _data(train_scales=[[1333, 800]], test_scale=[1333, 800])
    s = make_sample(rec, image, TEST_VARIANT, data)
    m = s["meta"]
    # mmcv.rescale_size: factor = min(1333/640, 800/480) = 1.6667 -> int(640*f+0.5) = 1067
    assert m.ori_shape == (480, 640)
    assert m.img_shape == (800, 1067)
    assert m.pad_shape == (800, 1088)  # 1067 -> next multiple of 32
    assert tuple(s["img"].shape) == (3, 800, 1088)
    ws, hs = m.scale_factor
    assert ws == pytest.approx(1067 / 640) and hs == pytest.approx(800 / 480)
    expect = np.array([[64 * ws, 48 * hs, 1067, 800], [10 * ws, 20 * hs, 30 * ws, 40 * hs]])
    np.testing.assert_allclose(s["gt_boxes"].numpy(), expect, rtol=1e-6)
    np.testing.assert_allclose(s["ignore_boxes"].numpy(), [[0, 0, 6 * ws, 6 * hs]], rtol=1e-6)
    assert m.variant == "test" and m.flip is False
    # the padding is zeros, the content normalised (black -> -mean/std)
    assert torch.all(s["img"][:, :, 1067:] == 0)
    assert s["img"][0, 0, 0].item() == pytest.approx(-123.675 / 58.395, rel=1e-5)


def test_pad_to_multiple_of_32_and_downscale():
    image = np.zeros((300, 333, 3), np.uint8)
    data = _data(train_scales=[[320, 320]], pad_divisor=32)
    s = make_sample(_record(333, 300, [[0, 0, 333, 300]]), image, Variant(0, False), data)
    hp, wp = s["meta"].pad_shape
    assert hp % 32 == 0 and wp % 32 == 0
    h2, w2 = s["meta"].img_shape
    assert max(h2, w2) <= 320 and hp - h2 < 32 and wp - w2 < 32
    np.testing.assert_allclose(s["gt_boxes"].numpy(), [[0, 0, w2, h2]])


def test_boxes_to_original_round_trip():
    rng = np.random.default_rng(1)
    h, w = 480, 640
    xy = rng.uniform(0, [w - 50, h - 50], (20, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(2, 50, (20, 2))], 1).astype(np.float32)
    rec = _record(w, h, boxes)
    image = np.zeros((h, w, 3), np.uint8)
    data = _data(train_scales=[[1333, 800], [500, 300]], flip=True)
    for v in train_variants(data) + [TEST_VARIANT]:
        s = make_sample(rec, image, v, data)
        back_t = boxes_to_original(s["gt_boxes"], s["meta"])
        back_n = boxes_to_original(s["gt_boxes"].numpy(), s["meta"])
        assert isinstance(back_t, torch.Tensor) and isinstance(back_n, np.ndarray)
        np.testing.assert_allclose(back_t.numpy(), boxes, atol=1e-3)
        np.testing.assert_allclose(back_n, boxes, atol=1e-3)
    # clipped to the original image
    meta = make_sample(rec, image, TEST_VARIANT, data)["meta"]
    out = boxes_to_original(torch.tensor([[-10.0, -10.0, 5000.0, 5000.0]]), meta)
    assert out.tolist() == [[0.0, 0.0, 640.0, 480.0]]


# ---------------------------------------------------------------------- VOC
def _write_voc(root: Path, objects: dict[str, list[tuple]], size=(64, 48), split="train",
               with_size=True) -> None:
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "ImageSets/Main").mkdir(parents=True)
    w, h = size
    for sid, objs in objects.items():
        cv2.imwrite(str(root / "JPEGImages" / f"{sid}.jpg"), np.full((h, w, 3), 128, np.uint8))
        xml = ["<annotation>"]
        xml.append(f"<size><width>{w if with_size else 0}</width>"
                   f"<height>{h if with_size else 0}</height><depth>3</depth></size>")
        for name, box, difficult in objs:
            xml.append(f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox>"
                       + "".join(f"<{k}>{v}</{k}>" for k, v in zip(
                           ("xmin", "ymin", "xmax", "ymax"), box))
                       + "</bndbox></object>")
        xml.append("</annotation>")
        (root / "Annotations" / f"{sid}.xml").write_text("\n".join(xml))
    (root / "ImageSets/Main" / f"{split}.txt").write_text("\n".join(objects) + "\n")


def test_voc_cleaning_difficult_and_ids(tmp_path):
    _write_voc(tmp_path, {
        "b": [("cat", (10, 5, 80, 40), 0),      # reaches outside (w=64): clipped
              ("dog", (3.7, 4.2, 20.9, 30), 0),  # int(float()) truncation, mmdet 2.x VOC
              ("cat", (30, 30, 30, 30), 0),      # degenerate: dropped
              ("dog", (1, 1, 10, 10), 1)],       # difficult: ignore region
        "a": [("cat", (0, 0, 5, 5), 0)],
    }, with_size=False)
    split = load_split(_data(format="voc", root=str(tmp_path), classes=["cat", "dog"]), "train")
    assert split.image_ids == [0, 1]  # index in the split file order
    assert Path(split.records[0].file_name).name == "b.jpg"
    r = split.records[0]
    assert (r.width, r.height) == (64, 48)  # read from the image: <size> was zero
    np.testing.assert_array_equal(r.boxes, [[10, 5, 64, 40], [3, 4, 20, 30]])
    assert r.labels.tolist() == [0, 1] and r.labels.dtype == np.int64
    np.testing.assert_array_equal(r.ignore, [[1, 1, 10, 10]])
    assert r.ignore_labels.tolist() == [1]  # a difficult dog ignores dog detections only
    assert split.stats == {"images": 2, "boxes_kept": 3, "ignore_kept": 1, "boxes_clipped": 1,
                           "boxes_dropped_degenerate": 1}
    assert split.coco_json is None and len(split.fingerprint) == 64


def test_voc_unknown_class_names_file(tmp_path):
    _write_voc(tmp_path, {"x1": [("Cat", (1, 1, 9, 9), 0)]})
    with pytest.raises(DataError, match=r"x1\.xml.*'Cat'"):
        load_split(_data(format="voc", root=str(tmp_path), classes=["cat"]), "train")


def test_voc_missing_files_are_named(tmp_path):
    _write_voc(tmp_path, {"x1": [("cat", (1, 1, 9, 9), 0)]})
    data = _data(format="voc", root=str(tmp_path), classes=["cat"])
    with pytest.raises(DataError, match=r"ImageSets/Main/test\.txt"):
        load_split(data, "test")
    (tmp_path / "Annotations/x1.xml").unlink()
    with pytest.raises(DataError, match=r"x1\.xml"):
        load_split(data, "train")


def test_missing_image_is_named_when_loaded(tmp_path):
    _write_voc(tmp_path, {"x1": [("cat", (1, 1, 9, 9), 0)]})
    split = load_split(_data(format="voc", root=str(tmp_path), classes=["cat"]), "train")
    (tmp_path / "JPEGImages/x1.jpg").unlink()
    ds = DetectionDataset(split, _data(), [TEST_VARIANT])
    with pytest.raises(DataError, match=r"JPEGImages/x1\.jpg"):
        ds[(0, 0)]
    (tmp_path / "JPEGImages/x1.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"x1\.jpg"):
        ds[(0, 0)]


@pytest.mark.skipif(not BCCD.is_dir(), reason=f"BCCD data set not present at {BCCD}")
def test_bccd_voc_with_bad_boxes():
    data = _data(format="voc", root=str(BCCD), classes=BCCD_CLASSES, train="trainval",
                 val="test", train_scales=[[640, 480]], test_scale=[640, 480])
    split = load_split(data, "train")
    assert split.stats["images"] == 292
    # BloodImage_00338 / 00343 each hold a zero-size box
    assert split.stats["boxes_dropped_degenerate"] >= 2
    assert split.stats["boxes_clipped"] + split.stats["boxes_dropped_degenerate"] > 0
    assert sorted(set(np.concatenate([r.labels for r in split.records]).tolist())) == [0, 1, 2]
    names = [Path(r.file_name).stem for r in split.records]
    picks = [names.index("BloodImage_00338"), names.index("BloodImage_00343"), 0]
    ds = DetectionDataset(split, data, train_variants(data))
    for i in picks:
        s = ds[(i, 1)]
        assert s["meta"].ori_shape == (480, 640) and s["meta"].index == i
        wh = s["gt_boxes"][:, 2:] - s["gt_boxes"][:, :2]
        assert len(wh) == len(split.records[i].boxes) and bool((wh >= 1).all())
    test = load_split(data, "val")
    assert test.stats["images"] == 72 and test.fingerprint != split.fingerprint


# --------------------------------------------------------------------- COCO
def test_coco_classes_mismatch_names_both(tmp_path):
    ann = tmp_path / "annotations"
    ann.mkdir()
    coco = {"images": [{"id": 3, "file_name": "a.jpg", "width": 50, "height": 40}],
            "annotations": [
                {"id": 1, "image_id": 3, "category_id": 5, "bbox": [40, 30, 20, 20], "iscrowd": 0},
                {"id": 2, "image_id": 3, "category_id": 2, "bbox": [1, 1, 5, 5], "iscrowd": 1}],
            "categories": [{"id": 5, "name": "b"}, {"id": 2, "name": "a"}]}
    (ann / "train.json").write_text(json.dumps(coco))
    split = load_split(_data(root=str(tmp_path)), "train")
    assert split.classes == ["a", "b"]
    r = split.records[0]
    np.testing.assert_array_equal(r.boxes, [[40, 30, 50, 40]])  # clipped
    assert r.labels.tolist() == [1]
    np.testing.assert_array_equal(r.ignore, [[1, 1, 6, 6]])
    assert r.ignore_labels.tolist() == [0]  # the crowd box is of category 2 = class "a"
    assert r.file_name == str(tmp_path / "images/train/a.jpg")
    assert split.stats["boxes_clipped"] == 1 and split.coco_json["images"][0]["id"] == 3
    reordered = load_split(_data(root=str(tmp_path), classes=["b", "a"]), "train")
    assert reordered.records[0].labels.tolist() == [0]  # category 5 = "b" is now label 0
    assert reordered.records[0].ignore_labels.tolist() == [1]
    with pytest.raises(DataError, match=r"\['a', 'x'\].*\['a', 'b'\]"):
        load_split(_data(root=str(tmp_path), classes=["a", "x"]), "train")
    with pytest.raises(DataError, match=r"val\.json"):
        load_split(_data(root=str(tmp_path)), "val")


# ------------------------------------------------------------ samplers, collate
def test_variant_sampler_deterministic():
    a = VariantSampler(11, 4, seed=3)
    b = VariantSampler(11, 4, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)
    assert sorted(i for i, _ in a) == list(range(11))
    assert all(0 <= v < 4 for _, v in a)
    b.set_epoch(3)
    assert list(a) != list(b)
    assert list(VariantSampler(11, 4, seed=4)) != list(VariantSampler(11, 4, seed=3))
    assert [i for i, _ in VariantSampler(5, 2, shuffle=False)] == [0, 1, 2, 3, 4]


def test_variant_sampler_ddp_sharding():
    full = VariantSampler(11, 4, seed=1)
    full.set_epoch(5)
    ranks = []
    for r in range(2):
        s = VariantSampler(11, 4, seed=1, rank=r, world_size=2)
        s.set_epoch(5)
        ranks.append(list(s))
        assert len(ranks[-1]) == len(s) == 6
    together = ranks[0] + ranks[1]
    assert {i for i, _ in together} == set(range(11))
    assert set(ranks[0]) & set(ranks[1]) <= {full.pairs()[0]}  # one padded repeat
    assert set(together) == set(full)  # the same pairs whatever the world size


def test_fixed_sampler():
    pairs = [(i, v) for i in range(3) for v in range(2)]
    assert pairs == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    shards = [list(FixedSampler(pairs, rank=r, world_size=4)) for r in range(4)]
    assert sorted(sum(shards, [])) == pairs and [len(s) for s in shards] == [2, 2, 1, 1]


def test_collate_pads_and_gathers_extra():
    data = _raw_data([64, 64])
    big = make_sample(_record(64, 40, [[1, 1, 9, 9]]), np.full((40, 64, 3), 7, np.uint8),
                      Variant(0, False), data)
    small = make_sample(_record(30, 20, [[2, 2, 8, 8]] * 2), np.full((20, 30, 3), 9, np.uint8),
                        Variant(0, False), _raw_data([30, 30]))
    big["teacher"], small["teacher"] = torch.ones(2), torch.zeros(3)
    out = collate([big, small])
    assert tuple(out["img"].shape) == (2, 3, 64, 64)
    assert torch.all(out["img"][1, :, 32:, :] == 0) and torch.all(out["img"][1, :, :, 32:] == 0)
    assert torch.all(out["img"][1, :, :20, :30] == 9)
    assert [len(b) for b in out["gt_boxes"]] == [1, 2] and len(out["gt_labels"]) == 2
    assert len(out["ignore_boxes"]) == 2 and len(out["metas"]) == 2
    assert [t.numel() for t in out["teacher"]] == [2, 3]


def test_dataset_dataloader_end_to_end(tmp_path):
    synthesize(str(tmp_path), n_train=6, n_val=2, seed=0, size=128)
    data = _data(root=str(tmp_path), train_scales=[[160, 128], [128, 96]], flip=True)
    split = load_split(data, "train")
    variants = train_variants(data)
    # the extra hook tags each sample with its image's pixels, read independently of the meta
    # the loader returns, so a sample paired with another one's meta or variant is caught
    ds = DetectionDataset(split, data, variants, extra=lambda m: {"key": (m.index, m.variant)})
    plain = DetectionDataset(split, data, variants)
    assert len(ds) == 6
    sampler = VariantSampler(len(ds), len(variants), seed=0)
    loader = DataLoader(ds, batch_size=4, sampler=sampler, collate_fn=collate, num_workers=0)
    seen = []
    drawn = dict(sampler.pairs())
    for batch in loader:
        assert batch["img"].dim() == 4 and batch["img"].shape[0] == len(batch["metas"])
        for b, (m, k) in enumerate(zip(batch["metas"], batch["key"])):
            assert k == (m.index, m.variant)
            assert m.image_id == split.records[m.index].image_id
            assert m.variant == variants[drawn[m.index]].key  # the sampler's draw
            ref = plain[(m.index, drawn[m.index])]["img"]
            h, w = ref.shape[-2:]
            assert torch.equal(batch["img"][b, :, :h, :w], ref)
            seen.append(m.index)
    assert sorted(seen) == list(range(6))
    assert ds[3]["meta"].variant == "s0n"  # int key = variant 0

"""Tests for ldpipe.metrics (COCO metrics vs pycocotools, VOC mAP by hand)."""
from __future__ import annotations

import contextlib
import copy
import io
import json
from dataclasses import dataclass, field

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ldpipe.metrics import (
    COCO_KEYS,
    build_coco_gt,
    coco_metrics,
    coco_results,
    evaluate,
    format_table,
    voc_map,
    write_results,
)


@dataclass
class Rec:
    """Minimal duck-typed stand-in for the data module's record."""

    image_id: int
    boxes: np.ndarray
    labels: np.ndarray
    ignore: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    file_name: str = "x.jpg"
    width: int = 640
    height: int = 480


def rec(image_id, boxes, labels, ignore=()):
    return Rec(image_id, np.asarray(boxes, np.float32).reshape(-1, 4),
               np.asarray(labels, np.int64), np.asarray(ignore, np.float32).reshape(-1, 4))


def det(image_id, boxes, scores, labels):
    return {"image_id": image_id, "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
            "scores": np.asarray(scores, np.float32), "labels": np.asarray(labels, np.int64)}


# --------------------------------------------------------------------------
# hand-made COCO case: 3 images, 3 classes with non-contiguous, unsorted ids
# --------------------------------------------------------------------------
CLASSES = ["cat", "dog", "bird"]          # sorted-by-id order: ids 2, 5, 9


def _coco_case():
    gt = {  # image_id: [(xyxy, class index, iscrowd)]
        1: [((10, 10, 110, 110), 0, 0), ((200, 50, 400, 300), 1, 0), ((5, 300, 25, 320), 2, 0)],
        2: [((50, 50, 150, 200), 0, 0), ((300, 100, 500, 400), 0, 1),  # crowd cat
            ((20, 20, 60, 60), 1, 0)],
        3: [((0, 0, 300, 300), 2, 0), ((400, 300, 420, 330), 2, 0)],
    }
    cat_ids = [2, 5, 9]
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 640, "height": 480} for i in (3, 1, 2)]
    anns = []
    for img_id, objs in gt.items():
        for box, lab, crowd in objs:
            x1, y1, x2, y2 = box
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": cat_ids[lab],
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                         "iscrowd": crowd, "segmentation": []})
    cats = [{"id": 9, "name": "bird"}, {"id": 2, "name": "cat"}, {"id": 5, "name": "dog"}]
    coco_json = {"images": images, "annotations": anns, "categories": cats}
    records = []
    for img_id, objs in gt.items():
        normal = [o for o in objs if not o[2]]
        crowd = [o for o in objs if o[2]]
        records.append(rec(img_id, [o[0] for o in normal], [o[1] for o in normal],
                           [o[0] for o in crowd]))
    dets = [
        det(1, [(12, 10, 110, 112),      # cat TP, IoU ~0.96
                (10, 10, 90, 110),       # cat duplicate
                (210, 60, 380, 290),     # dog TP IoU ~0.78
                (500, 400, 600, 470),    # dog FP
                (6, 302, 26, 318)],      # bird small TP
            [0.95, 0.7, 0.9, 0.6, 0.5], [0, 0, 1, 1, 2]),
        det(2, [(60, 60, 150, 180),      # cat TP IoU ~0.72
                (320, 120, 480, 380),    # cat inside crowd -> ignored
                (25, 25, 70, 70),        # dog IoU ~0.53
                (20, 20, 60, 60)],       # wrong class (bird) on dog -> FP
            [0.8, 0.85, 0.4, 0.3], [0, 0, 1, 2]),
        det(3, [(0, 0, 250, 280), (100, 100, 200, 200)], [0.65, 0.2], [2, 2]),
    ]
    return records, coco_json, dets


def _pycocotools_stats(coco_json, results):
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = copy.deepcopy(coco_json)
        gt.createIndex()
        dt = gt.loadRes(copy.deepcopy(results))
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def test_coco_metrics_equal_pycocotools():
    records, coco_json, dets = _coco_case()
    original = copy.deepcopy(coco_json)
    gt, cat_ids = build_coco_gt(records, CLASSES, coco_json)
    assert cat_ids == [2, 5, 9]
    results = coco_results(dets, cat_ids)
    assert len(results) == 11 and results[0]["bbox"] == pytest.approx([12, 10, 98, 102])

    ev = _pycocotools_stats(coco_json, results)
    m = coco_metrics(records, CLASSES, dets, coco_json=coco_json, backend="pycocotools")
    for key, expected in zip(COCO_KEYS, ev.stats):
        assert m[key] == float(expected), key
    try:  # the faster-coco-eval back end (the default when installed): the same to the last ulp
        fast = coco_metrics(records, CLASSES, dets, coco_json=coco_json, backend="faster-coco-eval")
    except ValueError:  # not installed
        fast = None
    if fast is not None:
        for key, expected in zip(COCO_KEYS, ev.stats):
            assert fast[key] == pytest.approx(float(expected), abs=1e-12), key
    assert 0 < m["bbox_mAP"] < 1 and m["bbox_mAP_s"] > -1
    assert m["num_images"] == 3 and m["num_detections"] == 11
    assert coco_json == original  # input not mutated
    # per-class AP from the precision array; the crowd cat is not counted
    prec = ev.eval["precision"]
    for k, name in enumerate(CLASSES):  # ev.params.catIds == [2, 5, 9]
        p = prec[:, :, k, 0, -1]
        assert m["per_class"][name]["AP"] == pytest.approx(p[p > -1].mean())
        p50 = prec[0, :, k, 0, -1]
        assert m["per_class"][name]["AP50"] == pytest.approx(p50[p50 > -1].mean())
    assert {n: r["num_gts"] for n, r in m["per_class"].items()} == {"cat": 2, "dog": 2, "bird": 3}
    json.dumps(m)  # serialisable


def test_in_memory_gt_matches_json_path_without_crowd():
    records, coco_json, dets = _coco_case()
    # drop crowd objects: then the in-memory GT (ids 1..C) gives identical stats
    for r in records:
        r.ignore = np.zeros((0, 4), np.float32)
    coco_json["annotations"] = [a for a in coco_json["annotations"] if not a["iscrowd"]]
    a = coco_metrics(records, CLASSES, dets, coco_json=coco_json)
    b = coco_metrics(records, CLASSES, dets)
    for key in COCO_KEYS:
        assert a[key] == pytest.approx(b[key], abs=1e-12), key
    for name in CLASSES:
        assert a["per_class"][name]["AP"] == pytest.approx(b["per_class"][name]["AP"])


def test_category_mismatch_raises():
    records, coco_json, _ = _coco_case()
    with pytest.raises(ValueError):
        build_coco_gt(records, ["cat", "bird", "cow"], coco_json)


def test_permuted_classes_map_by_name():
    # data.classes may list the JSON's categories in another order (mapped by name)
    records, coco_json, dets = _coco_case()
    perm = [1, 2, 0]  # new label of old label: cat->1, dog->2, bird->0
    classes = ["bird", "cat", "dog"]
    for r in records:
        r.labels = np.array([perm[x] for x in r.labels], np.int64)
    for d in dets:
        d["labels"] = np.array([perm[x] for x in d["labels"]], np.int64)
    _, cat_ids = build_coco_gt(records, classes, coco_json)
    assert cat_ids == [9, 2, 5]
    ref_records, ref_json, ref_dets = _coco_case()
    ref = coco_metrics(ref_records, CLASSES, ref_dets, coco_json=ref_json)
    m = coco_metrics(records, classes, dets, coco_json=coco_json)
    for key in COCO_KEYS:
        assert m[key] == ref[key]
    assert m["per_class"] == ref["per_class"]


def test_perfect_and_empty_detections():
    records = [rec(1, [(10, 10, 110, 110), (200, 50, 400, 300)], [0, 1]),
               rec(2, [(50, 50, 250, 200), (300, 300, 350, 350)], [1, 0])]  # large, medium
    classes = ["a", "b"]
    perfect = [det(r.image_id, r.boxes, np.linspace(0.9, 0.5, len(r.labels)), r.labels)
               for r in records]
    m = coco_metrics(records, classes, perfect)
    assert m["bbox_mAP"] == pytest.approx(1.0, abs=1e-9)
    assert m["bbox_AR_100"] == pytest.approx(1.0)
    assert m["bbox_mAP_s"] == -1.0  # no small GT: pycocotools' -1 kept
    assert m["per_class"]["a"]["AP"] == pytest.approx(1.0)

    for none in ([], [det(1, np.zeros((0, 4)), [], []), det(2, np.zeros((0, 4)), [], [])]):
        m = coco_metrics(records, classes, none)
        assert m["bbox_mAP"] == 0.0 and m["bbox_AR_100"] == 0.0
        assert m["bbox_mAP_s"] == -1.0 and m["bbox_mAP_m"] == 0.0
        assert m["num_detections"] == 0
        assert m["per_class"]["b"] == {"AP": 0.0, "AP50": 0.0, "num_gts": 2}
        assert m["per_class"]["a"]["num_gts"] == 2
    m = evaluate(records, classes, [], voc=True)
    assert m["voc_mAP_50"] == 0.0 and m["per_class"]["a"]["voc_AP50"] == 0.0
    table = format_table(m).splitlines()
    assert table[0].startswith("bbox_mAP 0.000 | AP50 0.000 | AP75 0.000 | VOC mAP50 0.000")
    assert f"{'a':<5} " + " ".join(f"{v:>8}" for v in ("2", "0.000", "0.000", "0.000")) in table
    assert f"{'b':<5} " + " ".join(f"{v:>8}" for v in ("2", "0.000", "0.000", "0.000")) in table
    assert any(" = -1.000" in ln and "area= small" in ln for ln in table)  # no small GT


def test_unknown_image_id_raises():
    records = [rec(1, [(0, 0, 10, 10)], [0])]
    with pytest.raises(ValueError):
        coco_metrics(records, ["a"], [det(7, [(0, 0, 10, 10)], [0.5], [0])])


# --------------------------------------------------------------------------
# VOC
# --------------------------------------------------------------------------
def _voc_case():
    # one class; GT A and C normal, B difficult (ignore)
    a, b, c = (0, 0, 100, 100), (200, 200, 300, 300), (400, 0, 500, 100)
    records = [rec(1, [a, c], [0, 0], ignore=[b])]
    dets = [det(1, [a, (0, 300, 50, 350), b, c, (2, 2, 100, 100)],
                [0.9, 0.8, 0.7, 0.6, 0.5], [0, 0, 0, 0, 0])]
    return records, dets


def test_voc_map_hand_computed():
    records, dets = _voc_case()
    # After dropping the detection matched to the difficult GT (0.7):
    #   0.9 TP -> rec 1/2, prec 1;   0.8 FP -> rec 1/2, prec 1/2
    #   0.6 TP -> rec 1,   prec 2/3; 0.5 duplicate of A, FP -> rec 1, prec 1/2
    # area: envelope prec = 1 on (0, .5], 2/3 on (.5, 1] -> AP = .5 + .5 * 2/3 = 5/6
    r = voc_map(records, ["obj"], dets, mode="area")
    assert r["per_class"]["obj"]["AP"] == pytest.approx(5 / 6, abs=1e-6)
    assert r["mAP"] == pytest.approx(5 / 6, abs=1e-6)
    assert r["per_class"]["obj"]["num_gts"] == 2
    # 11 points: t = 0..0.5 (6 points) -> 1; t = 0.6..1.0 (5 points) -> 2/3
    r = voc_map(records, ["obj"], dets, mode="11points")
    assert r["mAP"] == pytest.approx((6 + 5 * 2 / 3) / 11, abs=1e-6)
    with pytest.raises(ValueError):
        voc_map(records, ["obj"], dets, mode="bogus")


def test_voc_map_iou_threshold_and_empty_class():
    records = [rec(1, [(0, 0, 100, 100)], [0])]
    # IoU = 50*100 / 100*100 = 0.5 exactly: TP at thr 0.5 (>=), FP at 0.6
    dets = [det(1, [(0, 0, 50, 100)], [0.9], [0])]
    r = voc_map(records, ["a", "b"], dets, iou_thr=0.5)
    assert r["per_class"]["a"]["AP"] == pytest.approx(1.0)
    assert r["per_class"]["b"]["AP"] == -1.0 and r["mAP"] == pytest.approx(1.0)
    assert voc_map(records, ["a", "b"], dets, iou_thr=0.6)["mAP"] == 0.0


def test_ignore_labels_make_ignore_regions_class_specific():
    a, b = (0, 0, 100, 100), (200, 200, 300, 300)
    classes = ["a", "b"]
    dets = [det(1, [a, b], [0.9, 0.8], [0, 0])]  # class-0 detection on the ignore box
    agnostic = rec(1, [a], [0], ignore=[b])
    specific = rec(1, [a], [0], ignore=[b])
    specific.ignore_labels = np.array([1])  # the ignore box belongs to class 1
    assert voc_map([agnostic], classes, dets)["mAP"] == pytest.approx(1.0)
    assert voc_map([specific], classes, dets)["mAP"] == pytest.approx(1.0)  # FP after the TP
    dets = [det(1, [b, a], [0.9, 0.8], [0, 0])]  # now the FP comes first
    assert voc_map([agnostic], classes, dets)["mAP"] == pytest.approx(1.0)
    assert voc_map([specific], classes, dets)["mAP"] == pytest.approx(0.5)
    assert coco_metrics([agnostic], classes, dets)["bbox_mAP"] == pytest.approx(1.0)
    assert coco_metrics([specific], classes, dets)["bbox_mAP_50"] == pytest.approx(0.5, abs=0.01)
    gt, _ = build_coco_gt([specific], classes)
    assert [x["category_id"] for x in gt.dataset["annotations"] if x["iscrowd"]] == [2]


def test_voc_difficult_ignored_by_coco_metrics():
    # in-memory GT (coco_json=None): the difficult box is an iscrowd region
    records = [rec(1, [(0, 0, 100, 100), (400, 0, 500, 100)], [0, 1],
                   ignore=[(200, 200, 300, 300)]),
               rec(2, [(50, 50, 250, 250)], [0])]
    gt, cat_ids = build_coco_gt(records, ["a", "b"])
    assert cat_ids == [1, 2]
    crowd = [x for x in gt.dataset["annotations"] if x["iscrowd"]]
    assert len(crowd) == 2 and crowd[0]["bbox"] == [200.0, 200.0, 100.0, 100.0]
    dets = [det(1, [(0, 0, 100, 100), (200, 200, 300, 300), (400, 0, 500, 100)],
                [0.5, 0.9, 0.8], [0, 0, 1]),
            det(2, [(50, 50, 250, 250)], [0.7], [0])]
    m = evaluate(records, ["a", "b"], dets, voc=True)
    assert m["bbox_mAP"] == pytest.approx(1.0, abs=1e-9)
    assert m["voc_mAP_50"] == pytest.approx(1.0)
    assert m["per_class"]["a"]["num_gts"] == 2
    table = format_table(m)
    assert "VOC AP50" in table and "bbox_mAP 1.000" in table


def test_write_results_roundtrip(tmp_path):
    records, coco_json, dets = _coco_case()
    gt, cat_ids = build_coco_gt(records, CLASSES, coco_json)
    path = tmp_path / "res.json"
    write_results(path, dets, cat_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(str(path))
    anns = dt.loadAnns(dt.getAnnIds())
    assert len(anns) == 11
    first = anns[0]
    assert first["image_id"] == 1 and first["category_id"] == 2
    assert first["bbox"] == pytest.approx([12, 10, 98, 102])
    assert first["score"] == pytest.approx(0.95)
    assert {a["category_id"] for a in anns} == {2, 5, 9}


# ------------------------------------------- VOC mAP: a guard of issue 12 ("tests first")
class _Rec:
    def __init__(self, image_id, boxes, labels, ignore=()):
        self.image_id, self.file_name, self.width, self.height = image_id, f"{image_id}.jpg", 640, 480
        self.boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        self.labels = np.asarray(labels, np.int64)
        self.ignore = np.asarray(ignore, np.float32).reshape(-1, 4)


def _det(image_id, boxes, scores, labels):
    return {"image_id": image_id, "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
            "scores": np.asarray(scores, np.float32), "labels": np.asarray(labels, np.int64)}


def test_voc_map_two_images_unsorted_detections():
    """Kills: dropping either score sort of ``voc_map`` (the per-image matching order, or
    the per-class ranking across images).  Detections are given in non-descending score
    order, and the ranking must interleave the two images."""
    a, b, c = (0, 0, 100, 100), (200, 200, 300, 300), (400, 0, 500, 100)
    records = [_Rec(1, [a, c], [0, 1]), _Rec(2, [b], [0])]
    dets = [
        # image 1: a duplicate pair on A, the lower score first; a TP on C (class 1)
        _det(1, [(2, 2, 100, 100), (0, 0, 100, 98), c], [0.3, 0.9, 0.5], [0, 0, 1]),
        # image 2: a FP (no overlap) first, then the TP on B
        _det(2, [(0, 300, 50, 350), b], [0.8, 0.6], [0, 0]),
    ]
    # class 0, ranked over both images: 0.9 TP (img 1) | 0.8 FP (img 2) | 0.6 TP (img 2) |
    # 0.3 FP (img 1, duplicate: the 0.9 one matched A first)
    #   recall .5 1/1 ; .5 1/2 ; 1 2/3 ; 1 2/4  -> envelope 1 on (0,.5], 2/3 on (.5,1]
    #   AP = .5 + .5 * 2/3 = 5/6.  (Matching in the given order makes the 0.3 one the TP
    #   and gives 1/2; ranking in image order gives 1/2 as well.)
    r = voc_map(records, ["x", "y"], dets)
    assert r["per_class"]["x"]["AP"] == pytest.approx(5 / 6, abs=1e-9)
    assert r["per_class"]["x"]["num_gts"] == 2 and r["per_class"]["x"]["num_dets"] == 4
    assert r["per_class"]["y"]["AP"] == pytest.approx(1.0)
    assert r["mAP"] == pytest.approx((5 / 6 + 1) / 2, abs=1e-9)
    # 11 points: t = 0..0.5 -> 1, t = 0.6..1 -> 2/3
    r = voc_map(records, ["x", "y"], dets, mode="11points")
    assert r["per_class"]["x"]["AP"] == pytest.approx((6 + 5 * 2 / 3) / 11, abs=1e-9)

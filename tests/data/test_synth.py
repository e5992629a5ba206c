"""The embedded synthetic COCO data set."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from ldpipe.config import load_pipeline
from ldpipe.data import load_split
from ldpipe.data.synth import CLASSES, DEMO_ARGS, MAX_SIZE, render_image, synthesize


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    summary = synthesize(str(root), n_train=16, n_val=6, seed=0, size=320)
    assert summary["train"]["images"] == 16 and summary["val"]["images"] == 6
    return root


def test_deterministic_by_seed(synth, tmp_path):
    again = tmp_path / "again"
    synthesize(str(again), n_train=16, n_val=6, seed=0, size=320)
    a, b = _files(synth), _files(again)
    assert a.keys() == b.keys() and len(a) == 2 + 16 + 6
    assert a == b  # identical JSON and image bytes
    other = tmp_path / "other"
    synthesize(str(other), n_train=16, n_val=6, seed=1, size=320)
    c = _files(other)
    assert c["annotations/train.json"] != a["annotations/train.json"]
    assert c["images/train/000001.jpg"] != a["images/train/000001.jpg"]


def test_annotations_valid(synth):
    for name, n in (("train", 16), ("val", 6)):
        coco = json.loads((synth / f"annotations/{name}.json").read_text())
        assert [c["name"] for c in coco["categories"]] == CLASSES
        assert [c["id"] for c in coco["categories"]] == [1, 2, 3, 4]
        assert len(coco["images"]) == n
        sizes = {i["id"]: (i["width"], i["height"]) for i in coco["images"]}
        for img in coco["images"]:
            assert 288 <= img["width"] <= 352 and 288 <= img["height"] <= 352
            pix = cv2.imread(str(synth / f"images/{name}" / img["file_name"]))
            assert pix.shape == (img["height"], img["width"], 3)
        per_image = {}
        for a in coco["annotations"]:
            w, h = sizes[a["image_id"]]
            x, y, bw, bh = a["bbox"]
            assert 0 <= x and 0 <= y and x + bw <= w and y + bh <= h  # inside the image
            assert 1 <= a["category_id"] <= 4 and a["area"] > 0
            if not a["iscrowd"]:
                assert 3 <= min(bw, bh) and max(bw, bh) <= MAX_SIZE + 2
            per_image[a["image_id"]] = per_image.get(a["image_id"], 0) + 1
        assert all(1 <= k <= 10 for k in per_image.values())
        assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])


def test_object_size_range_and_classes():
    rng = np.random.default_rng(5)
    sides, classes = [], set()
    for _ in range(30):
        _, anns = render_image(rng, 320, 320)
        for a in anns:
            if not a["iscrowd"]:
                sides.append(max(a["bbox"][2:]))
                classes.add(a["category_id"])
    sides = np.array(sides)
    assert classes == {1, 2, 3, 4}
    assert sides.min() < 20 and sides.max() > 90  # small and large objects both occur
    assert sides.max() <= MAX_SIZE + 2


def test_loads_through_load_split(synth, tmp_path):
    toml = tmp_path / "synth.toml"
    toml.write_text(f'[data]\nformat = "coco"\nroot = "{synth}"\n'
                    'train_scales = [[320, 320]]\ntest_scale = [320, 320]\n')
    pipe = load_pipeline(toml)
    train, val = load_split(pipe.data, "train"), load_split(pipe.data, "val")
    assert train.classes == CLASSES
    assert len(train.records) == 16 and len(val.records) == 6
    assert train.stats["boxes_dropped_degenerate"] == 0 and train.stats["boxes_clipped"] == 0
    assert train.fingerprint != val.fingerprint
    assert all(Path(r.file_name).is_file() for r in train.records + val.records)
    assert load_split(pipe.data, "train").fingerprint == train.fingerprint


def test_cli_defaults_are_the_demo_set(tmp_path):
    from ldpipe import cli
    assert cli._SYNTH == DEMO_ARGS
    # small objects only within the demo's range, at most max_objects per image
    rng = np.random.default_rng(3)
    for _ in range(10):
        _, anns = render_image(rng, 192, 192, DEMO_ARGS["min_size"], DEMO_ARGS["max_size"],
                               DEMO_ARGS["max_objects"])
        assert len(anns) <= DEMO_ARGS["max_objects"]
        for a in anns:
            assert max(a["bbox"][2:]) <= DEMO_ARGS["max_size"] + 2

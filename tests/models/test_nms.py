"""Score-voting Cluster-DIoU-NMS (ldpipe.models.nms) against a slow loop reference and by hand."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torchvision.ops import batched_nms

from ldpipe.config import ConfigError
from ldpipe.config import TestConfig as Tcfg  # (a name pytest does not collect)
from ldpipe.models import nms as N


# ------------------------------------------------------------------ a slow, independent reference
def diou_scalar(a, b, beta=0.8) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    rho2 = ((a[0] + a[2]) / 2 - (b[0] + b[2]) / 2) ** 2 + ((a[1] + a[3]) / 2 - (b[1] + b[3]) / 2) ** 2
    c2 = (max(a[2], b[2]) - min(a[0], b[0])) ** 2 + (max(a[3], b[3]) - min(a[1], b[1])) ** 2
    return inter / (union + 1e-7) - (rho2 / (c2 + 1e-7)) ** beta


def loop_reference(boxes, scores, labels, thr, max_num=-1):
    """Greedy DIoU-NMS per class in score order, then the vote of each kept box, in Python floats."""
    boxes, scores, labels = boxes.tolist(), scores.tolist(), labels.tolist()
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    rank = {j: r for r, j in enumerate(order)}
    kept = []
    for j in order:
        if all(labels[i] != labels[j] or diou_scalar(boxes[i], boxes[j]) <= thr for i in kept):
            kept.append(j)
    if max_num > 0:
        kept = kept[:max_num]
    voted = []
    for i in kept:
        num, den = [0.0] * 4, 0.0
        for j in range(len(boxes)):
            d = 0.0
            if labels[j] == labels[i] and rank[j] >= rank[i]:
                d = diou_scalar(boxes[i], boxes[j])
            d = d if d > 0.7 else 0.0
            w = scores[j] * math.exp(-(1 - d) ** 2 / 0.025)
            num = [n + w * c for n, c in zip(num, boxes[j])]
            den += w
        voted.append([n / den for n in num])
    return kept, voted


def random_candidates(seed: int, n: int = 80, classes: int = 3):
    """Boxes clustered around a few objects (many overlaps), distinct scores."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(6, 2, generator=g) * 200
    sizes = 20 + torch.rand(6, 2, generator=g) * 60
    obj = torch.randint(0, 6, (n,), generator=g)
    c = centres[obj] + torch.randn(n, 2, generator=g) * 6
    wh = sizes[obj] * (1 + 0.15 * torch.randn(n, 2, generator=g)).clamp(min=0.3)
    boxes = torch.cat([c - wh / 2, c + wh / 2], 1)
    scores = torch.rand(n, generator=g) * 0.9 + 0.05
    labels = torch.randint(0, classes, (n,), generator=g)
    return boxes, scores, labels


@pytest.mark.parametrize("seed,thr", [(0, 0.6), (1, 0.6), (2, 0.5), (3, 0.75), (4, 0.3)])
def test_equals_the_loop_reference_on_random_boxes(seed, thr):
    boxes, scores, labels = random_candidates(seed)
    voted, sc, lab, idx = N.voting_cluster_diou_nms(boxes, scores, labels, thr)
    kept, ref_voted = loop_reference(boxes.double(), scores.double(), labels, thr)
    assert idx.tolist() == kept  # same boxes kept, in the same (score) order
    assert 3 < len(kept) < len(boxes)  # the case suppresses something and keeps several
    assert torch.equal(sc, scores[idx]) and torch.equal(lab, labels[idx])
    assert torch.allclose(voted, torch.tensor(ref_voted, dtype=torch.float32), atol=1e-3)
    assert not torch.allclose(voted, boxes[idx], atol=1e-2)  # the votes moved boxes


def test_max_num_keeps_the_highest_scores_across_classes():
    boxes, scores, labels = random_candidates(5)
    _, sc_all, _, idx_all = N.voting_cluster_diou_nms(boxes, scores, labels, 0.6)
    voted, sc, _, idx = N.voting_cluster_diou_nms(boxes, scores, labels, 0.6, max_num=4)
    kept, ref_voted = loop_reference(boxes.double(), scores.double(), labels, 0.6, max_num=4)
    assert idx.tolist() == kept == idx_all[:4].tolist()
    assert torch.all(sc[:-1] >= sc[1:]) and len(idx_all) > 4
    assert torch.allclose(voted, torch.tensor(ref_voted, dtype=torch.float32), atol=1e-3)
    # a leading block that must grow (8 -> 16 -> ...) gives the same result as the whole matrix
    small, _, _, idx_small = N.voting_cluster_diou_nms(boxes, scores, labels, 0.6, max_num=10, block=8)
    whole, _, _, idx_whole = N.voting_cluster_diou_nms(boxes, scores, labels, 0.6, max_num=10, block=10 ** 6)
    assert idx_small.tolist() == idx_whole.tolist() == idx_all[:10].tolist()
    assert torch.allclose(small, whole, atol=1e-5)


# ------------------------------------------------------------------ hand cases
def test_two_overlapping_boxes_vote_into_their_weighted_mean():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0]])
    scores = torch.tensor([0.9, 0.6])
    d = diou_scalar(boxes[0].tolist(), boxes[1].tolist())
    assert 0.7 < d < 0.9  # suppressed at 0.6 and inside the vote
    voted, sc, lab, idx = N.voting_cluster_diou_nms(boxes, scores, torch.tensor([1, 1]), 0.6)
    w = torch.tensor([0.9, 0.6 * math.exp(-(1 - d) ** 2 / 0.025)])
    expected = (w[:, None] * boxes).sum(0) / w.sum()
    assert idx.tolist() == [0] and sc.tolist() == [pytest.approx(0.9)] and lab.tolist() == [1]
    assert torch.allclose(voted[0], expected, atol=1e-5)
    assert voted[0, 0] > 0.1  # moved towards the second box


def test_diou_keeps_a_box_whose_centre_is_far_although_its_iou_is_high():
    boxes = torch.tensor([[0.0, 0.0, 100.0, 100.0], [0.0, 0.0, 100.0, 66.0]])
    scores, labels = torch.tensor([0.9, 0.8]), torch.tensor([0, 0])
    iou = 0.66
    d = diou_scalar(boxes[0].tolist(), boxes[1].tolist())
    assert d < 0.65 < iou
    assert batched_nms(boxes, scores, labels, 0.65).tolist() == [0]  # IoU NMS drops it
    voted, _, _, idx = N.voting_cluster_diou_nms(boxes, scores, labels, 0.65)
    assert idx.tolist() == [0, 1]
    assert torch.allclose(voted, boxes)  # DIoU < 0.7: neither votes into the other


def test_a_suppressed_box_does_not_suppress_cluster_nms_is_greedy_not_fast_nms():
    # A suppresses B, B would suppress C, A does not suppress C: greedy NMS keeps A and C
    boxes = torch.tensor([[0.0, 0, 10, 10], [2.0, 0, 12, 10], [4.0, 0, 14, 10]])
    scores, labels = torch.tensor([0.9, 0.8, 0.7]), torch.zeros(3, dtype=torch.long)
    d = N.pairwise_diou(boxes)
    assert d[0, 1] > 0.5 and d[1, 2] > 0.5 and d[0, 2] < 0.5
    fast_nms = (d.triu(1).max(0).values <= 0.5).nonzero().squeeze(1).tolist()
    assert fast_nms == [0]
    _, _, _, idx = N.voting_cluster_diou_nms(boxes, scores, labels, 0.5)
    assert idx.tolist() == [0, 2]


def test_classes_neither_suppress_nor_vote_across():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.5, 0.0, 10.5, 10.0]])
    voted, _, lab, idx = N.voting_cluster_diou_nms(boxes, torch.tensor([0.9, 0.8]),
                                                   torch.tensor([0, 2]), 0.5)
    assert idx.tolist() == [0, 1] and lab.tolist() == [0, 2]
    assert torch.allclose(voted, boxes)
    voted, _, _, idx = N.voting_cluster_diou_nms(boxes, torch.tensor([0.9, 0.8]),
                                                 torch.tensor([2, 2]), 0.5)
    assert idx.tolist() == [0] and voted[0, 0] > 0.1


def test_empty_input():
    voted, sc, lab, idx = N.voting_cluster_diou_nms(torch.zeros(0, 4), torch.zeros(0),
                                                    torch.zeros(0, dtype=torch.long), 0.6)
    assert voted.shape == (0, 4) and sc.shape == lab.shape == idx.shape == (0,)


# ------------------------------------------------------------------ wiring
def test_suppress_dispatches_on_the_test_config():
    boxes, scores, labels = random_candidates(6)
    plain = N.suppress(boxes, scores, labels, Tcfg(nms="nms", nms_iou=0.6, max_per_img=5))
    keep = batched_nms(boxes, scores, labels, 0.6)[:5]
    assert torch.equal(plain["boxes"], boxes[keep]) and torch.equal(plain["labels"], labels[keep])
    vote = N.suppress(boxes, scores, labels, Tcfg(nms="voting_cluster_diounms", max_per_img=5))
    ref, sc, _, _ = N.voting_cluster_diou_nms(boxes, scores, labels, 0.6, 5)
    assert torch.equal(vote["boxes"], ref) and torch.equal(vote["scores"], sc)


def test_gfl_predict_uses_the_configured_nms(make_tiny_pipe):
    from ldpipe.models import build_model
    pipe = make_tiny_pipe("models.teacher.test.score_thr=0.0", "models.teacher.test.nms_pre=30")
    torch.manual_seed(0)
    model = build_model(pipe.model("teacher"), 4).eval()
    img = torch.randn(1, 3, 128, 160)
    metas = [(128, 160)]  # img_shapes
    out = model(img)
    base = pipe.model("teacher").test
    # every candidate (IoU NMS at 1.0 keeps all distinct boxes), in score order
    cand = model.postprocess(out, metas, dataclasses.replace(base, nms_iou=1.0, max_per_img=10 ** 6))[0]
    vote_cfg = dataclasses.replace(base, nms="voting_cluster_diounms")
    got = model.postprocess(out, metas, vote_cfg)[0]
    ref, sc, lab, _ = N.voting_cluster_diou_nms(cand["boxes"], cand["scores"], cand["labels"],
                                                base.nms_iou, base.max_per_img)
    assert len(got["boxes"]) > 0
    assert torch.allclose(got["boxes"], ref, atol=1e-4) and torch.equal(got["labels"], lab)
    model.cfg = dataclasses.replace(model.cfg, test=vote_cfg)
    assert torch.allclose(model.predict(img, metas)[0]["boxes"], ref, atol=1e-4)


def test_eval_reads_test_nms_from_the_pipeline(make_tiny_pipe, tiny_teacher_ckpt, monkeypatch):
    from ldpipe.engine.infer import evaluate_checkpoint
    calls = []
    real = N.voting_cluster_diou_nms
    monkeypatch.setattr(N, "voting_cluster_diou_nms", lambda *a, **k: calls.append(1) or real(*a, **k))
    pipe = make_tiny_pipe("models.teacher.test.nms=voting_cluster_diounms")
    metrics = evaluate_checkpoint(pipe, "teacher", tiny_teacher_ckpt, device="cpu", progress=False)
    assert len(calls) == 4 and "bbox_mAP" in metrics  # once per validation image


def test_unknown_nms_kind_is_a_config_error(make_tiny_pipe):
    with pytest.raises(ConfigError, match=r"models\.teacher\.test\.nms must be nms\|voting_cluster_diounms"):
        make_tiny_pipe("models.teacher.test.nms=soft")
    with pytest.raises(ConfigError, match=r"test\.nms_iou must be in \[0, 1\]"):
        make_tiny_pipe("models.teacher.test.nms_iou=1.5")


def test_nms_compare_script_rows(tiny_overrides, tiny_teacher_ckpt, tmp_path):
    from benchmarks.timings import nms_compare
    from pathlib import Path
    DEMO_PIPELINE = str(Path(__file__).resolve().parents[2] / "pipelines" / "demo.toml")
    args = [DEMO_PIPELINE, "--model", "teacher", "--checkpoint", tiny_teacher_ckpt, "--reps", "1",
            "--json", str(tmp_path / "c.json"), "-o", "models.teacher.test.score_thr=0.01"]
    for kv in tiny_overrides:
        args += ["-o", kv]
    d = nms_compare.main(args)
    assert [r["nms"] for r in d["rows"]] == ["nms", "voting_cluster_diounms"] and d["images"] == 4
    for r in d["rows"]:
        assert r["post_ms_per_image"] > 0 and r["images_per_s"] > 0 and r["detections"] > 0
        assert 0 <= r["AP"] <= 1 and 0 <= r["AP50"] <= 1 and 0 <= r["AP75"] <= 1
    assert d["forward_ms_per_image"] > 0 and (tmp_path / "c.json").exists()

"""The learning-rate schedule of ``ldpipe.engine.train`` (mmdetection's linear warm-up and step
decay), values by hand.

A hand-computed guard of issue 12 ("tests first").
"""
from __future__ import annotations

import pytest

from ldpipe.engine.train import Schedule


def test_schedule_warmup_and_steps_by_hand():
    """mmdetection's linear warm-up from ``warmup_ratio`` and step decay, values by hand."""
    s = Schedule(base_lr=0.1, warmup_iters=10, warmup_ratio=0.001, steps=[3, 5], gamma=0.1)
    assert s.lr(0, 0) == pytest.approx(0.1 * 0.001, rel=1e-12)
    # k = (1 - 5/10) * (1 - 0.001) = 0.4995 -> 0.1 * 0.5005
    assert s.lr(0, 5) == pytest.approx(0.05005, rel=1e-12)
    assert s.lr(0, 9) == pytest.approx(0.1 * (1 - 0.1 * 0.999), rel=1e-12)
    assert s.lr(0, 10) == 0.1 and s.lr(2, 500) == 0.1
    assert s.lr(3, 500) == pytest.approx(0.01, rel=1e-12)  # first step at epoch 3
    assert s.lr(4, 500) == pytest.approx(0.01, rel=1e-12)
    assert s.lr(5, 500) == pytest.approx(0.001, rel=1e-12)  # second step
    assert s.lr(11, 500) == pytest.approx(0.001, rel=1e-12)
    # warm-up scales the decayed lr when a step falls inside it
    assert s.lr(3, 5) == pytest.approx(0.01 * 0.5005, rel=1e-12)
    no_warmup = Schedule(0.02, 0, 0.001, [1], 0.5)
    assert no_warmup.lr(0, 0) == 0.02 and no_warmup.lr(1, 0) == 0.01

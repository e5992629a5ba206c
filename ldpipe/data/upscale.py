"""The teacher's input at ``f = 2^k`` x a student sample's (``cache.teacher_upscale``).

The student's sample is mmdetection's keep-ratio resize of the original image to ``(h, w)``,
flipped, normalised and padded to ``(Hp, Wp)`` (:func:`~ldpipe.data.transforms.make_sample`).
The teacher's input is the *original* image resized (bilinear, as ``mmcv.imrescale``) to
exactly ``(f h, f w)``, flipped, normalised the same way and padded to exactly ``(f Hp, f Wp)``:
the teacher's frame is the student's times ``f`` with no rounding (a keep-ratio resize at ``f``
x the scale may round a side by one pixel), and its padded shape is a multiple of
``f x data.pad_divisor``, so its level of stride ``f s`` has the student's stride-``s`` grid.
At ``f = 1`` it is the student's input tensor, bit for bit.
"""
from __future__ import annotations

import mmcv
import numpy as np
import torch

from ldpipe.config import DataConfig
from ldpipe.data.dataset import DetectionDataset, Pair
from ldpipe.data.decode import load_checked
from ldpipe.data.meta import SampleMeta
from ldpipe.data.transforms import make_sample


def teacher_input(image: np.ndarray, meta: SampleMeta, factor: int, d: DataConfig) -> torch.Tensor:
    """``[3, f Hp, f Wp]`` float32: the teacher's input for the student sample ``meta`` made
    from the BGR uint8 ``image`` (the decoded original)."""
    h, w = meta.img_shape
    img = mmcv.imresize(image, (w * factor, h * factor), interpolation="bilinear")
    if meta.flip:
        img = mmcv.imflip(img, direction="horizontal")
    img = mmcv.imnormalize(img, np.asarray(d.mean, dtype=np.float32),
                           np.asarray(d.std, dtype=np.float32), d.to_rgb)
    ph, pw = meta.pad_shape
    img = mmcv.impad(img, shape=(ph * factor, pw * factor), pad_val=0)
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32))


class UpscaledDataset(DetectionDataset):
    """A :class:`DetectionDataset` (no skipping: a dump needs every sample) whose samples also
    carry ``teacher_img``, the teacher's input at ``factor`` x (:func:`teacher_input`)."""

    def __init__(self, split, data: DataConfig, variants, factor: int) -> None:
        super().__init__(split, data, variants, skip_undecodable=False)
        self.factor = int(factor)

    def __getitem__(self, key: Pair | int) -> dict:
        index, vidx = (key, 0) if isinstance(key, int) else key
        record = self.split.records[index]
        image = load_checked(record.file_name, record.width, record.height)
        sample = make_sample(record, image, self.variants[vidx], self.data)
        sample["meta"] = sample["meta"].at(index, vidx)
        sample["teacher_img"] = teacher_input(image, sample["meta"], self.factor, self.data)
        return sample


__all__ = ["UpscaledDataset", "teacher_input"]

"""A map-style data set indexed by (image index, variant index), its samplers, collate.

The sampler, not the data set, decides which variant an image gets, so every
(image, variant) pair is addressable: the cache writer dumps all of them with a
:class:`FixedSampler`, and training draws one per image per epoch with a
:class:`VariantSampler`.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from ldpipe.config import DataConfig
from ldpipe.data.decode import UndecodableImage, load_checked
from ldpipe.data.meta import SampleMeta
from ldpipe.data.records import Split
from ldpipe.data.transforms import Variant, make_sample

log = logging.getLogger("ldpipe.data")

Pair = tuple[int, int]


class DetectionDataset(Dataset):
    """``dataset[(image_index, variant_index)]`` -> :func:`make_sample` output.

    ``extra(meta)`` (a :class:`~ldpipe.data.meta.SampleMeta`) may add keys to each sample (e.g. cached teacher targets).
    A plain ``int`` key means variant 0.  An image no decoder reads is an error naming it,
    or, with ``skip_undecodable`` (default: ``data.skip_undecodable_images``), the item
    ``{"skipped": file_name}``, which :func:`collate` leaves out of the batch and lists in
    its ``skipped`` entry.
    """

    def __init__(self, split: Split, data: DataConfig, variants: list[Variant],
                 extra: Callable[[SampleMeta], dict] | None = None,
                 skip_undecodable: bool | None = None) -> None:
        if not variants:
            raise ValueError("DetectionDataset needs at least one variant")
        self.split = split
        self.data = data
        self.variants = list(variants)
        self.extra = extra
        self.skip_undecodable = (data.skip_undecodable_images if skip_undecodable is None
                                 else skip_undecodable)

    def __len__(self) -> int:
        return len(self.split.records)

    def __getitem__(self, key: Pair | int) -> dict:
        index, vidx = (key, 0) if isinstance(key, int) else key
        record = self.split.records[index]
        try:
            image = load_checked(record.file_name, record.width, record.height)
        except UndecodableImage as exc:
            if not self.skip_undecodable:
                raise
            log.warning("skipping %s (data.skip_undecodable_images): %s", record.file_name, exc)
            return {"skipped": record.file_name}
        sample = make_sample(record, image, self.variants[vidx], self.data)
        sample["meta"] = sample["meta"].at(index, vidx)
        if self.extra is not None:
            sample.update(self.extra(sample["meta"]))
        return sample


class VariantSampler(Sampler):
    """Each epoch: every image once, a variant drawn uniformly (``by_epoch``: variant = the
    epoch), shuffled.

    Fully determined by ``(seed, epoch)`` and independent of the world size;
    rank ``r`` takes items ``r::world_size`` of the list padded (by repeating its
    start) to a multiple of ``world_size``, as :class:`DistributedSampler` does.
    """

    def __init__(self, num_images: int, num_variants: int, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, by_epoch: bool = False) -> None:
        if num_variants < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad sampler arguments: variants={num_variants} "
                             f"rank={rank} world_size={world_size}")
        self.num_images = num_images
        self.num_variants = num_variants
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.by_epoch = by_epoch  # the variant is the epoch (a view schedule of one view per epoch)
        self.epoch = 0
        self.num_samples = math.ceil(num_images / world_size) if num_images else 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def pairs(self) -> list[Pair]:
        """This epoch's (image, variant) list for all ranks, before sharding."""
        gen = torch.Generator()
        gen.manual_seed(self.seed + self.epoch)
        if self.shuffle:
            order = torch.randperm(self.num_images, generator=gen).tolist()
        else:
            order = list(range(self.num_images))
        # The variant is drawn per image (by image index), not per position.
        drawn = torch.randint(self.num_variants, (self.num_images,), generator=gen).tolist()
        if self.by_epoch:
            drawn = [self.epoch] * self.num_images
        return [(i, drawn[i]) for i in order]

    def __iter__(self) -> Iterator[Pair]:
        items = self.pairs()
        total = self.num_samples * self.world_size
        while items and len(items) < total:
            items += items[: total - len(items)]
        return iter(items[self.rank:total:self.world_size])

    def __len__(self) -> int:
        return self.num_samples


class FixedSampler(Sampler):
    """Yields given (image, variant) pairs in order; rank ``r`` takes ``r::world_size``
    (no padding, so ranks may differ by one item)."""

    def __init__(self, pairs: Sequence[Pair], rank: int = 0, world_size: int = 1) -> None:
        self.items = [(int(i), int(v)) for i, v in pairs][rank::world_size]

    def __iter__(self) -> Iterator[Pair]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


def collate(batch: list[dict]) -> dict:
    """Stack images (zero-padded bottom/right to the batch maximum); lists for the rest.

    Returns ``img`` ``[B, 3, H, W]``, ``gt_boxes`` / ``gt_labels`` / ``ignore_boxes``
    lists, ``metas`` (list of :class:`~ldpipe.data.meta.SampleMeta`), every other sample key as a list, and
    ``skipped``: the files of skipped (undecodable) items.  A batch of skipped items only
    is ``{"img": None, "metas": [], "skipped": [...]}``.
    """
    if not batch:
        raise ValueError("collate got an empty batch")
    skipped = [s["skipped"] for s in batch if "skipped" in s]
    batch = [s for s in batch if "skipped" not in s]
    if not batch:
        return {"img": None, "metas": [], "skipped": skipped}
    height = max(s["img"].shape[1] for s in batch)
    width = max(s["img"].shape[2] for s in batch)
    first = batch[0]["img"]
    img = first.new_zeros((len(batch), first.shape[0], height, width))
    for i, s in enumerate(batch):
        _, h, w = s["img"].shape
        img[i, :, :h, :w] = s["img"]
    out: dict = {"img": img, "metas": [s["meta"] for s in batch], "skipped": skipped}
    for key in batch[0]:
        if key not in ("img", "meta"):
            out[key] = [s[key] for s in batch]
    return out


__all__ = ["DetectionDataset", "FixedSampler", "VariantSampler", "collate"]

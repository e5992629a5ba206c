"""What a dump stores, sample by sample: the one schedule that ``dump-teacher`` writes and
``ldpipe cache plan`` counts, so that the two count the same thing.

Today's schedule is the plain one: every image of the split once in each variant of
:func:`~ldpipe.data.train_variants` (each ``data.train_scales`` entry x flip), sample ``s`` =
``image_index * num_variants + variant_index`` (:func:`~ldpipe.data.sample_number`).  Another
schedule (K seeded views per image, one view per image per epoch) is one more ``kind`` here
that says how many samples there are and which image each reads; the dump and the plan take
it from :func:`dump_schedule` alike.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from ..config import DataConfig
from .meta import sample_number, sample_pair
from .transforms import Variant, train_variants

ScheduleKind = Literal["variants"]


@dataclass(frozen=True)
class DumpSchedule:
    """The samples of one dump: ``num_images`` images x ``variants``."""

    kind: ScheduleKind
    num_images: int
    variants: tuple[Variant, ...]

    @property
    def num_variants(self) -> int:
        return len(self.variants)

    @property
    def num_samples(self) -> int:
        return self.num_images * self.num_variants

    def pair(self, sample: int) -> tuple[int, int]:
        """``(image index, variant index)`` of sample number ``sample``."""
        if not 0 <= sample < self.num_samples:
            raise IndexError(f"sample {sample} is not in 0..{self.num_samples - 1}")
        return sample_pair(sample, self.num_variants)

    def samples_of(self, images: Iterable[int]) -> list[int]:
        """The sample numbers that read the given image indices, ascending."""
        return sorted(int(sample_number(i, v, self.num_variants))
                      for i in set(images) for v in range(self.num_variants))

    def describe(self) -> str:
        """``"400 images x 2 variants (1 train scale x flip)"``."""
        scales = len({v.scale_idx for v in self.variants})
        flips = " x flip" if any(v.flip for v in self.variants) else ""
        return (f"{self.num_images} images x {self.num_variants} variants "
                f"({scales} train scale{'s' if scales != 1 else ''}{flips})")


def dump_schedule(data: DataConfig, num_images: int) -> DumpSchedule:
    """The schedule a dump of ``num_images`` images (a split's records) with ``data`` writes."""
    return DumpSchedule("variants", int(num_images), tuple(train_variants(data)))


__all__ = ["DumpSchedule", "ScheduleKind", "dump_schedule"]

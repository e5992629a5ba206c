"""Data path: annotations to records, mmdetection-equal geometry, data set and samplers."""
from ldpipe.data.meta import SampleGeometry, SampleMeta, sample_number, sample_pair
from ldpipe.data.dataset import DetectionDataset, FixedSampler, VariantSampler, collate
from ldpipe.data.records import DataError, Record, Split, load_split
from ldpipe.data.synth import synthesize
from ldpipe.data.transforms import (TEST_VARIANT, Variant, boxes_to_original, load_image,
                                    make_sample, padded_shape, train_variants, variant_scale)

__all__ = [
    "DataError", "DetectionDataset", "FixedSampler", "Record", "SampleGeometry", "SampleMeta",
    "Split", "TEST_VARIANT",
    "Variant", "VariantSampler", "boxes_to_original", "collate", "load_image",
    "load_split", "make_sample", "padded_shape", "sample_number", "sample_pair", "synthesize",
    "train_variants", "variant_scale",
]

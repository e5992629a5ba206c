"""The teacher/student detector: GFL on ResNet + FPN, and its targets and losses."""
from .detector import GFL, DenseOutput, build_model, load_detector
from .head_part import HeadPart
from .targets import BatchTargets, ImageTargets, PositiveSet, batch_targets, image_targets

__all__ = ["GFL", "BatchTargets", "DenseOutput", "HeadPart", "ImageTargets", "PositiveSet", "batch_targets",
           "build_model", "image_targets", "load_detector"]

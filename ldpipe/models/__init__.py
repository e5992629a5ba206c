"""The teacher/student detector: GFL on ResNet + FPN, and its targets and losses."""
from .detector import GFL, BatchTargets, batch_targets, build_model

__all__ = ["GFL", "BatchTargets", "batch_targets", "build_model"]

"""Detection metrics: COCO AP (pycocotools) and VOC mAP.  Standalone: imports nothing from ldpipe."""
from .coco import COCO_KEYS, build_coco_gt, coco_metrics, coco_results, write_results
from .report import evaluate, format_table
from .voc import voc_map

__all__ = ["COCO_KEYS", "build_coco_gt", "coco_metrics", "coco_results", "evaluate",
           "format_table", "voc_map", "write_results"]

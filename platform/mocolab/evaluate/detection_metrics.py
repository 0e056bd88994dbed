"""COCO-style detection AP with pycocotools, from in-memory ground truth and predictions.

All of mocolab's downstream metrics are **percentages** (0-100), as in the MoCo paper's tables:
``det_AP`` (COCO AP averaged over IoU 0.50:0.05:0.95), ``det_AP50`` and ``det_AP75``.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mocolab.data.detection import DetectionRecord
from mocolab.tracking.names import DETECTION_METRICS


def coco_ground_truth(records: Sequence[DetectionRecord], num_classes: int) -> COCO:
    """A pycocotools ``COCO`` index of ``records`` (crowd boxes marked ``iscrowd``)."""
    images, annotations = [], []
    for rec in records:
        images.append({"id": int(rec.image_id), "width": rec.width, "height": rec.height})
        for box, label, crowd in zip(rec.boxes, rec.labels, rec.crowd):
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": int(rec.image_id),
                    "category_id": int(label),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": int(crowd),
                }
            )
    coco = COCO()
    coco.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c} for c in range(1, num_classes + 1)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_ap(
    records: Sequence[DetectionRecord], predictions: dict[int, dict[str, np.ndarray]], num_classes: int
) -> dict[str, float]:
    """``{"det_AP", "det_AP50", "det_AP75"}`` in percent for ``predictions``: ``image_id -> {"boxes"
    [N, 4] x1y1x2y2, "scores" [N], "labels" [N]}`` against ``records``. No detections give 0."""
    detections = []
    for image_id, pred in predictions.items():
        for box, score, label in zip(pred["boxes"], pred["scores"], pred["labels"]):
            x1, y1, x2, y2 = (float(v) for v in box)
            detections.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(label),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(score),
                }
            )
    if not detections:
        return {name: 0.0 for name in DETECTION_METRICS}
    gt = coco_ground_truth(records, num_classes)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(detections)
        evaluator = COCOeval(gt, dt, iouType="bbox")
        evaluator.params.imgIds = [int(r.image_id) for r in records]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # stats[0..2] = AP@[.5:.95], AP@.5, AP@.75; -1 means "no ground truth to score against".
    return {name: max(float(v), 0.0) * 100.0 for name, v in zip(DETECTION_METRICS, evaluator.stats[:3])}

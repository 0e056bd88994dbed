"""COCO-style AP (percent) on hand-made cases with known answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mocolab.data.detection import DetectionRecord
from mocolab.evaluate.detection_metrics import coco_ap

GT_BOXES = np.array([[10, 10, 40, 40], [50, 50, 90, 90]], dtype=np.float32)


def _record(crowd=(False, False)) -> DetectionRecord:
    return DetectionRecord(1, Path("x.png"), 100, 100, GT_BOXES, np.array([1, 1]), np.array(crowd))


def _pred(boxes, scores, labels=None):
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return {1: {"boxes": boxes, "scores": np.asarray(scores), "labels": np.asarray(labels or [1] * len(boxes))}}


def test_perfect_predictions_give_100():
    assert coco_ap([_record()], _pred(GT_BOXES, [0.9, 0.8]), 1) == {
        "det_AP": 100.0,
        "det_AP50": 100.0,
        "det_AP75": 100.0,
    }


def test_one_of_two_boxes_found():
    # precision 1 up to recall 0.5, nothing beyond: 51 of COCO's 101 recall points -> 51/101
    result = coco_ap([_record()], _pred(GT_BOXES[:1], [0.9]), 1)
    for value in result.values():
        assert value == pytest.approx(100 * 51 / 101)


def test_iou_two_thirds_counts_up_to_threshold_0_65():
    # [10,10,40,55] vs [10,10,40,40]: IoU 900/1350 = 0.667 -> a hit at 0.50 .. 0.65 (4 of 10 thresholds)
    # The exact box scores higher, so above 0.65 the ranking is: hit, then a miss -> 51/101 as above.
    result = coco_ap([_record()], _pred([[10, 10, 40, 55], [50, 50, 90, 90]], [0.8, 0.9]), 1)
    assert result["det_AP50"] == pytest.approx(100.0)
    assert result["det_AP75"] == pytest.approx(100 * 51 / 101)
    assert result["det_AP"] == pytest.approx((4 * 100 + 6 * 100 * 51 / 101) / 10)


def test_wrong_class_and_no_detections_give_zero():
    record = DetectionRecord(1, Path("x.png"), 100, 100, GT_BOXES, np.array([1, 2]), np.array([False, False]))
    assert coco_ap([record], _pred(GT_BOXES, [0.9, 0.8], labels=[2, 1]), 2)["det_AP"] == 0.0
    assert coco_ap([record], {}, 2) == {"det_AP": 0.0, "det_AP50": 0.0, "det_AP75": 0.0}


def test_crowd_boxes_are_ignored():
    # the second box is "difficult": missing it costs nothing
    assert coco_ap([_record(crowd=(False, True))], _pred(GT_BOXES[:1], [0.9]), 1)["det_AP"] == pytest.approx(100.0)

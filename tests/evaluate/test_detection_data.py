"""Detection data: VOC and COCO-JSON readers on the shared raccoon set, box checks, the made digits set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mocolab.config import DetectionDataConfig
from mocolab.data.detection import (
    DetectionDataset,
    check_boxes,
    make_digits_voc,
    read_coco,
    read_detection_splits,
    read_voc,
    voc_classes,
)

RACCOON = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "raccoon-voc"
GREYSCALE = {"raccoon-150.jpg", "raccoon-152.jpg", "raccoon-161.jpg"}
needs_raccoon = pytest.mark.skipif(not RACCOON.is_dir(), reason="../shared/data/raccoon-voc not present")


@needs_raccoon
def test_voc_reader_counts_and_classes():
    classes = voc_classes(RACCOON)
    assert classes == ["raccoon"]
    train, val = read_voc(RACCOON, "train", classes), read_voc(RACCOON, "val", classes)
    assert (len(train), len(val)) == (160, 40)
    assert sum(len(r.labels) for r in train + val) == 217
    assert all((r.labels == 1).all() for r in train + val)


@needs_raccoon
def test_coco_reader_matches_voc():
    voc = read_voc(RACCOON, "train", ["raccoon"]) + read_voc(RACCOON, "val", ["raccoon"])
    coco_train, classes = read_coco(RACCOON / "JPEGImages", RACCOON / "coco_derived" / "instances_train.json")
    coco_val, _ = read_coco(RACCOON / "JPEGImages", RACCOON / "coco_derived" / "instances_val.json")
    assert classes == ["raccoon"] and (len(coco_train), len(coco_val)) == (160, 40)
    by_name = {r.path.name: r for r in voc}
    for rec in coco_train + coco_val:
        np.testing.assert_allclose(rec.boxes, by_name[rec.path.name].boxes)
    assert sum(len(r.labels) for r in coco_train + coco_val) == 217


@needs_raccoon
def test_greyscale_images_become_rgb():
    records = read_voc(RACCOON, "train", ["raccoon"]) + read_voc(RACCOON, "val", ["raccoon"])
    grey = [r for r in records if r.path.name in GREYSCALE]
    assert len(grey) == 3
    dataset = DetectionDataset(grey, ["raccoon"])
    for i, rec in enumerate(grey):
        image, target = dataset[i]
        assert image.shape == (3, rec.height, rec.width)
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert target["boxes"].shape == (len(rec.labels), 4)


@needs_raccoon
def test_config_splits_for_both_forms():
    voc = DetectionDataConfig(format="voc", root=RACCOON)
    coco = DetectionDataConfig(
        format="coco",
        root=RACCOON / "JPEGImages",
        train_json=RACCOON / "coco_derived" / "instances_train.json",
        val_json=RACCOON / "coco_derived" / "instances_val.json",
    )
    for cfg in (voc, coco):
        train, val, classes = read_detection_splits(cfg)
        assert (len(train), len(val), classes) == (160, 40, ["raccoon"])


def test_missing_coco_json_is_named(tmp_path):
    cfg = DetectionDataConfig(
        format="coco", root=tmp_path, train_json=tmp_path / "nope.json", val_json=tmp_path / "nope.json"
    )
    with pytest.raises(ValueError, match="eval.detection.data.train_json"):
        read_detection_splits(cfg)


def test_boxes_are_clipped_to_the_image():
    out = check_boxes(np.array([[-5, 2, 30, 50]]), width=20, height=40, where="x.xml")
    assert out.tolist() == [[0, 2, 20, 40]]


@pytest.mark.parametrize("box", [[10, 10, 10, 20], [10, 30, 20, 5], [25, 0, 30, 5]])
def test_empty_boxes_are_an_error_naming_the_file(box):
    with pytest.raises(ValueError, match=r"x\.xml: object 0 has an empty box"):
        check_boxes(np.array([box]), width=20, height=40, where="x.xml")


def test_bad_box_in_voc_file_is_refused(tmp_path):
    root = make_digits_voc(tmp_path / "voc", num_train=2, num_val=1)
    xml = root / "Annotations" / "val_00000.xml"
    text = xml.read_text()
    start = text.index("<xmax>") + len("<xmax>")
    xml.write_text(text[:start] + "-3" + text[text.index("</xmax>") :])
    with pytest.raises(ValueError, match="val_00000.xml: object 0 has an empty box"):
        read_voc(root, "val", voc_classes(root))


def test_made_digits_set_is_valid_voc(tmp_path):
    root = make_digits_voc(tmp_path / "digits", num_train=20, num_val=6, canvas=64)
    train, val, classes = read_detection_splits(DetectionDataConfig(root=root, made_digits=True))
    assert classes == [str(d) for d in range(10)] and (len(train), len(val)) == (20, 6)
    for rec in train + val:
        assert 1 <= len(rec.labels) <= 3
        assert (rec.boxes[:, 2] > rec.boxes[:, 0]).all() and (rec.boxes[:, 3] > rec.boxes[:, 1]).all()
        assert rec.boxes.min() >= 0 and rec.boxes.max() <= 64
    image, target = DetectionDataset(train, classes, train=True, hflip=True)[0]
    assert image.shape == (3, 64, 64) and target["labels"].min() >= 1
    # each box holds the digit's bright strokes
    x1, y1, x2, y2 = (int(v) for v in train[0].boxes[0])
    assert image[0, y1:y2, x1:x2].max() > 0.5 or image[0, :, 64 - x2 : 64 - x1].max() > 0.5


def test_made_digits_set_is_not_rewritten(tmp_path):
    root = make_digits_voc(tmp_path / "digits", num_train=3, num_val=2)
    marker = root / "ImageSets" / "Main" / "train.txt"
    before = marker.stat().st_mtime_ns
    make_digits_voc(root, num_train=3, num_val=2)
    assert marker.stat().st_mtime_ns == before

"""Detection data: Pascal VOC and COCO-JSON readers, box checks, and a made digits set in VOC layout.

Both readers produce the same :class:`DetectionRecord` list, so training and evaluation do not care
which layout the data came in. Conventions:

- boxes are ``[x1, y1, x2, y2]`` in pixels of the original image, as written in the files (VOC
  ``bndbox`` values as they are; COCO ``[x, y, w, h]`` becomes ``[x, y, x + w, y + h]``);
- labels are contiguous ``1..C`` (0 is Faster R-CNN's background); ``classes[label - 1]`` names them;
- box check (at read time, before any compute): coordinates outside the image are clipped to it;
  a box that is empty after clipping (``x2 <= x1`` or ``y2 <= y1``) is an error naming the file and
  the object, never silently dropped;
- VOC ``difficult`` objects and COCO ``iscrowd`` ones are kept as *crowd* boxes: not trained on,
  and ignored by COCOeval (a detection on them neither counts nor costs);
- greyscale (and palette/RGBA) images are converted to RGB when loaded.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

LABELS_FILE = "labels.txt"


@dataclass(frozen=True)
class DetectionRecord:
    """One annotated image: ``boxes [N, 4]`` float32 (x1, y1, x2, y2), ``labels [N]`` int64 in 1..C."""

    image_id: int
    path: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    crowd: np.ndarray


def check_boxes(boxes: np.ndarray, width: int, height: int, where: str) -> np.ndarray:
    """Clip ``[N, 4]`` boxes to the ``width x height`` image; raise ValueError naming ``where`` and the
    object index for a box that is empty after clipping."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    clipped = boxes.copy()
    clipped[:, 0::2] = clipped[:, 0::2].clip(0, width)
    clipped[:, 1::2] = clipped[:, 1::2].clip(0, height)
    empty = (clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])
    if empty.any():
        i = int(np.flatnonzero(empty)[0])
        raise ValueError(
            f"{where}: object {i} has an empty box {boxes[i].tolist()} (x1, y1, x2, y2) inside the "
            f"{width}x{height} image; fix or remove it in the annotation"
        )
    return clipped


def _record(image_id: int, path: Path, width: int, height: int, objects: list, where: str) -> DetectionRecord:
    boxes = check_boxes(np.array([o[0] for o in objects], dtype=np.float32), width, height, where)
    return DetectionRecord(
        image_id=image_id,
        path=path,
        width=width,
        height=height,
        boxes=boxes,
        labels=np.array([o[1] for o in objects], dtype=np.int64),
        crowd=np.array([o[2] for o in objects], dtype=bool),
    )


def _xml_text(node: ET.Element, tag: str, where: str) -> str:
    found = node.find(tag)
    if found is None or found.text is None:
        raise ValueError(f"{where}: missing <{tag}>; the file is not a Pascal VOC annotation")
    return found.text.strip()


def voc_classes(root: Path, classes: Sequence[str] | None = None) -> list[str]:
    """Class names of a VOC folder: ``classes`` if given, else ``labels.txt``, else every ``<name>`` in
    ``Annotations/`` sorted (the same list for every split)."""
    if classes:
        return list(classes)
    labels_file = root / LABELS_FILE
    if labels_file.is_file():
        return [line.strip() for line in labels_file.read_text().splitlines() if line.strip()]
    names = set()
    for xml_path in sorted((root / "Annotations").glob("*.xml")):
        names.update(n.text.strip() for n in ET.parse(xml_path).getroot().iter("name") if n.text)
    return sorted(names)


def read_voc(root: Path, split: str, classes: Sequence[str]) -> list[DetectionRecord]:
    """Records of ``ImageSets/Main/{split}.txt`` under a VOC ``root`` (``JPEGImages/``, ``Annotations/``)."""
    root = Path(root)
    split_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        raise ValueError(f"VOC split file {split_file} does not exist; check eval.detection.data.root and *_split")
    index = {name: i + 1 for i, name in enumerate(classes)}
    records = []
    for image_id, line in enumerate((s for s in split_file.read_text().splitlines() if s.strip()), start=1):
        stem = line.split()[0]
        xml_path = root / "Annotations" / f"{stem}.xml"
        if not xml_path.is_file():
            raise ValueError(f"{split_file} lists '{stem}' but {xml_path} does not exist")
        tree = ET.parse(xml_path).getroot()
        filename = tree.findtext("filename", default=f"{stem}.jpg").strip()
        path = root / "JPEGImages" / filename
        if not path.is_file():
            raise ValueError(f"{xml_path}: image {path} does not exist")
        size = tree.find("size")
        if size is not None and size.findtext("width"):
            width, height = (
                int(float(_xml_text(size, "width", str(xml_path)))),
                int(float(_xml_text(size, "height", str(xml_path)))),
            )
        else:
            with Image.open(path) as im:
                width, height = im.size
        objects = []
        for obj in tree.iter("object"):
            name = _xml_text(obj, "name", str(xml_path))
            if name not in index:
                raise ValueError(f"{xml_path}: class '{name}' is not in the class list {list(classes)}")
            box = obj.find("bndbox")
            if box is None:
                raise ValueError(f"{xml_path}: object '{name}' has no <bndbox>")
            coords = [float(_xml_text(box, k, str(xml_path))) for k in ("xmin", "ymin", "xmax", "ymax")]
            difficult = obj.findtext("difficult", default="0").strip() == "1"
            objects.append((coords, index[name], difficult))
        records.append(_record(image_id, path, width, height, objects, str(xml_path)))
    if not records:
        raise ValueError(f"VOC split file {split_file} lists no images")
    return records


def read_coco(image_dir: Path, json_path: Path) -> tuple[list[DetectionRecord], list[str]]:
    """Records and class names of a COCO ``instances_*.json``; ``file_name`` is relative to ``image_dir``.
    Categories map to labels ``1..C`` in order of their ids."""
    image_dir, json_path = Path(image_dir), Path(json_path)
    if not json_path.is_file():
        raise ValueError(f"COCO annotation file {json_path} does not exist; check eval.detection.data.*_json")
    data = json.loads(json_path.read_text())
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"{json_path}: no '{key}' list; the file is not COCO instances JSON")
    categories = sorted(data["categories"], key=lambda c: c["id"])
    label_of = {c["id"]: i + 1 for i, c in enumerate(categories)}
    objects: dict[int, list] = {img["id"]: [] for img in data["images"]}
    for ann in data["annotations"]:
        x, y, w, h = (float(v) for v in ann["bbox"])
        if ann["image_id"] not in objects or ann["category_id"] not in label_of:
            raise ValueError(f"{json_path}: annotation {ann.get('id')} names an unknown image or category")
        objects[ann["image_id"]].append(
            ([x, y, x + w, y + h], label_of[ann["category_id"]], bool(ann.get("iscrowd", 0)))
        )
    records = []
    for img in data["images"]:
        path = image_dir / img["file_name"]
        if not path.is_file():
            raise ValueError(f"{json_path}: image {path} does not exist; eval.detection.data.root is the image folder")
        where = f"{json_path} image {img['id']} ({img['file_name']})"
        records.append(_record(int(img["id"]), path, int(img["width"]), int(img["height"]), objects[img["id"]], where))
    if not records:
        raise ValueError(f"{json_path} lists no images")
    return records, [c["name"] for c in categories]


def load_rgb(path: Path) -> Image.Image:
    """The image at ``path`` as RGB (greyscale, palette and RGBA images are converted)."""
    with Image.open(path) as im:
        return im.convert("RGB")


class DetectionDataset(Dataset):
    """``(image [3, H, W] float in 0..1, target)`` pairs for torchvision detection models.

    ``target`` holds ``boxes``, ``labels`` (crowd boxes left out when ``train``), ``image_id``.
    ``hflip`` flips image and boxes with probability 0.5 (training augmentation)."""

    def __init__(
        self, records: Sequence[DetectionRecord], classes: Sequence[str], train: bool = False, hflip: bool = False
    ):
        self.records = list(records)
        self.classes = list(classes)
        self.train = train
        self.hflip = hflip

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        rec = self.records[i]
        image = np.asarray(load_rgb(rec.path))
        if image.shape[:2] != (rec.height, rec.width):
            raise ValueError(
                f"{rec.path}: image is {image.shape[1]}x{image.shape[0]} but its annotation says "
                f"{rec.width}x{rec.height}; fix the annotation's size"
            )
        keep = ~rec.crowd if self.train else np.ones(len(rec.labels), dtype=bool)
        boxes = rec.boxes[keep].copy()
        if self.hflip and random.random() < 0.5:
            image = image[:, ::-1]
            boxes[:, [0, 2]] = rec.width - boxes[:, [2, 0]]
        tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div_(255)
        target = {
            "boxes": torch.from_numpy(boxes).reshape(-1, 4),
            "labels": torch.from_numpy(rec.labels[keep]),
            "image_id": rec.image_id,
        }
        return tensor, target


def collate_detection(batch):
    """Detection batches stay lists: images differ in size."""
    return tuple(zip(*batch))


# ---------------------------------------------------------------------------------------------
# The made digits detection set (no download)


def make_digits_voc(
    root: Path,
    num_train: int = 300,
    num_val: int = 100,
    canvas: int = 64,
    max_digits: int = 3,
    min_scale: float = 1.5,
    max_scale: float = 3.0,
    seed: int = 0,
) -> Path:
    """Write a VOC-layout detection set to ``root``: scikit-learn's 8x8 digits, white on black,
    ``1..max_digits`` per ``canvas x canvas`` image at random scale (12-24 px by default, like the
    pretraining digits) and position without overlap, classes ``"0".."9"``; boxes are tight around the
    digit's strokes. Train and val images use disjoint digit samples. The set is written to a
    temporary folder and renamed into place; an existing ``root`` is left as it is. Returns ``root``."""
    from sklearn.datasets import load_digits

    root = Path(root)
    if root.is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    final, root = root, Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    images, targets = digits.images / 16.0, digits.target
    cut = int(len(images) * 0.75)
    rng = np.random.default_rng(seed)
    pools = {"train": np.arange(cut), "val": np.arange(cut, len(images))}
    for split, count in (("train", num_train), ("val", num_val)):
        stems = []
        for n in range(count):
            stem = f"{split}_{n:05d}"
            image, objects = _digit_canvas(images, targets, pools[split], rng, canvas, max_digits, min_scale, max_scale)
            Image.fromarray(image).save(root / "JPEGImages" / f"{stem}.png")
            (root / "Annotations" / f"{stem}.xml").write_text(_voc_xml(f"{stem}.png", canvas, objects))
            stems.append(stem)
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(stems) + "\n")
    (root / LABELS_FILE).write_text("\n".join(str(d) for d in range(10)) + "\n")
    try:
        os.rename(root, final)
    except OSError:  # another process made it first
        shutil.rmtree(root)
    return final


def _digit_canvas(images, targets, pool, rng, canvas, max_digits, min_scale, max_scale):
    out = np.zeros((canvas, canvas), dtype=np.uint8)
    taken = np.zeros((canvas, canvas), dtype=bool)
    objects = []
    for _ in range(int(rng.integers(1, max_digits + 1))):
        idx = int(rng.choice(pool))
        side = int(round(8 * rng.uniform(min_scale, max_scale)))
        side = min(side, canvas)
        patch = np.asarray(Image.fromarray((images[idx] * 255).astype(np.uint8)).resize((side, side), Image.BILINEAR))
        for _attempt in range(20):
            x, y = (int(v) for v in rng.integers(0, canvas - side + 1, size=2))
            if not taken[y : y + side, x : x + side].any():
                break
        else:
            continue
        taken[y : y + side, x : x + side] = True
        out[y : y + side, x : x + side] = np.maximum(out[y : y + side, x : x + side], patch)
        ys, xs = np.nonzero(patch > 40)
        objects.append((str(int(targets[idx])), (x + xs.min(), y + ys.min(), x + xs.max() + 1, y + ys.max() + 1)))
    return out, objects


def _voc_xml(filename: str, canvas: int, objects) -> str:
    parts = [
        f"<annotation><filename>{filename}</filename>",
        f"<size><width>{canvas}</width><height>{canvas}</height><depth>1</depth></size>",
    ]
    for name, (x1, y1, x2, y2) in objects:
        parts.append(
            f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
            f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        )
    parts.append("</annotation>\n")
    return "\n".join(parts)


def made_digits_root(data_cfg) -> Path:
    """Where the made digits set lives: ``root`` if given, else ``<tmp>/mocolab-digits-voc``."""
    return Path(data_cfg.root) if data_cfg.root is not None else Path(tempfile.gettempdir()) / "mocolab-digits-voc"


def check_detection_data(data_cfg) -> None:
    """Fail before compute when ``eval.detection.data`` cannot be read (names the field and the fix)."""
    if data_cfg.made_digits:
        if data_cfg.format != "voc":
            raise ValueError("eval.detection.data.made_digits=true writes VOC layout; set format: voc")
        return
    if data_cfg.root is None:
        raise ValueError(
            "eval.detection.data.root is required: the VOC folder or the COCO image folder "
            "(or set made_digits: true for the made digits set)"
        )
    if not Path(data_cfg.root).is_dir():
        raise ValueError(f"eval.detection.data.root={data_cfg.root} does not exist or is not a folder; fix the path")
    if data_cfg.format == "coco":
        for key in ("train_json", "val_json"):
            value = getattr(data_cfg, key)
            if value is None or not Path(value).is_file():
                raise ValueError(
                    f"eval.detection.data.{key}={value} is not a file; format=coco needs the instances JSON "
                    "of each split (root is the image folder)"
                )


def read_detection_splits(data_cfg) -> tuple[list[DetectionRecord], list[DetectionRecord], list[str]]:
    """``(train records, val records, class names)`` for an ``eval.detection.data`` section
    (the made digits set is written first when ``made_digits`` is set)."""
    check_detection_data(data_cfg)
    root = made_digits_root(data_cfg) if data_cfg.made_digits else Path(data_cfg.root)
    if data_cfg.made_digits:
        make_digits_voc(root)
    if data_cfg.format == "coco":
        train, classes = read_coco(root, data_cfg.train_json)
        val, val_classes = read_coco(root, data_cfg.val_json)
        if val_classes != classes:
            raise ValueError(
                f"{data_cfg.train_json} and {data_cfg.val_json} have different categories ({classes} vs {val_classes})"
            )
        return train, val, classes
    classes = voc_classes(root, data_cfg.classes)
    return read_voc(root, data_cfg.train_split, classes), read_voc(root, data_cfg.val_split, classes), classes

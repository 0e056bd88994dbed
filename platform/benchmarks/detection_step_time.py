"""CPU seconds per fine-tuning image of ``eval.detection``'s small_cnn Faster R-CNN (one level, 64 RoIs, one
thread), at two image sizes: the calibration of ``mocolab.reproduce.estimate.detection_seconds``.

    PYTHONPATH=platform python platform/benchmarks/detection_step_time.py
"""

import time

import torch

from mocolab.config import DetectionConfig, ModelConfig
from mocolab.evaluate.detection import build_detector

SIZES = [(64, 64, [8, 16, 32, 64]), (96, 128, [16, 32, 64, 96])]  # the two detection claims' sizes
BATCH, WARMUP, STEPS = 4, 3, 10


def seconds_per_image(height: int, width: int, anchors: list[int]) -> float:
    det = DetectionConfig(
        fpn=False, bn="train", min_size=min(height, width), max_size=max(height, width), anchor_sizes=anchors,
        roi_batch_size=64, test_proposals=50,
    )  # fmt: skip
    model, _ = build_detector(ModelConfig(arch="small_cnn", bn="plain"), det, num_classes=10)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    images = [torch.rand(3, height, width) for _ in range(BATCH)]
    box = torch.tensor([[4.0, 4.0, width / 2, height / 2]])
    targets = [{"boxes": box, "labels": torch.tensor([1])} for _ in range(BATCH)]
    for step in range(WARMUP + STEPS):
        if step == WARMUP:
            start = time.process_time()  # CPU time: load from other processes does not inflate it
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (time.process_time() - start) / (STEPS * BATCH)


if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.manual_seed(0)
    for height, width, anchors in SIZES:
        print(f"{height}x{width} px: {seconds_per_image(height, width, anchors):.4f} CPU s per image")

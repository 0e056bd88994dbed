"""Detection transfer: torchvision Faster R-CNN on a mocolab backbone, fine-tuned by Ray Train workers.

Detector layouts (``eval.detection.fpn`` and ``model.arch``):

- ``fpn`` (default, ResNets): ``conv1..layer4`` feed a feature pyramid (torchvision's
  ``_resnet_fpn_extractor``), RoIAlign 7x7 on the pyramid, two-FC box head;
- ``c4`` (``fpn: false``, ResNets; the MoCo paper's R50-C4): ``conv1..layer3`` is the backbone
  (stride 16), RoIAlign 14x14, ``layer4`` + global average pooling is the box head;
- ``single`` (``small_cnn``, ``fpn: false``): its four conv blocks (stride 8) are the backbone, RoIAlign
  7x7, a two-FC box head of width 256.

BN (``eval.detection.bn``), the same for every init so that random init, supervised and MoCo compare fairly:
``sync`` (default; the paper's SyncBN) fine-tunes every BatchNorm with the statistics of the global batch
(torch SyncBatchNorm on GPU, :class:`mocolab.moco.norm.AllReduceBatchNorm2d` over gloo on CPU; plain
BatchNorm2d on one worker); ``train`` uses each worker's batch; ``frozen`` turns every BatchNorm into
torchvision's FrozenBatchNorm2d with the loaded statistics, which for a random-init backbone (mean 0,
var 1) is no normalisation at all. Anchor sizes are ``anchor_sizes`` or scale with ``min_size / 800``
(the paper's images are 800 px; at 800 they are torchvision's 32..512). Iterations, batch size per
worker and lr are as configured: the global batch is ``batch_size x num_workers`` and lr is not
rescaled (the paper: 0.02 for 16 images). Schedule: linear warm-up from ``warmup_factor x lr`` over
``warmup_iters`` iterations, then x0.1 at each milestone; ``clip_grad_norm`` caps the global gradient norm.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import FrozenBatchNorm2d

from mocolab.config import Config, ConfigError, DetectionConfig, ModelConfig
from mocolab.console import StepProgress, console
from mocolab.moco.norm import to_allreduce_batchnorm

BASE_ANCHORS = (32, 64, 128, 256, 512)
TRAINABLE_ORDER = ("layer4", "layer3", "layer2", "layer1", "conv1")
SMALL_HEAD_DIM = 256  # small_cnn's two-FC box head width (torchvision's 1024 is costly on a CPU)


def detector_layout(model_cfg: ModelConfig, det: DetectionConfig) -> str:
    """``fpn``, ``c4`` or ``single`` (see the module docstring)."""
    if model_cfg.arch == "small_cnn":
        return "single"
    return "fpn" if det.fpn else "c4"


def check_detection(cfg: Config, model_cfg: ModelConfig, det: DetectionConfig) -> None:
    """Refuse, before compute, a detection setup that cannot run (naming the field and the fix)."""
    if model_cfg.arch.startswith("timm:"):
        raise ConfigError(
            f"model.arch={model_cfg.arch}: detection transfer builds its Faster R-CNN on small_cnn and torchvision "
            "ResNets only (no feature pyramid for timm backbones or ViTs); evaluate it with mocolab lincls instead"
        )
    if det.min_size > det.max_size:
        raise ConfigError(f"eval.detection.min_size={det.min_size} is above max_size={det.max_size}")
    if any(not 0 < m < 1 for m in det.milestones) or det.milestones != sorted(det.milestones):
        raise ConfigError(f"eval.detection.milestones={det.milestones} must be increasing fractions in (0, 1)")
    if det.warmup_iters > det.iterations:
        raise ConfigError(
            f"eval.detection.warmup_iters={det.warmup_iters} is longer than the run (iterations={det.iterations}): "
            "the lr would never reach eval.detection.lr; lower warmup_iters"
        )
    if det.anchor_sizes and detector_layout(model_cfg, det) == "fpn" and len(det.anchor_sizes) != len(BASE_ANCHORS):
        raise ConfigError(
            f"eval.detection.anchor_sizes={det.anchor_sizes}: the FPN has {len(BASE_ANCHORS)} levels, one size each; "
            "give 5 sizes or leave it unset"
        )
    if model_cfg.arch == "small_cnn" and not det.fpn:
        return
    if model_cfg.arch == "small_cnn":
        raise ConfigError(
            "model.arch=small_cnn has a single feature level (stride 8), no pyramid: set eval.detection.fpn=false "
            "(a single-level Faster R-CNN) or use a ResNet"
        )


def anchor_sizes(det: DetectionConfig) -> tuple[int, ...]:
    """``det.anchor_sizes``, else torchvision's (32..512 at 800 px) scaled to ``det.min_size``, at least 4 px
    (the single-level layout then uses the first four)."""
    if det.anchor_sizes:
        return tuple(det.anchor_sizes)
    scale = det.min_size / 800
    return tuple(max(4, int(round(s * scale))) for s in BASE_ANCHORS)


def lr_factor(iteration: int, det: DetectionConfig) -> float:
    """Multiplier of ``det.lr`` at ``iteration`` (0-based), detectron2's WarmupMultiStepLR: linear warm-up
    from ``det.warmup_factor`` over ``det.warmup_iters`` iterations, x0.1 at each milestone fraction of
    ``det.iterations``."""
    decay = 0.1 ** sum(iteration >= int(m * det.iterations) for m in det.milestones)
    if iteration < det.warmup_iters:
        alpha = iteration / det.warmup_iters
        return decay * (det.warmup_factor * (1 - alpha) + alpha)
    return decay


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d (and subclass) by FrozenBatchNorm2d holding its affine and statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


def _set_trainable(trunk: nn.Module, trainable_layers: int, layout: str) -> None:
    """Freeze the stem and the first ResNet stages as torchvision does (``trainable_layers`` = how many
    of layer4, layer3, layer2, layer1, conv1 train); small_cnn trains its last ``trainable_layers`` blocks."""
    if layout == "single":
        blocks = list(trunk.features)
        for block in blocks[: max(0, len(blocks) - trainable_layers)]:
            block.requires_grad_(False)
        return
    train = TRAINABLE_ORDER[:trainable_layers] + (("bn1",) if trainable_layers == 5 else ())
    for name, param in trunk.named_parameters():
        if not name.startswith(train):
            param.requires_grad_(False)


class Res5BoxHead(nn.Module):
    """The C4 box head: ResNet ``layer4`` on the 14x14 RoI features, then global average pooling."""

    def __init__(self, layer4: nn.Module):
        super().__init__()
        self.layer4 = layer4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.layer4(x), 1), 1)


class SingleLevelBackbone(nn.Module):
    """One feature map ``{"0": body(x)}`` with ``out_channels`` (what FasterRCNN expects)."""

    def __init__(self, body: nn.Module, out_channels: int):
        super().__init__()
        self.body = body
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        out = self.body(x)
        return out if isinstance(out, dict) else OrderedDict([("0", out)])


def _channels(block: nn.Module) -> int:
    return [m for m in block.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


def build_detector(
    model_cfg: ModelConfig, det: DetectionConfig, num_classes: int, use_gpu: bool = False
) -> tuple[nn.Module, str]:
    """A Faster R-CNN with a randomly initialised mocolab backbone trunk; ``num_classes`` excludes the
    background; BN per ``det.bn`` (``sync``: torch SyncBatchNorm with ``use_gpu``, else
    AllReduceBatchNorm2d). Returns ``(model, layout)``; load weights with :func:`load_backbone_into_detector`
    (BN statistics and affine load into either BN class)."""
    from mocolab.data.augment import NORMALIZE
    from mocolab.moco.backbones import build_backbone

    layout = detector_layout(model_cfg, det)
    trunk, _ = build_backbone(model_cfg.model_copy(update={"bn": "plain", "channels_last": False}))
    if det.bn == "frozen":
        freeze_batchnorm(trunk)
    _set_trainable(trunk, det.trainable_layers, layout)
    sizes = anchor_sizes(det)
    common = dict(
        min_size=det.min_size,
        max_size=det.max_size,
        image_mean=list(NORMALIZE["mean"]),
        image_std=list(NORMALIZE["std"]),
        box_batch_size_per_image=det.roi_batch_size,
        rpn_post_nms_top_n_test=det.test_proposals,
        rpn_pre_nms_top_n_test=max(det.test_proposals, 1000),
    )
    if layout == "fpn":
        backbone = _resnet_fpn_extractor(trunk, trainable_layers=5)  # freezing was done above
        anchors = AnchorGenerator(tuple((s,) for s in sizes), ((0.5, 1.0, 2.0),) * len(sizes))
        model = FasterRCNN(backbone, num_classes=num_classes + 1, rpn_anchor_generator=anchors, **common)
    elif layout == "c4":
        body = IntermediateLayerGetter(trunk, return_layers={"layer3": "0"})  # conv1 .. layer3
        backbone = SingleLevelBackbone(body, _channels(trunk.layer3))
        head = Res5BoxHead(trunk.layer4)
        model = FasterRCNN(
            backbone,
            rpn_anchor_generator=AnchorGenerator((sizes,), ((0.5, 1.0, 2.0),)),
            box_roi_pool=MultiScaleRoIAlign(["0"], output_size=14, sampling_ratio=0),
            box_head=head,
            box_predictor=FastRCNNPredictor(_channels(trunk.layer4), num_classes + 1),
            **common,
        )
    else:
        channels = _channels(trunk.features)
        backbone = SingleLevelBackbone(nn.Sequential(OrderedDict(features=trunk.features)), channels)
        model = FasterRCNN(
            backbone,
            rpn_anchor_generator=AnchorGenerator((sizes if det.anchor_sizes else sizes[:4],), ((0.5, 1.0, 2.0),)),
            box_roi_pool=MultiScaleRoIAlign(["0"], output_size=7, sampling_ratio=0),
            box_head=TwoMLPHead(channels * 7 * 7, SMALL_HEAD_DIM),
            box_predictor=FastRCNNPredictor(SMALL_HEAD_DIM, num_classes + 1),
            **common,
        )
    if det.bn == "sync":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model) if use_gpu else to_allreduce_batchnorm(model)
    return model, layout


def to_detector_keys(backbone_state: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Rename a mocolab ``backbone.pt`` (torchvision names: ``conv1.weight``, ``layer4.1.bn2.bias``;
    small_cnn: ``features.*``) to the detector's names: ``backbone.body.*``, and for the C4 layout
    ``layer4.*`` -> ``roi_heads.box_head.layer4.*``. ``fc.*`` is dropped."""
    out = {}
    for key, value in backbone_state.items():
        if key.startswith("fc."):
            continue
        if layout == "c4" and key.startswith("layer4."):
            out["roi_heads.box_head." + key] = value
        else:
            out["backbone.body." + key] = value
    return out


def from_detector_keys(detector_state: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_detector_keys`: the backbone trunk's entries of a detector ``state_dict``."""
    out = {}
    for key, value in detector_state.items():
        if key.startswith("backbone.body."):
            out[key.removeprefix("backbone.body.")] = value
        elif layout == "c4" and key.startswith("roi_heads.box_head.layer4."):
            out[key.removeprefix("roi_heads.box_head.")] = value
    return out


def load_backbone_into_detector(detector: nn.Module, backbone_state: dict[str, torch.Tensor], layout: str) -> None:
    """Load a backbone ``state_dict`` into the detector's trunk. Every trunk entry must be filled and
    every weight used; BN ``num_batches_tracked`` counters are dropped where BN is frozen."""
    target = set(from_detector_keys(detector.state_dict(), layout))
    converted = to_detector_keys(backbone_state, layout)
    converted = {
        k: v for k, v in converted.items() if not (k.endswith("num_batches_tracked") and k not in detector.state_dict())
    }
    given = set(from_detector_keys(converted, layout))
    missing, unexpected = sorted(target - given), sorted(given - target)
    if missing or unexpected:
        raise ConfigError(
            f"the backbone weights do not fit the detector's {layout} trunk: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}; set model.arch / model.cifar_stem to the architecture the weights were trained with"
        )
    result = detector.load_state_dict(converted, strict=False)
    if result.unexpected_keys:
        raise ConfigError(f"detector refused backbone keys {result.unexpected_keys[:5]}")


def clip_gradients(params: list[nn.Parameter], max_norm: float | None) -> float:
    """The global L2 norm of the gradients of ``params`` before clipping; with ``max_norm``
    (``eval.detection.clip_grad_norm``) the gradients are scaled down so that their global norm is at most it."""
    total = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)


def _batches(loader, sampler) -> Any:
    """Endless iteration over the loader, a new shuffle per pass."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


@torch.no_grad()
def predict(
    model: nn.Module, dataset, indices, device: torch.device, batch_size: int
) -> dict[int, dict[str, np.ndarray]]:
    """``image_id -> {"boxes", "scores", "labels"}`` (numpy) for the images at ``indices``."""
    model.eval()
    out = {}
    for start in range(0, len(indices), batch_size):
        items = [dataset[i] for i in indices[start : start + batch_size]]
        results = model([image.to(device) for image, _ in items])
        for (_, target), res in zip(items, results):
            out[int(target["image_id"])] = {k: res[k].cpu().numpy() for k in ("boxes", "scores", "labels")}
    return out


def _loss_parts(losses: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{k.removeprefix('loss_')} {v.item():.4g}" for k, v in losses.items())


def detection_train_loop(config: dict[str, Any]) -> dict[str, float]:
    """Fine-tune and evaluate the detector on this Ray Train worker; rank 0 returns the AP metrics
    (percent) and timings. Rank 0 logs ``iter_loss`` (mean over workers), ``iter_loss_<part>`` (its own),
    ``iter_lr`` and ``iter_grad_norm`` (before clipping) to the MLflow run every tenth of the run. A NaN/inf loss on any
    worker stops every worker at that iteration (``train/nonfinite.py``) and returns no metrics."""
    import ray.train.torch
    from torch.utils.data import DataLoader, DistributedSampler

    from mocolab import tracking
    from mocolab.data.detection import DetectionDataset, collate_detection, read_detection_splits
    from mocolab.evaluate.detection_metrics import coco_ap
    from mocolab.runtime import start_worker
    from mocolab.train.nonfinite import INJECT_NAN_STEP_KEY, LossGuard

    worker = start_worker(config, seed=config["config"]["eval"]["detection"]["seed"])
    cfg, rank, world, device = worker.cfg, worker.rank, worker.world_size, worker.device
    det = cfg.eval.detection
    source = config["source"]
    run_id, uri = config["mlflow_run_id"], cfg.tracking.tracking_uri

    train_records, val_records, classes = read_detection_splits(det.data)
    model, layout = build_detector(source.model, det, len(classes), use_gpu=cfg.scaling.use_gpu)
    if source.state is not None:
        load_backbone_into_detector(model, source.state, layout)
    model = model.to(device)
    ddp_model = ray.train.torch.prepare_model(model) if world > 1 else model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=det.lr, momentum=det.momentum, weight_decay=det.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, det))
    client = tracking.client_for(uri) if rank == 0 else None

    train_set = DetectionDataset(train_records, classes, train=True, hflip=True)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=det.seed)
    loader = DataLoader(train_set, batch_size=det.batch_size, sampler=sampler, collate_fn=collate_detection)
    started = time.perf_counter()
    model.train()
    log_every = max(1, det.iterations // 10)
    bar = StepProgress("detect", det.iterations, active=worker.is_chief)
    guard = LossGuard(bar, world, rank, config.get(INJECT_NAN_STEP_KEY), uri, run_id)
    for step, (images, targets) in zip(range(1, det.iterations + 1), _batches(loader, sampler)):
        images = [im.to(device) for im in images]
        targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
        losses = ddp_model(images, targets)
        loss = sum(losses.values())
        mean_loss = guard.mean(
            loss, step, lambda v: f"loss {v} at iteration {step}/{det.iterations} (worker 0: {_loss_parts(losses)})"
        )
        if mean_loss is None:
            return {}  # every rank returns here: a clean end, which Ray does not retry
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = clip_gradients(params, det.clip_grad_norm)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        bar.step(len(images) * world, mean_loss, lr)
        scheduler.step()
        if step == det.iterations:
            bar.close()  # the last line comes after the finished bar; earlier ones print above it
        if client is not None and (step % log_every == 0 or step == det.iterations):
            metrics = {"iter_loss": mean_loss, "iter_lr": lr, "iter_grad_norm": grad_norm}
            metrics.update({f"iter_{k}": v.item() for k, v in losses.items()})
            tracking.log_metrics(client, run_id, metrics, step=step)
            console(
                f"[mocolab detect] iter {step}/{det.iterations} loss {mean_loss:.3f} (worker 0: {_loss_parts(losses)}) "
                f"lr {lr:.4g} grad norm {grad_norm:.3g}"
            )
    train_s = time.perf_counter() - started

    started = time.perf_counter()
    val_set = DetectionDataset(val_records, classes)
    predictions = predict(model, val_set, list(range(rank, len(val_set), world)), device, det.batch_size)
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, predictions)
        predictions = {k: v for part in gathered for k, v in part.items()}
    if not worker.is_chief:
        return {}  # rank 0's return value is the result
    metrics = {**coco_ap(val_records, predictions, len(classes)), "det_train_s": train_s}
    metrics["det_eval_s"] = time.perf_counter() - started
    return metrics

"""The MoCo module: one ``forward`` does the whole step's math for every ``moco.mechanism``."""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from mocolab.moco.backbones import backbone_state_dict, build_backbone, resolve_channels_last
from mocolab.moco.dictionary import LOSS_RANGE, QUEUE_UPDATE_RANGE, build_dictionary
from mocolab.moco.distributed import shuffle_across_workers, unshuffle_across_workers, world_size
from mocolab.moco.functional import infonce_loss, momentum_update_

# torch.profiler ranges of the step's phases, phase -> range name (``mocolab bench`` breaks the step down by them).
PHASES = {
    "query_forward": "mocolab.query_forward",
    "momentum_update": "mocolab.momentum_update",
    "shuffle_gather": "mocolab.shuffle_gather",
    "key_forward": "mocolab.key_forward",
    "loss": LOSS_RANGE,
    "queue_update": QUEUE_UPDATE_RANGE,
}


class MocoOutput(NamedTuple):
    """What a step returns: the loss to backpropagate, the logits ``[rows, 1 + K]`` (positive at column 0; rows
    = batch, twice the batch with ``moco.symmetric``) and their labels (zeros)."""

    loss: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor


class Encoder(nn.Module):
    """Backbone + projection head (linear for v1, ``feat -> feat -> dim`` MLP for v2), L2-normalised output."""

    def __init__(self, backbone: nn.Module, feat_dim: int, dim: int, mlp: bool) -> None:
        super().__init__()
        self.backbone = backbone
        if mlp:
            self.head = nn.Sequential(nn.Linear(feat_dim, feat_dim), nn.ReLU(inplace=True), nn.Linear(feat_dim, dim))
        else:
            self.head = nn.Linear(feat_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(x)), dim=1)


def _recollect_momentum_params(module: "MoCo", _incompatible_keys) -> None:
    module._collect_momentum_params()


class MoCo(nn.Module):
    """MoCo pretraining model for ``cfg`` (a :class:`mocolab.config.Config`) over ``num_train_samples`` images.

    ``encoder_q`` is trained by the optimizer. The keys come, per ``moco.mechanism``, from ``encoder_k`` (moco:
    a frozen copy of ``encoder_q`` updated only by momentum), from ``encoder_q`` without gradient (memory_bank,
    as InstDisc) or from ``encoder_q`` with gradient (end_to_end). With ``model.bn`` shuffle (several workers) or
    split (bn_splits > 1), the key batch is shuffled before its encoder and unshuffled after, so that a key is
    normalised with other samples than its query was (shuffling BN): BN statistics cannot give the positive
    away. ``dictionary`` holds the queue or the bank (see dictionary.py).
    """

    def __init__(self, cfg, num_train_samples: int) -> None:
        super().__init__()
        self.mechanism = cfg.moco.mechanism
        self.temperature = cfg.moco.temperature
        self.momentum = cfg.moco.momentum
        self.symmetric = cfg.moco.symmetric
        # plain and sync are the no-shuffle ablations; split with one split is plain BN
        self.shuffle_keys = cfg.model.bn == "shuffle" or (cfg.model.bn == "split" and cfg.model.bn_splits > 1)
        self.needs_workers = cfg.model.bn == "shuffle"
        self.channels_last = resolve_channels_last(cfg.model, cfg.scaling.use_gpu)
        backbone, feat_dim = build_backbone(cfg.model, use_gpu=cfg.scaling.use_gpu)
        self.encoder_q = Encoder(backbone, feat_dim, cfg.moco.dim, cfg.moco.use_mlp)
        if self.mechanism == "moco":
            self.encoder_k = copy.deepcopy(self.encoder_q)
            self.encoder_k.requires_grad_(False)
            self._collect_momentum_params()
            self.register_load_state_dict_post_hook(_recollect_momentum_params)
        self.dictionary = build_dictionary(cfg, num_train_samples)
        if cfg.model.compile:
            self.encoder_q.compile()
            if self.mechanism == "moco":
                self.encoder_k.compile()

    def _collect_momentum_params(self) -> None:
        """The parameter lists of the momentum update, built once (again after a load that assigns tensors)."""
        self._momentum_target = list(self.encoder_k.parameters())
        self._momentum_source = list(self.encoder_q.parameters())

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor, index: torch.Tensor) -> MocoOutput:
        """One step's math: queries, momentum update, keys (shuffle-BN), InfoNCE loss, dictionary update.

        ``im_q``, ``im_k``: the two crops ``[B, 3, H, W]``; ``index``: the samples' dataset indices ``[B]``
        (used by memory_bank)."""
        if self.needs_workers and world_size() < 2:
            raise RuntimeError(
                "model.bn=shuffle shuffles keys across workers but this process group has one worker; "
                "use scaling.num_workers >= 2, or model.bn=split on one worker"
            )
        if self.channels_last:
            im_q = im_q.contiguous(memory_format=torch.channels_last)
            im_k = im_k.contiguous(memory_format=torch.channels_last)
        crops = (im_q, im_k)
        directions = ((0, 1), (1, 0)) if self.symmetric else ((0, 1),)
        with record_function(PHASES["query_forward"]):
            queries = [self.encoder_q(crops[q]) for q, _ in directions]
        keys = self._encode_keys([crops[k] for _, k in directions])
        with torch.autocast(im_q.device.type, enabled=False):  # logits in fp32 against the fp32 dictionary
            logits, labels = self.dictionary(
                [q.float() for q in queries], [k.float() for k in keys], index, self.temperature
            )
            with record_function(PHASES["loss"]):
                loss = infonce_loss(logits, labels)
        return MocoOutput(loss, logits, labels)

    def _encode_keys(self, crops: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.mechanism == "end_to_end":
            return [self._key_pass(self.encoder_q, crop) for crop in crops]
        with torch.no_grad():
            if self.mechanism == "moco":
                with record_function(PHASES["momentum_update"]):
                    momentum_update_(self._momentum_target, self._momentum_source, self.momentum)
                return [self._key_pass(self.encoder_k, crop) for crop in crops]
            return [self._key_pass(self.encoder_q, crop) for crop in crops]

    def _key_pass(self, encoder: nn.Module, crop: torch.Tensor) -> torch.Tensor:
        if not self.shuffle_keys:
            with record_function(PHASES["key_forward"]):
                return encoder(crop)
        with record_function(PHASES["shuffle_gather"]):
            shuffled, unshuffle = shuffle_across_workers(crop)
            if self.channels_last:
                shuffled = shuffled.contiguous(memory_format=torch.channels_last)
        with record_function(PHASES["key_forward"]):
            keys = encoder(shuffled)
        with record_function(PHASES["shuffle_gather"]):
            return unshuffle_across_workers(keys, unshuffle)

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The query encoder's backbone weights with torchvision key names (see backbones.backbone_state_dict)."""
        return backbone_state_dict(self.encoder_q.backbone)

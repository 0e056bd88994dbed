"""The MoCo module: one ``forward`` does the whole step's math for every ``moco.mechanism``."""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from mocolab.moco.backbones import backbone_state_dict, build_backbone, resolve_channels_last
from mocolab.moco.distributed import shuffle_across_workers, unshuffle_across_workers
from mocolab.moco.functional import infonce_loss, momentum_update_
from mocolab.moco.mechanisms import build_dictionary
from mocolab.moco.mechanisms.base import DictionarySettings, KeySource, Mechanism
from mocolab.moco.mechanisms.queue import LOSS_RANGE, QUEUE_UPDATE_RANGE
from mocolab.moco.norm import sync_batchnorm
from mocolab.moco.v3_heads import v3_heads

# torch.profiler ranges of the step's phases, phase -> range name (``mocolab bench`` breaks the step down by them).
PHASES = {
    "query_forward": "mocolab.query_forward",
    "momentum_update": "mocolab.momentum_update",
    "shuffle": "mocolab.shuffle",
    "key_forward": "mocolab.key_forward",
    "loss": LOSS_RANGE,
    "queue_update": QUEUE_UPDATE_RANGE,
}


class MocoOutput(NamedTuple):
    """What a step returns: the loss to backpropagate, the logits ``[rows, 1 + K]`` (rows = batch, twice the batch
    with ``moco.symmetric``) and their labels (the positive's column: 0, or for v3 the own key's global row)."""

    loss: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor


class Encoder(nn.Module):
    """Backbone + projection head (linear for v1, ``feat -> feat -> dim`` MLP for v2, or the ``head`` given: v3's
    projector), L2-normalised output."""

    def __init__(self, backbone: nn.Module, feat_dim: int, dim: int, mlp: bool, head: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        if head is not None:
            self.head = head
        elif mlp:
            self.head = nn.Sequential(nn.Linear(feat_dim, feat_dim), nn.ReLU(inplace=True), nn.Linear(feat_dim, dim))
        else:
            self.head = nn.Linear(feat_dim, dim)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The head's output, not normalised."""
        return self.head(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.embed(x), dim=1)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32 if autocast made it fp16/bf16; fp32 and fp64 (the exactness tests) unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _recollect_momentum_params(module: MoCo, _incompatible_keys) -> None:
    module._collect_momentum_params()


class MoCo(nn.Module):
    """MoCo pretraining model: a query encoder trained by the optimizer and a contrastive ``dictionary``
    (a :class:`~mocolab.moco.mechanisms.base.Mechanism`) whose ``key_source`` decides the key pass: a momentum
    encoder ``encoder_k`` (a frozen copy of ``encoder_q`` moved only by momentum), the query encoder with
    gradient (end-to-end), or none (keys stored in the dictionary, memory bank).

    ``shuffle_keys``: shuffle the key batch before its encoder and unshuffle after (across the workers of the
    process group; on one process within the batch), so that a key is normalised with other samples than its
    query was (shuffling BN). ``symmetric``: both crops serve as query and as key; the loss is the SUM of the
    two directions' losses, as in the MoCo CIFAR-10 demo, each times the mechanism's ``loss_scale`` (v3: 2T).
    ``predictor`` (MoCo v3): an MLP on the query side only, between the projector and the normalisation; it is
    trained by the optimizer and not part of the momentum update (as in the v3 code). ``momentum`` may be changed
    between steps (v3's cosine schedule). Build it from a config with :meth:`from_config`.
    """

    def __init__(
        self,
        encoder: Encoder,
        dictionary: Mechanism,
        *,
        momentum: float,
        temperature: float,
        symmetric: bool = False,
        shuffle_keys: bool = False,
        channels_last: bool = False,
        compile: bool = False,
        predictor: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if symmetric and dictionary.key_source is KeySource.STORED:
            raise ValueError(f"moco.symmetric needs a key pass; moco.mechanism={dictionary.name} stores its keys")
        self.key_source = dictionary.key_source
        self.momentum = momentum
        self.temperature = temperature
        self.symmetric = symmetric
        self.shuffle_keys = shuffle_keys
        self.channels_last = channels_last
        self.encoder_q = encoder
        if self.key_source is KeySource.MOMENTUM_ENCODER:
            self.encoder_k = copy.deepcopy(encoder)
            self.encoder_k.requires_grad_(False)
            self._collect_momentum_params()
            self.register_load_state_dict_post_hook(_recollect_momentum_params)
        self.dictionary = dictionary
        self.predictor = predictor
        if compile:
            self.encoder_q.compile()
            if self.key_source is KeySource.MOMENTUM_ENCODER:
                self.encoder_k.compile()

    @classmethod
    def from_config(cls, cfg, num_train_samples: int) -> MoCo:
        """The model of a :class:`mocolab.config.Config` over ``num_train_samples`` training images.

        ``model.bn`` shuffle shuffles the keys across workers; split (with more than one split) emulates it on
        one worker; plain and sync are the no-shuffle ablations."""
        model = cfg.model
        backbone, feat_dim = build_backbone(model, use_gpu=cfg.scaling.use_gpu, image_size=cfg.data.image_size)
        dictionary = build_dictionary(cfg.moco.mechanism, DictionarySettings.from_config(cfg, num_train_samples))
        head = predictor = None
        if dictionary.uses_predictor:
            from mocolab.moco.timm_backbones import is_vit

            vit = model.arch.startswith("timm:") and is_vit(backbone)
            head, predictor = v3_heads(feat_dim, cfg.moco.mlp_dim, cfg.moco.dim, vit)
        moco = cls(
            Encoder(backbone, feat_dim, cfg.moco.dim, cfg.moco.mlp, head),
            dictionary,
            momentum=cfg.moco.momentum,
            temperature=cfg.moco.temperature,
            symmetric=cfg.moco.symmetric,
            shuffle_keys=model.bn == "shuffle" or (model.bn == "split" and model.bn_splits > 1),
            channels_last=resolve_channels_last(model, cfg.scaling.use_gpu),
            compile=model.compile,
            predictor=predictor,
        )
        if model.bn == "sync":  # every BN of the model, heads included (the v3 code converts the whole model)
            moco = sync_batchnorm(moco, cfg.scaling.use_gpu)
            if moco.key_source is KeySource.MOMENTUM_ENCODER:
                moco._collect_momentum_params()
        return moco

    def _collect_momentum_params(self) -> None:
        """The parameter lists of the momentum update, built once (again after a load that assigns tensors)."""
        self._momentum_target = list(self.encoder_k.parameters())
        self._momentum_source = list(self.encoder_q.parameters())

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor, index: torch.Tensor) -> MocoOutput:
        """One step's math: queries, momentum update, keys (shuffle-BN), InfoNCE loss, dictionary update.

        ``im_q``, ``im_k``: the two crops ``[B, 3, H, W]``; ``index``: the samples' dataset indices ``[B]``
        (used by the memory bank)."""
        if self.channels_last:
            im_q = im_q.contiguous(memory_format=torch.channels_last)
            im_k = im_k.contiguous(memory_format=torch.channels_last)
        crops = (im_q, im_k)
        directions = ((0, 1), (1, 0)) if self.symmetric else ((0, 1),)
        with record_function(PHASES["query_forward"]):
            queries = [self._query(crops[q]) for q, _ in directions]
        keys = None
        if self.key_source is not KeySource.STORED:
            key_crops = [crops[k] for _, k in directions]
            if self.predictor is not None:  # v3: k1 then k2, as the v3 code (the key BN statistics follow the order)
                encoded = self._encode_keys(key_crops[::-1])[::-1]
            else:
                encoded = self._encode_keys(key_crops)
            keys = [_at_least_fp32(k) for k in encoded]
        with torch.autocast(im_q.device.type, enabled=False):  # logits in fp32 against the fp32 dictionary
            logits, labels = self.dictionary([_at_least_fp32(q) for q in queries], keys, index, self.temperature)
            with record_function(PHASES["loss"]):
                scale = len(directions) * self.dictionary.loss_scale(self.temperature)
                loss = infonce_loss(logits, labels) * scale  # symmetric: sum of the two directions' means
        return MocoOutput(loss, logits, labels)

    def _query(self, crop: torch.Tensor) -> torch.Tensor:
        if self.predictor is None:
            return self.encoder_q(crop)
        return F.normalize(self.predictor(self.encoder_q.embed(crop)), dim=1)

    def _encode_keys(self, crops: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.key_source is KeySource.QUERY_ENCODER:
            return [self._key_pass(self.encoder_q, crop) for crop in crops]
        with torch.no_grad():
            with record_function(PHASES["momentum_update"]):
                momentum_update_(self._momentum_target, self._momentum_source, self.momentum)
            return [self._key_pass(self.encoder_k, crop) for crop in crops]

    def _key_pass(self, encoder: nn.Module, crop: torch.Tensor) -> torch.Tensor:
        if not self.shuffle_keys:
            with record_function(PHASES["key_forward"]):
                return encoder(crop)
        with record_function(PHASES["shuffle"]):
            shuffled, unshuffle = shuffle_across_workers(crop)
            if self.channels_last:
                shuffled = shuffled.contiguous(memory_format=torch.channels_last)
        with record_function(PHASES["key_forward"]):
            keys = encoder(shuffled)
        with record_function(PHASES["shuffle"]):
            return unshuffle_across_workers(keys, unshuffle)

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The query encoder's backbone weights with torchvision key names (see backbones.backbone_state_dict)."""
        return backbone_state_dict(self.encoder_q.backbone)

"""The kNN monitor and the linear probe on every rank (two real gloo ranks, torch.multiprocessing, no Ray) equal
the single-rank ones."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mocolab.config import build_config
from mocolab.evaluate.probe import linear_probe_top1
from mocolab.train.knn import evenly_spaced, extract_features, gather_shards, knn_loaders, knn_top1, shard
from mocolab.train.pretrain import broadcast_buffers

WORLD = 2
RAW = {
    "moco": {"dim": 16, "queue_size": 64},
    "model": {"arch": "small_cnn", "bn": "shuffle"},
    "data": {"dataset": "digits", "image_size": 16, "digits": {"copies": 1}},
    "train": {"batch_size": 8, "knn_k": 20, "knn_bank_images": 301, "knn_test_images": 101},
    "scaling": {"num_workers": WORLD},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backbone(cfg) -> torch.nn.Module:
    """A random-init backbone whose BN running statistics are not the initial ones."""
    from mocolab.moco.model import MoCo

    torch.manual_seed(0)
    backbone = MoCo.from_config(cfg, num_train_samples=1000).encoder_q.backbone
    with torch.no_grad():
        backbone.train()(torch.rand(16, 3, 16, 16))  # running statistics move
    return backbone


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        cfg = build_config(RAW)
        backbone = _backbone(cfg)
        if rank == 1:  # with shuffle-BN every rank's running statistics follow its own batches
            for module in backbone.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.running_mean.add_(0.5)
        broadcast_buffers(backbone, WORLD)
        bank, queries = knn_loaders(cfg, rank, WORLD)
        accuracy = knn_top1(backbone, bank, queries, k=cfg.train.knn_k, t=cfg.train.knn_t)
        probe = linear_probe_top1(backbone, cfg.model.arch, bank, queries)
        feats, labels = (gather_shards(x) for x in extract_features(backbone, bank))
        shard_size = len(bank.dataset)
        torch.save(
            {"accuracy": accuracy, "probe": probe, "bank": feats, "labels": labels, "shard_size": shard_size},
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("knn")
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_every_rank_embeds_its_shard_and_gets_the_single_rank_accuracy(ranks):
    torch.set_num_threads(1)
    cfg = build_config(RAW)
    backbone = _backbone(cfg)
    bank, queries = knn_loaders(cfg)  # one rank: both splits whole
    single = knn_top1(backbone, bank, queries, k=cfg.train.knn_k, t=cfg.train.knn_t)
    single_probe = linear_probe_top1(backbone, cfg.model.arch, bank, queries)
    feats, labels = extract_features(backbone, bank)
    assert len(bank.dataset) == 301 and len(queries.dataset) == 101
    assert [r["shard_size"] for r in ranks] == [151, 150]  # uneven shards
    for r in ranks:
        assert r["accuracy"] == single
        assert r["probe"] == ranks[0]["probe"] and abs(r["probe"] - single_probe) <= 1.0  # 1 of 101 test images
        torch.testing.assert_close(r["bank"], feats, rtol=1e-5, atol=1e-6)  # rank 0's BN statistics everywhere
        assert torch.equal(r["labels"], labels)  # the single-rank order


def test_evenly_spaced_subsample_and_strided_shards():
    assert evenly_spaced(10, None) == list(range(10)) and evenly_spaced(10, 20) == list(range(10))
    assert evenly_spaced(10, 4) == [0, 2, 5, 7]
    assert shard([0, 2, 5, 7, 9], 0, 2) == [0, 5, 9] and shard([0, 2, 5, 7, 9], 1, 2) == [2, 7]


def test_gather_shards_is_the_identity_on_one_worker():
    x = torch.arange(6.0).view(3, 2)
    assert gather_shards(x) is x

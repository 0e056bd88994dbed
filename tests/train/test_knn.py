"""Weighted kNN monitor on hand-made features."""

import math

import torch
import torch.nn.functional as F

from mocolab.train.knn import extract_features, knn_accuracy, knn_predict, knn_top1


def test_weighted_vote_prefers_close_neighbours_over_the_majority():
    # Query at angle 0. One class-1 neighbour at cos=0.99 vs two class-0 neighbours at cos=0.6:
    # with t=0.1, exp(9.9) > 2*exp(6), so the weighted vote picks class 1 though class 0 has more votes.
    def unit(cos):
        return [cos, math.sqrt(1 - cos**2)]

    bank = torch.tensor([unit(0.99), unit(0.6), unit(0.6), unit(-1.0)])
    labels = torch.tensor([1, 0, 0, 2])
    query = torch.tensor([[1.0, 0.0]])
    assert knn_predict(query, bank, labels, num_classes=3, k=3, t=0.1).tolist() == [1]
    # with a very high temperature the weights are nearly equal and the majority wins
    assert knn_predict(query, bank, labels, num_classes=3, k=3, t=100.0).tolist() == [0]


def test_k_larger_than_bank_is_clamped():
    bank = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1)
    pred = knn_predict(torch.tensor([[0.0, 1.0]]), bank, torch.tensor([0, 1]), num_classes=2, k=200, t=0.1)
    assert pred.tolist() == [1]


def test_knn_accuracy_is_a_percentage_over_chunks():
    bank = torch.eye(3)
    bank_labels = torch.tensor([0, 1, 2])
    test = torch.eye(3)[[0, 1, 2, 0]]
    test_labels = torch.tensor([0, 1, 2, 1])  # the last one is wrong
    assert knn_accuracy(bank, bank_labels, test, test_labels, k=1, t=0.1, chunk=3) == 75.0


def test_knn_top1_runs_in_eval_mode_on_normalised_features_and_restores_train_mode():
    modes = []

    class Identity(torch.nn.Module):
        def forward(self, x):
            modes.append(self.training)
            return x

    net = Identity().train()
    # features that differ only in length must match by direction
    train = [(torch.tensor([[10.0, 0.0], [0.0, 0.1]]), torch.tensor([0, 1]))]
    test = [(torch.tensor([[0.2, 0.0], [0.0, 50.0]]), torch.tensor([0, 1]))]
    feats, _ = extract_features(net, train)
    assert torch.allclose(feats.norm(dim=1), torch.ones(2))
    assert knn_top1(net, train, test, k=1, t=0.1) == 100.0
    assert modes and not any(modes)
    assert net.training

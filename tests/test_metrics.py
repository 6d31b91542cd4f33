"""Metric math: how ties count in reward accuracy."""

import torch

from preftune.metrics import TIE_TOLERANCE, reward_accuracies


def test_reward_accuracy_counts_wins_losses_and_ties():
    chosen = torch.tensor([1.0, -1.0, 0.0, 0.3, 0.3])
    rejected = torch.tensor([0.0, 0.0, 0.0, 0.3 - TIE_TOLERANCE / 2, 0.3 - 2 * TIE_TOLERANCE])
    assert reward_accuracies(chosen, rejected).tolist() == [1.0, 0.0, 0.5, 0.5, 1.0]

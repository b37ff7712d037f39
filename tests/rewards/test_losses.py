"""Reference values for the reward-model losses (hand-derived)."""

import math

import torch

from flowrl.rewards.losses import bradley_terry_loss, expected_score, pointwise_loss


def test_expected_score_of_uniform_and_peaked():
    assert expected_score(torch.zeros(1, 5)).item() == 3.0  # uniform over 1..5
    peaked = torch.tensor([[0.0, 0.0, 0.0, 0.0, 50.0]])
    assert abs(expected_score(peaked).item() - 5.0) < 1e-6
    # two levels equally likely: (2 + 4) / 2
    two = torch.tensor([[-1e9, 0.0, -1e9, 0.0, -1e9]])
    assert abs(expected_score(two).item() - 3.0) < 1e-6


def test_pointwise_loss_is_cross_entropy_on_levels():
    logits = torch.zeros(2, 5)
    assert abs(pointwise_loss(logits, torch.tensor([1, 5])).item() - math.log(5)) < 1e-6


def test_bradley_terry_reference_values():
    # margin 1 for a preferred: -log sigmoid(1) = log(1 + e^-1) = 0.31326
    loss = bradley_terry_loss(torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([1.0]))
    assert abs(loss.item() - math.log1p(math.exp(-1))) < 1e-6
    # a tie at margin 0 costs log 2; at margin 1 it costs the mean of both sides
    assert abs(bradley_terry_loss(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.5])).item() - math.log(2)) < 1e-6
    both = 0.5 * (math.log1p(math.exp(-1)) + math.log1p(math.exp(1)))
    tie = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([0.5]))
    assert abs(tie.item() - both) < 1e-6
    # swapping the images and the preference gives the same loss
    a, b, p = torch.tensor([0.3, 2.0]), torch.tensor([1.0, -1.0]), torch.tensor([1.0, 0.0])
    torch.testing.assert_close(bradley_terry_loss(a, b, p), bradley_terry_loss(b, a, 1 - p))

"""Spec 2.5 and 3: the simulated teachers and the net-win-rate advantage."""
import math

import pytest
import torch

import pair_grpo_soft_lm as soft
import pair_grpo_soft_mujoco as soft_mj

KINDS = ["oracle", "stochastic", "mistake", "equal"]


@pytest.mark.parametrize("kind", KINDS)
def test_labels_are_antisymmetric_with_half_on_the_diagonal(kind):
    scores = torch.randn(50, 6)
    labels = soft.teacher_labels(scores, kind, tau=0.5, flip_prob=0.3, tie_margin=0.5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(labels + labels.transpose(1, 2), torch.ones_like(labels))
    assert (labels.diagonal(dim1=1, dim2=2) == 0.5).all()
    assert set(labels.unique().tolist()) <= {0.0, 0.5, 1.0}


def test_oracle_labels_and_ties_give_half():
    labels = soft.teacher_labels(torch.tensor([[3.0, 1.0, 3.0]]), "oracle")[0]
    assert labels.tolist() == [[0.5, 1.0, 0.5], [0.0, 0.5, 0.0], [0.5, 1.0, 0.5]]


def test_stochastic_teacher_matches_bradley_terry_frequency():
    n, tau = 20000, 0.05
    scores = torch.tensor([[0.1, 0.0]]).repeat(n, 1)
    labels = soft.teacher_labels(scores, "stochastic", tau=tau, generator=torch.Generator().manual_seed(0))
    p = 1 / (1 + math.exp(-0.1 / tau))  # sigmoid(2) = 0.881
    freq = labels[:, 0, 1].mean().item()
    assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / n), (freq, p)


def test_mistake_teacher_flips_at_its_rate():
    scores = torch.randn(4000, 5)
    labels = soft.teacher_labels(scores, "mistake", flip_prob=0.2, generator=torch.Generator().manual_seed(0))
    agreement = soft.label_agreement(labels, scores)
    assert abs((1 - agreement) - 0.2) < 4 * math.sqrt(0.2 * 0.8 / (4000 * 10))


def test_equal_teacher_ties_close_pairs_only():
    labels = soft.teacher_labels(torch.tensor([[1.0, 1.05, 2.0]]), "equal", tie_margin=0.1)[0]
    assert labels[0, 1] == 0.5 and labels[0, 2] == 0.0 and labels[2, 1] == 1.0


def test_net_win_rate_hand_values():
    labels = soft.teacher_labels(torch.tensor([[3.0, 1.0, 2.0], [5.0, 5.0, 5.0]]), "oracle")
    advantages = soft.net_win_rate(labels)
    # y0 beats both: +1; y1 loses both: -1; y2 one win one loss: 0.  All tied: 0.
    assert advantages.tolist() == [[1.0, -1.0, 0.0], [0.0, 0.0, 0.0]]
    scaled = soft.net_win_rate(labels, scale_by_std=True)
    torch.testing.assert_close(scaled[0], torch.tensor([1.0, -1.0, 0.0]) / (1.0 + 1e-4))
    assert scaled[1].abs().sum() == 0


def test_net_win_rate_lies_in_unit_interval_and_sums_to_zero():
    labels = soft.teacher_labels(torch.randn(100, 8), "stochastic", tau=1.0, generator=torch.Generator().manual_seed(1))
    advantages = soft.net_win_rate(labels)
    assert advantages.abs().max() <= 1.0
    torch.testing.assert_close(advantages.sum(1), torch.zeros(100))


def test_myopic_scores_weigh_the_end_of_each_segment_most():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 9.0], [1.0, 2.0, 0.0, 0.0]], dtype=torch.float64)
    lengths = torch.tensor([3, 2])  # the 9.0 lies past the first segment's end
    scores = soft_mj.myopic_scores(rewards, lengths, 0.5)
    torch.testing.assert_close(scores, torch.tensor([0.25 * 1 + 0.5 * 2 + 3.0, 0.5 * 1 + 2.0], dtype=torch.float64))


def test_label_agreement_counts_each_queried_pair_once():
    scores = torch.tensor([[3.0, 1.0, 2.0]])  # pairs (0,1), (0,2), (1,2): the oracle says 1, 1, 0
    labels = soft.teacher_labels(scores, "oracle")
    labels[0, 0, 1], labels[0, 1, 0] = 0.0, 1.0  # flip one of the three pairs, both halves
    assert soft.label_agreement(labels, scores) == pytest.approx(2 / 3)
    labels[0, 1, 2], labels[0, 2, 1] = 0.5, 0.5  # a tie where the oracle has an order
    assert soft.label_agreement(labels, scores) == pytest.approx(1 / 3)

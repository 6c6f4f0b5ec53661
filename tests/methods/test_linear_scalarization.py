"""Fixed weights: the weights of the weighted sum, checked against torchjd's Constant."""

from __future__ import annotations

import pytest
import torch
from torchjd.scalarization import Constant

from gradsurgery._weighting import Needs
from gradsurgery.methods.linear_scalarization import LinearScalarization

from ._loss_weighting import decide, gradient_weights


def test_weights_are_the_gradient_of_the_weighted_sum():
    weights = [0.5, 2.0, -1.0]
    method = LinearScalarization(weights)
    assert method.needs is Needs.LOSSES
    theirs = gradient_weights(Constant(torch.tensor(weights, dtype=torch.float64)), [1.0, 2.0, 3.0])
    assert list(decide(method, [1.0, 2.0, 3.0]).weights) == theirs


@pytest.mark.parametrize("weights", [[], [1.0, float("nan")], [float("inf")]])
def test_refuses_bad_weights(weights):
    with pytest.raises(ValueError):
        LinearScalarization(weights)


def test_refuses_non_numbers():
    with pytest.raises(TypeError):
        LinearScalarization(["a"])


def test_refuses_a_different_number_of_tasks():
    with pytest.raises(ValueError, match="2 weights, got 3"):
        LinearScalarization([1.0, 1.0]).check_num_tasks(3)


def test_keeps_no_state():
    method = LinearScalarization([1.0])
    assert method.state_dict() == {}
    with pytest.raises(ValueError):
        method.load_state_dict({"x": 1})
    assert repr(method) == "LinearScalarization(weights=[1.0])"

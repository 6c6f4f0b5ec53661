import pytest
import torch

import gradsurgery as gs
from gradsurgery._autograd import graph_leaves
from gradsurgery._jacobian import outer_sums
from tests._models import DEVICES, model_and_batch


@pytest.mark.parametrize("device", DEVICES)
def test_task_gradients_match_separate_backward_passes(device):
    model, x, y = model_and_batch(device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    matrix = gs.task_gradients(model.losses(x, y), params)
    for i in range(3):
        model.zero_grad()
        model.losses(x, y)[i].backward()
        expected = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params]
        )
        torch.testing.assert_close(matrix[i], expected)


def test_task_gradients_accept_a_module_and_keep_grad_untouched():
    model, x, y = model_and_batch()
    matrix = gs.task_gradients(model.losses(x, y), model.body)
    assert matrix.shape == (3, sum(p.numel() for p in model.body.parameters()))
    assert all(p.grad is None for p in model.parameters())


def test_task_gradients_retain_graph_on_request():
    model, x, y = model_and_batch()
    losses = model.losses(x, y)
    gs.task_gradients(losses, model.body, retain_graph=True)
    sum(losses).backward()  # would raise if the graph had been freed
    with pytest.raises(RuntimeError):
        losses = model.losses(x, y)
        gs.task_gradients(losses, model.body)
        sum(losses).backward()


def test_graph_leaves_finds_exactly_the_reached_parameters():
    model, x, y = model_and_batch()
    losses = model.losses(x, y)[:1]
    found = {id(p) for p in graph_leaves(losses)}
    expected = {id(p) for p in [*model.body.parameters(), *model.heads[0].parameters()]}
    assert found == expected


@pytest.mark.parametrize("fan_in", [1, 8, 15, 16, 40])  # both sides of the thin-input switch
def test_outer_sums_is_g_transposed_times_x_in_place_or_not(fan_in):
    g, x = torch.randn(3, 7, 5, dtype=torch.float64), torch.randn(3, 7, fan_in, dtype=torch.float64)
    expected = torch.einsum("tro,tri->toi", g, x)
    torch.testing.assert_close(outer_sums(g, x), expected)
    matrix = torch.zeros(3, 2 + 5 * fan_in, dtype=torch.float64)  # a block of a [T, P] matrix
    written = outer_sums(g, x, out=matrix[:, 2:].view(3, 5, fan_in))
    assert written.data_ptr() == matrix[:, 2:].data_ptr()
    torch.testing.assert_close(matrix[:, 2:].view(3, 5, fan_in), expected)
    assert not matrix[:, :2].any()
    torch.testing.assert_close(outer_sums(g[0], x[0]), expected[0])  # 2-D


def test_graph_leaves_refuses_a_bypass_cycle_instead_of_looping_forever():
    w = torch.ones(2, requires_grad=True)
    loss = (w * 2).sum()
    node = loss.grad_fn.next_functions[0][0]  # MulBackward0
    with pytest.raises(RuntimeError, match="cycle"):
        graph_leaves([loss], {node: node})

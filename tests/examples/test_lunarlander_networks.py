import pytest
import torch
from config import CONFIGS, make_config
from hypothesis import given, settings
from hypothesis import strategies as st
from networks import BRCNetwork, QNetwork, categorical_projection, make_network, num_parameters


def test_exact_parameter_counts():
    assert num_parameters(QNetwork(task_aware=False)) == 35_716
    assert num_parameters(QNetwork(task_aware=True, embedding_dim=8)) == 37_788
    assert num_parameters(BRCNetwork(embedding_dim=32, num_atoms=21)) == 296_884


@pytest.mark.parametrize("name", list(CONFIGS))
def test_configurations_build_the_specified_network(name):
    expected = {"blind": 35_716, "aware": 37_788, "brc": 296_884}
    cfg = make_config(name)
    assert num_parameters(make_network(cfg)) == expected[cfg.network]
    if cfg.method == "gradnorm":
        assert hasattr(make_network(cfg), cfg.gradnorm_layer)


def test_output_shapes():
    obs, tasks = torch.randn(5, 8), torch.tensor([0, 1, 2, 0, 1])
    for net in (QNetwork(False), QNetwork(True)):
        assert net(obs, tasks).shape == (5, 4)
        assert net.q_values(obs, tasks).shape == (5, 4)
    brc = BRCNetwork()
    assert brc(obs, tasks).shape == (5, 4, 21)
    q = brc.q_values(obs, tasks)
    assert q.shape == (5, 4)
    assert torch.all(q >= -300) and torch.all(q <= 300)


def test_blind_ignores_the_task_and_aware_uses_it():
    torch.manual_seed(0)
    obs = torch.randn(1, 8).repeat(3, 1)
    tasks = torch.tensor([0, 1, 2])
    blind = QNetwork(task_aware=False)
    assert blind.fc1.in_features == 8
    out = blind(obs, tasks)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    aware = QNetwork(task_aware=True)
    assert aware.fc1.in_features == 16
    out = aware(obs, tasks)
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[1], out[2])
    brc = BRCNetwork()
    assert brc.fc_in.in_features == 40
    out = brc(obs, tasks)
    assert not torch.allclose(out[0], out[1])


SUPPORT = torch.linspace(-2.0, 2.0, 5)  # atoms -2, -1, 0, 1, 2 (spacing 1)


def one_hot(i, n=5):
    return torch.nn.functional.one_hot(torch.tensor([i]), n).float()


def test_projection_hand_computed_cases():
    # r=0.5, gamma=1, all mass at z=-2: -1.5 lies halfway between -2 and -1.
    out = categorical_projection(one_hot(0), torch.tensor([0.5]), torch.tensor([0.0]), 1.0, SUPPORT)
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.5, 0.0, 0.0, 0.0]]))
    # gamma=0.5: atoms shift to r + z/2 = 0.25 + (-1, -0.5, 0, 0.5, 1) with mass 0.2 each.
    out = categorical_projection(
        torch.full((1, 5), 0.2), torch.tensor([0.25]), torch.tensor([0.0]), 0.5, SUPPORT
    )
    # -0.75 -> 0.75 on -1, 0.25 on 0; -0.25 -> 0.25 on -1, 0.75 on 0; 0.25 -> 0.75 on 0,
    # 0.25 on 1; 0.75 -> 0.25 on 0, 0.75 on 1; 1.25 -> 0.75 on 1, 0.25 on 2.
    expected = 0.2 * torch.tensor([[0.0, 1.0, 2.0, 1.75, 0.25]])
    torch.testing.assert_close(out, expected)
    # Landing exactly on an atom puts all the mass there (lower == upper).
    out = categorical_projection(one_hot(2), torch.tensor([1.0]), torch.tensor([0.0]), 1.0, SUPPORT)
    torch.testing.assert_close(out, one_hot(3))
    # Terminal: the next-state distribution is ignored, the target is the reward alone.
    out = categorical_projection(
        one_hot(4), torch.tensor([-0.5]), torch.tensor([1.0]), 0.99, SUPPORT
    )
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.5, 0.5, 0.0, 0.0]]))
    # Out of range: clipped to the edge atom.
    out = categorical_projection(
        one_hot(4), torch.tensor([10.0]), torch.tensor([0.0]), 0.99, SUPPORT
    )
    torch.testing.assert_close(out, one_hot(4))


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    gamma=st.floats(0.0, 1.0),
    reward_scale=st.floats(0.0, 500.0),
)
def test_projection_is_a_distribution_and_conserves_mass(seed, gamma, reward_scale):
    generator = torch.Generator().manual_seed(seed)
    support = torch.linspace(-300.0, 300.0, 21)
    probs = torch.rand(32, 21, generator=generator).softmax(dim=-1)
    rewards = (torch.rand(32, generator=generator) * 2 - 1) * reward_scale
    terminated = (torch.rand(32, generator=generator) < 0.3).float()
    out = categorical_projection(probs, rewards, terminated, gamma, support)
    assert torch.all(out >= 0)
    torch.testing.assert_close(out.sum(dim=-1), torch.ones(32))
    # Where no atom is clipped the projection also keeps the mean: E[target] = r + g E[Z].
    shifted = rewards[:, None] + gamma * (1 - terminated[:, None]) * support
    inside = (shifted >= -300).all(dim=1) & (shifted <= 300).all(dim=1)
    expected_mean = rewards + gamma * (1 - terminated) * (probs * support).sum(dim=-1)
    torch.testing.assert_close(
        (out * support).sum(dim=-1)[inside], expected_mean[inside], atol=1e-3, rtol=1e-4
    )

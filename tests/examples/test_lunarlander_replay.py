import numpy as np
import pytest
import torch
from replay import PerTaskReplayBuffer


def fill(buffer, task, count, start=0):
    """Transitions whose every field encodes (task, index) so we can tell them apart."""
    for i in range(start, start + count):
        value = task * 1000 + i
        buffer.add(
            task,
            np.full(8, value, np.float32),
            i % 4,
            float(value),
            np.full(8, -value, np.float32),
            i % 2 == 0,
        )


def test_capacity_is_split_evenly():
    buffer = PerTaskReplayBuffer(3, 100_000, 8)
    assert buffer.capacity == 33_333
    assert buffer.obs.shape == (3, 33_333, 8)
    assert buffer.obs.dtype == np.float32 and buffer.actions.dtype == np.int64
    assert len(buffer) == 0


def test_ring_buffer_wraps_around_and_keeps_the_newest():
    buffer = PerTaskReplayBuffer(3, 30, 8)  # 10 per task
    fill(buffer, 0, 15)
    assert buffer.size(0) == 10
    assert buffer.positions[0] == 5
    # Slots 0-4 were overwritten by transitions 10-14; slots 5-9 still hold 5-9.
    assert sorted(buffer.rewards[0].tolist()) == list(range(5, 15))
    assert buffer.rewards[0, 0] == 10 and buffer.rewards[0, 5] == 5


def test_tasks_are_isolated():
    buffer = PerTaskReplayBuffer(3, 300, 8, rng=np.random.default_rng(0))
    fill(buffer, 0, 50)
    fill(buffer, 1, 7)
    assert buffer.size(0) == 50 and buffer.size(1) == 7 and buffer.size(2) == 0
    for task in (0, 1):
        batch = buffer.sample(task, 256)
        assert np.all(batch.rewards // 1000 == task)
        assert np.all(batch.obs[:, 0] == batch.rewards)  # rows are whole transitions
        assert np.all(batch.next_obs[:, 0] == -batch.rewards)
    assert set(buffer.sample(1, 500).rewards.tolist()) <= {1000.0 + i for i in range(7)}
    with pytest.raises(ValueError):
        buffer.sample(2, 4)


def test_warm_up_needs_every_task():
    buffer = PerTaskReplayBuffer(3, 300, 8)
    fill(buffer, 0, 20)
    fill(buffer, 1, 20)
    fill(buffer, 2, 19)
    assert not buffer.is_warm(20)
    fill(buffer, 2, 1, start=19)
    assert buffer.is_warm(20)
    assert not buffer.is_warm(21)
    assert not PerTaskReplayBuffer(3, 300, 8).is_warm()  # default: 2,000 per task


def test_sample_shapes_and_dtypes():
    buffer = PerTaskReplayBuffer(3, 300, 8, rng=np.random.default_rng(0))
    for task in range(3):
        fill(buffer, task, 30)
    batch = buffer.sample(1, 64)
    assert batch.obs.shape == (64, 8) and batch.obs.dtype == np.float32
    assert batch.next_obs.shape == (64, 8) and batch.next_obs.dtype == np.float32
    assert batch.actions.shape == (64,) and batch.actions.dtype == np.int64
    assert batch.rewards.shape == (64,) and batch.rewards.dtype == np.float32
    assert batch.terminated.shape == (64,) and batch.terminated.dtype == np.float32
    assert set(np.unique(batch.terminated)) <= {0.0, 1.0}
    whole = buffer.sample_all(64)
    assert whole.obs.shape == (192, 8) and whole.actions.shape == (192,)
    assert np.all(whole.rewards // 1000 == np.repeat([0, 1, 2], 64))  # task-major


def test_sample_all_equals_three_samples_with_the_same_rng():
    a = PerTaskReplayBuffer(3, 300, 8, rng=np.random.default_rng(5))
    b = PerTaskReplayBuffer(3, 300, 8, rng=np.random.default_rng(5))
    for buffer in (a, b):
        for task in range(3):
            fill(buffer, task, 40)
    joined = a.sample_all(16)
    parts = [b.sample(t, 16) for t in range(3)]
    for field, values in joined._asdict().items():
        np.testing.assert_array_equal(values, np.concatenate([getattr(p, field) for p in parts]))


def test_state_dict_round_trip_continues_identically(tmp_path):
    a = PerTaskReplayBuffer(3, 300, 8, rng=np.random.default_rng(1))
    for task in range(3):
        fill(a, task, 120)  # wraps (capacity 100 per task)
    a.sample_all(8)
    torch.save(a.state_dict(), tmp_path / "buffer.pt")
    b = PerTaskReplayBuffer(3, 300, 8, rng=np.random.default_rng(99))
    b.load_state_dict(torch.load(tmp_path / "buffer.pt", weights_only=False))
    for name in ("obs", "next_obs", "actions", "rewards", "terminated", "sizes", "positions"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    fill(a, 0, 3, start=500)
    fill(b, 0, 3, start=500)
    np.testing.assert_array_equal(a.sample_all(32).obs, b.sample_all(32).obs)
    with pytest.raises(ValueError):
        PerTaskReplayBuffer(3, 30, 8).load_state_dict(a.state_dict())

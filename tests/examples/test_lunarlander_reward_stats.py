import json

from envs import TASK_NAMES
from reward_stats import main


def test_reward_stats_cover_every_task_and_write_json(tmp_path):
    out = tmp_path / "stats.json"
    stats = main(["--steps", "150", "--seed", "3", "--out", str(out)])
    assert set(stats) == set(TASK_NAMES)
    for s in stats.values():
        assert s["steps"] >= 150 and s["episodes"] >= 1
        assert s["reward_std"] > 0  # LunarLander's shaping rewards every step
    assert json.loads(out.read_text())["heavy"] == stats["heavy"]

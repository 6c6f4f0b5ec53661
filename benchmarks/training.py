"""Suite "training": environment steps per second of the LunarLander study's training loop.

Every configuration of the study runs a short training (``training_probe.py``, one fresh
process per run); the runs are repeated in rotating order so that background load hits all
configurations alike, and the median steps/s of each is reported.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = Path(__file__).resolve().parent / "training_probe.py"
EXAMPLE = PROBE.parents[1] / "examples" / "lunarlander_mtl"


def _study_configs() -> tuple[str, ...]:
    """The example's seven configurations, read from its config.py (a script, not a package)."""
    spec = importlib.util.spec_from_file_location("lunarlander_config", EXAMPLE / "config.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return tuple(module.STUDY_CONFIGS)


CONFIGS = _study_configs()
# (episodes per task, warm-up transitions per task, repeats)
FULL = (20, 300, 3)
QUICK = (3, 64, 1)


def example_available() -> bool:
    return (EXAMPLE / "train.py").exists()


def run(quick: bool, log=print) -> dict:
    """Run every configuration ``repeats`` times, interleaved; returns the suite's payload."""
    episodes, warmup, repeats = QUICK if quick else FULL
    runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="gradsurgery-bench-") as runs_dir:
        for r in range(repeats):
            order = CONFIGS[r % len(CONFIGS) :] + CONFIGS[: r % len(CONFIGS)]
            for name in order:
                result = _probe(name, episodes, warmup, runs_dir)
                log(f"training/{name} run {r + 1}/{repeats}: {result['steps_per_s']:.0f} steps/s")
                runs[name].append(result)
    reference = statistics.median(x["steps_per_s"] for x in runs["shared-blind"])
    rows = []
    for name, results in runs.items():
        rates = [x["steps_per_s"] for x in results]
        rows.append(
            {
                "config": name,
                "engine": results[0]["engine"],
                "steps_per_s": statistics.median(rates),
                "steps_per_s_min": min(rates),
                "steps_per_s_max": max(rates),
                "steps": results[0]["steps"],
                "updates": results[0]["updates"],
                "runs": results,
                "ratio_to_shared_blind": statistics.median(rates) / reference,
            }
        )
    return {
        "settings": {
            "episodes_per_task": episodes,
            "min_replay_size": warmup,
            "repeats": repeats,
            "seed": 0,
            "note": "train() of examples/lunarlander_mtl unchanged (study defaults otherwise, "
            "checkpoint every episode included); timed from the first episode with updates",
        },
        "results": rows,
    }


def _probe(name: str, episodes: int, warmup: int, runs_dir: str) -> dict:
    command = [
        sys.executable,
        str(PROBE),
        "--config",
        name,
        "--episodes-per-task",
        str(episodes),
        "--min-replay-size",
        str(warmup),
        "--runs-dir",
        runs_dir,
    ]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])

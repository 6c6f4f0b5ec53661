"""The README's code runs as written.

Every ```python block is executed on its own, in a fresh namespace (a reader copies one block,
not the page), and every command the README shows names extras, files and flags that exist.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

PYTHON_BLOCKS = re.findall(r"^```python\n(.*?)^```", README, flags=re.M | re.S)
SHELL_TEXT = "\n".join(re.findall(r"^```bash\n(.*?)^```", README, flags=re.M | re.S))
# Commands in inline code too: `python examples/lunarlander_mtl/train.py --quick`.
COMMANDS = re.findall(r"python3? ((?:examples|benchmarks|scripts)/\S+\.py)([^`\n&]*)", README)


def test_the_readme_has_code_to_check():
    assert len(PYTHON_BLOCKS) >= 2
    assert COMMANDS


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_block_runs_on_its_own(index):
    torch.set_num_threads(1)
    code = compile(PYTHON_BLOCKS[index], f"README.md, python block {index + 1}", "exec")
    exec(code, {"__name__": f"readme_block_{index + 1}"})


def test_installed_extras_exist():
    extras = importlib.metadata.metadata("gradsurgery").get_all("Provides-Extra")
    named = set(re.findall(r'pip install -e "\.\[([\w,-]+)\]"', README))
    assert named, "the README installs no extras"
    for group in named:
        for extra in group.split(","):
            assert extra in extras, f"README installs the extra {extra!r}, pyproject has {extras}"


def test_scripts_exist():
    for path in re.findall(r"bash (\S+\.sh)", SHELL_TEXT):
        assert (ROOT / path).is_file(), path
    for path, _ in COMMANDS:
        assert (ROOT / path).is_file(), path


@pytest.mark.parametrize(
    "script", sorted({path for path, _ in COMMANDS if path.startswith("examples/lunarlander")})
)
def test_flags_are_accepted(script):
    flags = {
        flag for path, args in COMMANDS if path == script for flag in re.findall(r"--[\w-]+", args)
    }
    result = subprocess.run(
        [sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    for flag in flags:
        assert re.search(rf"{re.escape(flag)}(?![\w-])", result.stdout), f"{script} has no {flag}"

"""The LunarLander example is a folder of scripts, not a package: put it on sys.path so the
tests import its modules (`config`, `replay`, `train`, ...) the way its scripts do."""

import sys
from pathlib import Path

EXAMPLE_DIR = Path(__file__).resolve().parents[2] / "examples" / "lunarlander_mtl"
if str(EXAMPLE_DIR) not in sys.path:
    sys.path.insert(0, str(EXAMPLE_DIR))

#!/usr/bin/env bash
# Everything CI checks: lint, the docs (built with warnings as errors, examples executed),
# then the test suite with the docstring examples.
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check .
ruff format --check .
sphinx-build -W --keep-going -n -q -b html docs docs/_build/html
sphinx-build -W --keep-going -n -q -b doctest docs docs/_build/doctest
# -n auto: one test process per core (pytest-xdist); each test stands alone.
python -m pytest -q -n auto

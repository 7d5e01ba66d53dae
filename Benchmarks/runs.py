#!/usr/bin/env python3
"""Ratios over several runs of bench.py: each run's ratio is already the median of its rounds;
this prints, for every ratio column the runs have in common, the median of the runs' ratios and
their range (lowest–highest over the runs), and each run's value.

Usage: python3 Benchmarks/runs.py RUN1.md RUN2.md RUN3.md   (bench.py's output, same THREADS)
"""
import re
import statistics
import sys


def table(path):
    """The main table of one bench.py output: {row label: {column: ratio}} for the ratio columns."""
    heads = None
    rows = {}
    for line in open(path, encoding="utf-8"):
        if not line.startswith("|"):
            if heads and rows:
                break
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if heads is None:
            if "÷" in line:
                heads = cells
            continue
        if set(cells[0]) <= set("-:"):
            continue
        ratios = {}
        for head, cell in zip(heads[1:], cells[1:]):
            m = re.match(r"([0-9.]+)×", cell)
            if "÷" in head and m:
                ratios[head] = float(m.group(1))
        rows[cells[0]] = ratios
    if heads is None:
        sys.exit(f"{path}: no bench.py table in it")
    return rows


def main():
    paths = sys.argv[1:]
    if len(paths) < 2:
        sys.exit(__doc__)
    runs = [table(p) for p in paths]
    labels = [l for l in runs[0] if all(l in r for r in runs)]
    columns = [c for c in runs[0][labels[0]] if all(c in r.get(l, {}) for r in runs for l in labels)]
    print(f"Ratios over {len(runs)} runs: median of the runs (lowest–highest); each run's value is the "
          f"median of its rounds ({', '.join(paths)})\n")
    print("| | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for label in labels:
        cells = []
        for c in columns:
            xs = [r[label][c] for r in runs]
            cells.append(f"{statistics.median(xs):.2f}× ({min(xs):.2f}–{max(xs):.2f})")
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

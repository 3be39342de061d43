"""Benchmark: `msmt validate` throughput on a 10,000-line feed, against bare JSON parsing.

Run: .venv/bin/python bench/validate.py [--lines N]

Prints lines per second for schema validation and for a floor measured in the
same run (``json.loads`` of the same lines), and their ratio, so the figure
holds on a noisy shared machine. The target is a 10,000-line file "well under
a second".
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

from broker.samples import generate
from broker.validation import validate_lines


def _best(fn: Callable[[], None], repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lines", type=int, default=10_000)
    args = parser.parse_args()
    lines = [json.dumps(r).encode() for r in generate(args.lines, seed=3)]

    def floor() -> None:
        for line in lines:
            json.loads(line)

    def ours() -> None:
        bad = sum(1 for r in validate_lines(lines) if r.error is not None)
        if bad:
            raise SystemExit(f"benchmark feed had {bad} invalid lines")

    t_floor = _best(floor)
    t_ours = _best(ours)
    print(f"lines:              {args.lines}")
    print(f"json.loads floor:   {t_floor * 1000:8.1f} ms  ({args.lines / t_floor:,.0f} lines/s)")
    print(f"msmt validate:      {t_ours * 1000:8.1f} ms  ({args.lines / t_ours:,.0f} lines/s)")
    print(f"ratio (ours/floor): {t_ours / t_floor:8.2f}x time")


if __name__ == "__main__":
    main()

"""Shared benchmark helpers: the emulator harness, medians, and a table printer."""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from emulator import Emulator  # noqa: E402

__all__ = ["Emulator", "median", "print_table", "rate_rounds"]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def rate_rounds(runs: dict[str, Callable[[], int]], rounds: int) -> dict[str, list[float]]:
    """Run each contender once per round, interleaved, and return their rates (ops/s)."""
    import time

    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            started = time.perf_counter()
            count = run()
            rates[name].append(count / (time.perf_counter() - started))
    return rates


def print_table(title: str, rows: list[tuple[str, str, str]]) -> None:
    width = max(len(r[0]) for r in rows) + 2
    print(f"\n{title}")
    print(f"{'':{width}}{'median':>14}  {'note'}")
    for name, value, note in rows:
        print(f"{name:{width}}{value:>14}  {note}")

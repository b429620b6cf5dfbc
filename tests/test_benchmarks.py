"""The benchmarks' repeat logic: interleaved, rotated rounds and their summaries."""

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
from loss_bench import interleaved_rounds, summary  # noqa: E402


def test_rounds_interleave_cases_in_rotated_order_and_drop_failures():
    calls = []

    def measure_once(case):
        calls.append(case)
        return {"case": case, "error": "not installed"} if case == "c" else {"case": case, "seconds": len(calls), "peak_gib": 1.0}

    rounds = interleaved_rounds(["a", "b", "c"], 3, measure_once)
    assert calls == ["a", "b", "c", "b", "a", "a", "b"]  # c fails once and is not run again
    assert summary("a", rounds["a"]) == {"case": "a", "median": 5, "min": 1, "max": 6, "rounds": 3, "peak_gib": 1.0}
    assert summary("c", rounds["c"]) == {"case": "c", "error": "not installed"}


@pytest.mark.parametrize("script", sorted(path.stem for path in BENCHMARKS.glob("*.py")))
def test_every_benchmark_script_imports(script):
    """A script's imports resolve (its measurement itself is not a test)."""
    importlib.import_module(script)

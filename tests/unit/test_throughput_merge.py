"""benchmarks/throughput.py --merge: a later sweep pooled with the committed one, each run against its own ceiling."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import throughput  # noqa: E402


def _row(method, repeat, seconds, mbit=50.0):
    return {"method": method, "repeat": repeat, "bandwidth_mbit": mbit, "seconds_per_step": seconds,
            "tokens_per_s": 1000.0 / seconds, "steps": 200, "overlap_steps": 0, "compress": None,
            "expected_link_bytes": None, "link_bytes": 0, "rounds": 0, "wall_seconds": 1.0}


def _sweep(rows, command, methods, bandwidths=(50.0,)):
    sweep = {"command": command, "date": "d", "load_before": [0, 0, 0], "load_after": [0, 0, 0],
             "wall_seconds": 1.0, "repeats": 1 + max(r["repeat"] for r in rows), "bandwidths": list(bandwidths),
             "methods": methods}
    return {**sweep, "machine": "m", "steps": 200, "dp_steps": 50, "delay_ms": 0.0, "params_note": "p",
            "sweeps": [sweep], "rows": rows, "cells": throughput.summarize(rows)}


def test_merge_numbers_repeats_after_the_old_ones_and_keeps_each_runs_own_ceiling():
    old = _sweep([_row("ceiling", 0, 0.3), _row("qsr", 0, 0.6), _row("ceiling", 1, 0.4), _row("qsr", 1, 0.8)],
                 "first", ["ceiling", "qsr"])
    # the later sweep ran on a slower machine: its ceiling is slower too
    new = _sweep([_row("ceiling", 0, 0.5), _row("torchft_localsgd", 0, 2.0),
                  _row("ceiling", 0, 0.5, mbit=200.0), _row("qsr", 0, 0.5, mbit=200.0)],
                 "second", ["ceiling", "torchft_localsgd", "qsr"], bandwidths=(50.0, 200.0))
    data = throughput.merge(old, new)
    assert [r["repeat"] for r in data["rows"]] == [0, 0, 1, 1, 2, 2, 2, 2]
    assert [s["command"] for s in data["sweeps"]] == ["first", "second"]
    assert data["methods"] == ["ceiling", "qsr", "torchft_localsgd"] and data["bandwidths"] == [50.0, 200.0]
    cells = {(c["bandwidth_mbit"], c["method"]): c for c in data["cells"]}
    assert cells[(50.0, "ceiling")]["repeats"] == 3 and cells[(50.0, "qsr")]["repeats"] == 2
    assert cells[(50.0, "torchft_localsgd")]["ratio_to_ceiling"]["median"] == pytest.approx(0.25)  # 0.5 / 2.0
    assert cells[(50.0, "qsr")]["ratio_to_ceiling"]["median"] == pytest.approx(0.5)  # 0.3/0.6 and 0.4/0.8
    assert cells[(200.0, "qsr")]["ratio_to_ceiling"]["median"] == pytest.approx(1.0)
    assert old["rows"][0]["repeat"] == 0 and new["rows"][0]["repeat"] == 0, "inputs are left as they were"


def test_merge_reads_a_json_without_sweeps_as_one_sweep():
    old = _sweep([_row("ceiling", 0, 0.3)], "first", ["ceiling"])
    del old["sweeps"]
    data = throughput.merge(old, _sweep([_row("ceiling", 0, 0.3)], "second", ["ceiling"]))
    assert [s["command"] for s in data["sweeps"]] == ["first", "second"]

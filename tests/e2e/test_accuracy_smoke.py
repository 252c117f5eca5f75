"""benchmarks/accuracy.py --smoke runs end to end from the command line, into a temp dir."""
import json
import os
import subprocess
import sys
import time

import pytest

from benchmarks.accuracy_sim import METHODS, VARIANTS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "accuracy.py")

pytestmark = pytest.mark.timeout(300)


def test_accuracy_smoke_writes_json_plots_and_report(tmp_path):
    committed = os.path.join(ROOT, "benchmarks", "results", "accuracy.json")
    before = os.path.getmtime(committed) if os.path.exists(committed) else None
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, SCRIPT, "--smoke", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=280, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"accuracy --smoke: {time.perf_counter() - start:.1f} s")

    result = json.loads((tmp_path / "accuracy.json").read_text())
    assert set(result["regimes"]) == {"one_pass", "multi_epoch"}
    for regime in result["regimes"].values():
        summary, steps = regime["summary"], regime["config"]["steps"]
        assert list(summary) == list(METHODS)
        assert summary["dp"]["rounds"] == steps
        assert summary["const_base"]["rounds"] == -(-steps // regime["config"]["h_base"])
        # QSR grows H, so it communicates less than constant H_base
        assert summary["qsr"]["rounds"] < summary["const_base"]["rounds"]
        assert summary["qsr"]["h_max"] > summary["qsr"]["h_base"]
        for v, variant in VARIANTS.items():  # the same schedule as QSR; overlap defers some rounds' corrections
            assert summary[v]["rounds"] == summary["qsr"]["rounds"]
            assert (summary[v]["overlapped_rounds"] > 0) == (variant.overlap_steps > 0), v
        for run in regime["runs"]:
            assert run["val_acc"] > 0.1, "every run learns something"
            assert run["curve"][-1]["rounds"] == run["rounds"]
            assert run["boundaries"][-1:] == ([] if run["method"] == "dp" else [steps])
    assert result["regimes"]["multi_epoch"]["train_bytes"] < result["regimes"]["one_pass"]["train_bytes"]

    for name in ("accuracy_one_pass.png", "accuracy_multi_epoch.png"):
        assert (tmp_path / name).stat().st_size > 1000
    report = (tmp_path / "accuracy.md").read_text()
    assert "QSR (gamma 2)" in report and "accuracy_multi_epoch.png" in report
    # the committed results were not touched
    after = os.path.getmtime(committed) if os.path.exists(committed) else None
    assert before == after

    # the report can be rebuilt from the JSON alone
    proc = subprocess.run([sys.executable, SCRIPT, "--report-only", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "accuracy.md").read_text().count("QSR (gamma 2)") == report.count("QSR (gamma 2)")


def test_accuracy_merges_a_partial_run_into_the_json(tmp_path):
    """--methods and --seeds rerun some rows: they replace the same method and seed, the rest are kept."""
    def run(*args):
        proc = subprocess.run([sys.executable, SCRIPT, "--smoke", "--regimes", "multi_epoch", "--out-dir",
                               str(tmp_path), *args], capture_output=True, text=True, timeout=200, cwd=str(tmp_path))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return json.loads((tmp_path / "accuracy.json").read_text())["regimes"]["multi_epoch"]

    first = run("--methods", "dp", "qsr", "--seeds", "0", "1")
    second = run("--methods", "qsr", "qsr_int8", "--seeds", "1")
    keys = [(r["method"], r["seed"]) for r in second["runs"]]
    assert keys == [("dp", 0), ("dp", 1), ("qsr", 0), ("qsr", 1), ("qsr_int8", 1)]
    assert second["config"]["methods"] == ["dp", "qsr", "qsr_int8"] and second["config"]["seeds"] == [0, 1]
    old = {(r["method"], r["seed"]): r for r in first["runs"]}
    for r in second["runs"]:
        if (r["method"], r["seed"]) in old:  # kept, or rerun: the same numbers
            assert r["val_acc"] == old[r["method"], r["seed"]]["val_acc"]
    assert second["summary"]["qsr_int8"]["seeds"] == [1] and second["summary"]["dp"]["seeds"] == [0, 1]
    report = (tmp_path / "accuracy.md").read_text()
    assert "QSR, int8 rounds" in report and report.count("`python benchmarks/accuracy.py") == 2

    proc = subprocess.run([sys.executable, SCRIPT, "--smoke", "--regimes", "multi_epoch", "--out-dir", str(tmp_path),
                           "--methods", "qsr", "--steps", "20"], capture_output=True, text=True, timeout=200)
    assert proc.returncode != 0 and "config differs in ['steps']" in proc.stderr + proc.stdout

"""benchmarks/accuracy.py --smoke runs end to end from the command line, into a temp dir."""
import json
import os
import subprocess
import sys
import time

import pytest

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
        assert set(summary) == {"dp", "const_base", "const_large", "post_local", "qsr", "qsr_g1", "qsr_g3"}
        assert summary["dp"]["rounds"] == steps
        assert summary["const_base"]["rounds"] == -(-steps // regime["config"]["h_base"])
        # QSR grows H, so it communicates less than constant H_base
        assert summary["qsr"]["rounds"] < summary["const_base"]["rounds"]
        assert summary["qsr"]["h_max"] > summary["qsr"]["h_base"]
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

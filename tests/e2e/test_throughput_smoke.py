"""Smoke run of benchmarks/throughput.py --quick: two namespaces, a shaped link, 12 steps, 3 methods."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from netns import available  # noqa: E402

pytestmark = pytest.mark.timeout(400)


@pytest.mark.skipif(available() is not None, reason=f"network namespaces unavailable: {available()}")
def test_throughput_quick(tmp_path):
    out = tmp_path / "throughput.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--quick", "--out", str(out)],
                         capture_output=True, text=True, timeout=380)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert list(rows) == ["ceiling", "hsdp", "qsr_tau1_int8"]  # the ceiling first
    assert all(r["repeat"] == 0 and r["bandwidth_mbit"] == 50 and "error" not in r for r in rows.values())
    assert len(data["load_before"]) == len(data["load_after"]) == 3
    model = rows["ceiling"]["model_bytes"]

    # fair data parallel: HSDP's gradients cross the link once per step, once each way
    hsdp = rows["hsdp"]
    assert hsdp["replicas_identical"] and hsdp["rounds"] == hsdp["steps"] == 12
    assert 0.98 <= hsdp["link_bytes"] / hsdp["steps"] / 2 / model <= 1.10
    # overlapped int8 rounds: identical replicas at the end, about a quarter of fp32 per round on the wire
    # (the veth counters, after the start-up broadcast of one fp32 model)
    q = rows["qsr_tau1_int8"]
    assert q["replicas_identical"] and q["overlap_steps"] == 1 and q["compress"] == "int8" and q["rounds"] >= 4
    per_round_each_way = (q["link_bytes"] - model) / q["rounds"] / 2
    assert 0.24 <= per_round_each_way / model <= 0.32
    assert hsdp["link_bytes"] / hsdp["steps"] > 3 * q["link_bytes"] / q["steps"]
    # what its rounds hold per rank: an fp32 snapshot, anchor and residual of the rank's half of the model
    assert q["round_memory_bytes_per_rank"] >= 3 * model / 2 and hsdp["round_memory_bytes_per_rank"] == 0

    cells = {c["method"]: c for c in data["cells"]}
    assert set(cells) == set(rows) and all(c["repeats"] == 1 and c["failed"] == 0 for c in cells.values())
    assert cells["ceiling"]["ratio_to_ceiling"] == {"median": 1.0, "min": 1.0, "max": 1.0}
    assert cells["hsdp"]["seconds_per_step"]["median"] == hsdp["seconds_per_step"]
    # the report is generated next to a non-default --out, verdicts included
    report = out.with_suffix(".md").read_text()
    assert "## Targets" in report and data["command"] in report
    assert "- qsr_tau1_int8:" in report and ("**met**" in report or "**MISSED**" in report)
    assert out.with_suffix(".png").stat().st_size > 0
    # nothing is left behind
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    assert not [name for name in left if name.startswith("qsr")], left

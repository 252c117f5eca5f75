"""Smoke run of benchmarks/throughput.py: two namespaces, a shaped link, 8 steps."""
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
def test_throughput_smoke(tmp_path):
    out = tmp_path / "throughput.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--smoke", "--out", str(out)],
                         capture_output=True, text=True, timeout=380)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"data_parallel", "qsr"}
    qsr = rows["qsr"]
    # the interface counters agree with what the summary says crossed between replicas
    assert qsr["expected_link_bytes"] > 0
    assert 0.98 <= qsr["link_bytes"] / qsr["expected_link_bytes"] <= 1.10
    # data parallel sends far more over the link than QSR for the same steps
    assert rows["data_parallel"]["link_bytes"] > 3 * qsr["link_bytes"]
    # nothing is left behind
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    assert not [name for name in left if name.startswith("qsr")], left

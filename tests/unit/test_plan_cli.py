"""`qsr-ds plan`: numbers of the shipped configs, JSON output, plot, error exits."""
import json
import os
import subprocess
import sys

import pytest

from qsr_ds.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "configs")
VIT = os.path.join(CONFIGS, "vit_b_local_adamw.json")


def run_json(capsys, path):
    assert main(["plan", "--config", path, "--json"]) == 0
    out = capsys.readouterr().out
    return json.loads(out)


def test_vit_plan_json(capsys):
    plan = run_json(capsys, VIT)
    # The same numbers as the paper's own LR formula (tests/unit/test_schedule.py). DeepSpeed's
    # WarmupCosineLR runs step s with its iteration s - 1, so its warm-up lags the paper's by
    # one step, but its cosine counts iteration - warmup + 1: the two offsets cancel and every
    # step from 10,001 on gets the paper's lr. Only step 10,000 differs (0.0079992 vs 0.008),
    # where H is 4 either way, so every round boundary is the paper's.
    assert plan["rounds"] == 9_711
    assert plan["total_steps"] == plan["data_parallel_rounds"] == 93_600
    assert plan["comm_ratio"] == pytest.approx(9_711 / 93_600)
    assert plan["first_growth_step"] == 17_876
    assert plan["max_h"] == plan["last_round_h"] == 8_142
    assert plan["last_round_start"] == 93_600 - 8_142
    assert plan["constant_h_rounds"] == 23_400
    assert plan["rule"] == "qsr" and plan["gamma"] == 2.0
    assert plan["warnings"] == []
    phases = plan["phases"]
    assert phases[0]["name"] == "warm-up" and (phases[0]["min_h"], phases[0]["max_h"]) == (4, 4)
    assert sum(p["rounds"] for p in phases) == 9_711
    assert phases[-1]["max_h"] == 8_142


def test_example_configs_save_communication(capsys):
    qsr, constant, post = (run_json(capsys, os.path.join(CONFIGS, name))
                           for name in ("qsr.json", "constant_h.json", "post_local.json"))
    assert constant["rounds"] == 100 and constant["first_growth_step"] is None
    assert post["rounds"] == 20 + 90 and post["max_h"] == 2
    assert qsr["rounds"] < 0.8 * constant["rounds"]
    assert 10 <= qsr["max_h"] < 100 and qsr["first_growth_step"] is not None
    for plan in (qsr, constant, post):
        assert plan["total_steps"] == 200 and plan["warnings"] == []


def test_text_report(capsys):
    assert main(["plan", "--config", VIT]) == 0
    out = capsys.readouterr().out
    for needle in ("9,711", "93,600", "23,400", "17,876", "8,142", "warm-up", "10/10"):
        assert needle in out


def test_plot_writes_png(tmp_path, capsys):
    out = tmp_path / "plan.png"
    assert main(["plan", "--config", os.path.join(CONFIGS, "qsr.json"), "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_console_entry_as_subprocess():
    done = subprocess.run([sys.executable, "-m", "qsr_ds.cli", "plan", "--config", VIT, "--json"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["rounds"] == 9_711


def write_config(tmp_path, data):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_missing_scheduler_exits_2(tmp_path, capsys):
    data = json.load(open(VIT))
    del data["scheduler"]
    path = write_config(tmp_path, data)
    assert main(["plan", "--config", path]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and path in err and 'no "scheduler" section' in err and "add one" in err
    assert "Traceback" not in err


def test_bad_qsr_key_exits_2(tmp_path, capsys):
    data = json.load(open(VIT))
    data["qsr"]["alpah"] = data["qsr"].pop("alpha")
    path = write_config(tmp_path, data)
    assert main(["plan", "--config", path, "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "qsr.alpah" in captured.err and "did you mean 'alpha'" in captured.err and path in captured.err


def test_mismatched_total_steps_warns(tmp_path, capsys):
    data = json.load(open(VIT))
    data["qsr"]["total_steps"] = 90_000
    data["qsr"]["warmup_steps"] = 5_000
    assert main(["plan", "--config", write_config(tmp_path, data), "--json"]) == 0
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)["warnings"]) == 2
    assert "warning: qsr.total_steps=90000 but scheduler.params.total_num_steps=93600" in captured.err


def test_zero_lr_at_a_round_start_exits_2(tmp_path, capsys):
    data = json.load(open(VIT))
    data["qsr"]["warmup_steps"] = 0  # DeepSpeed's WarmupCosineLR runs step 0 with lr 0
    assert main(["plan", "--config", write_config(tmp_path, data)]) == 2
    assert "learning rate must be > 0" in capsys.readouterr().err


def test_missing_file_exits_2(tmp_path, capsys):
    assert main(["plan", "--config", str(tmp_path / "none.json")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_matplotlib_is_imported_only_for_plot():
    code = ("import sys; from qsr_ds.cli import main; "
            f"assert main(['plan', '--config', {VIT!r}, '--json']) == 0; "
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported without --plot'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr

"""The wall-time cost model (qsr_ds.planning.projection) and `qsr-ds plan --project`: hand-computed arithmetic."""
import json
import math
import os
import subprocess
import sys

import pytest

from qsr_ds.planning import projection as pj
from qsr_ds.cli import main
from qsr_ds.config import from_dict
from qsr_ds.planning.plan import build_projection, cost_inputs, load_plan_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "configs")
VIT = os.path.join(CONFIGS, "vit_b_local_adamw.json")


def inputs(**overrides):
    # 1 MB per replica over 8 Mbit/s: 1 s per collective when R = 2 (a node sends 2(R-1)/R = 1 x the bytes)
    values = dict(step_seconds=0.5, replicas=2, state_bytes=1e6, state_elements=2.5e5, grad_bytes=1e6,
                  bandwidth_bits_per_s=8e6)
    values.update(overrides)
    return pj.CostInputs(**values)


def by_method(methods):
    return {m.method: m for m in methods}


def test_two_blocking_rounds_of_h4():
    m = pj.project_rounds(inputs(), [(0, 4), (4, 4)], method="constant_h", label="H=4")
    assert (m.steps, m.collectives, m.blocking) == (8, 2, 2)
    assert m.seconds_per_collective == 1.0 and m.rho == 2.0
    assert m.compute_seconds == 4.0 and m.exposed_comm_seconds == 2.0 and m.seconds == 6.0
    assert m.hours == 6.0 / 3600
    with_latency = pj.project_rounds(inputs(latency_s=0.01), [(0, 4), (4, 4)], method="c", label="c")
    assert with_latency.seconds == pytest.approx(6.02, abs=1e-12)


def test_ring_factor_grows_with_replicas():
    assert [pj.ring_factor(r) for r in (1, 2, 4, 8)] == [0.0, 1.0, 1.5, 1.75]
    assert pj.round_seconds(inputs(replicas=4)) == 1.5
    alone = pj.project_rounds(inputs(replicas=1, latency_s=1.0), [(0, 4), (4, 4)], method="c", label="c")
    assert (alone.collectives, alone.blocking, alone.seconds) == (0, 0, 4.0)  # R = 1 sends nothing


def test_data_parallel_once_per_step_with_overlap_fraction():
    dp = pj.project_data_parallel(inputs(), 8)
    assert (dp.collectives, dp.blocking, dp.seconds) == (8, 8, 8 * (0.5 + 1.0))
    half = pj.project_data_parallel(inputs(dp_overlap=0.5), 8)
    assert half.exposed_comm_seconds == 8 * (1.0 - 0.25)
    hidden = pj.project_data_parallel(inputs(dp_overlap=1.0, grad_bytes=2.5e5), 8)  # 0.25 s under 0.5 s
    assert (hidden.seconds, hidden.blocking) == (4.0, 0)


def test_overlap_hides_up_to_tau_steps_except_short_and_last_rounds():
    rounds = [(0, 4), (4, 4), (8, 2)]
    four = inputs(replicas=4, overlap_steps=2)  # c = 1.5 s, tau t = 1.0 s
    m = pj.project_rounds(four, rounds, method="q", label="q")
    assert m.blocking == 1  # only the last round
    assert m.exposed_comm_seconds == pytest.approx(0.5 + 0.5 + 1.5)
    # a round of H < tau + 1 blocks
    assert pj.project_rounds(inputs(overlap_steps=4), rounds, method="q", label="q").blocking == 3
    # tau t >= c: an overlapped round costs nothing
    long = pj.project_rounds(inputs(overlap_steps=4), [(0, 8), (8, 8), (16, 1)], method="q", label="q")
    assert long.exposed_comm_seconds == 1.0 and long.blocking == 1
    assert [pj.is_blocking(h, last, 1) for h, last in ((1, False), (2, False), (2, True))] == [True, False, True]
    assert pj.is_blocking(100, False, 0)


def test_compressed_bytes():
    fp32 = inputs(state_bytes=4e6, state_elements=1e6)
    assert pj.wire_bytes(fp32) == 4e6
    assert pj.wire_bytes(inputs(state_bytes=4e6, state_elements=1e6, compress="bf16")) == 2e6
    int8 = inputs(state_bytes=4e6, state_elements=1e6, compress="int8")
    assert pj.wire_bytes(int8) == 1e6 + 4 * math.ceil(1e6 / 256) == 1_015_628
    assert pj.wire_bytes(inputs(state_bytes=4e6, state_elements=1e6, compress="int8", int8_block=1000)) == 1_004_000
    assert pj.round_seconds(int8) == pytest.approx(1_015_628 * 8 / 8e6)
    # compressed rounds all-gather one row per replica: (R - 1) rows on each node's link
    assert pj.round_link_bytes(int8) == 1_015_628 and pj.round_link_bytes(fp32) == 4e6
    four = dict(state_bytes=4e6, state_elements=1e6, replicas=4)
    assert pj.round_link_bytes(inputs(**four)) == 1.5 * 4e6
    assert pj.round_link_bytes(inputs(**four, compress="bf16")) == 3 * 2e6  # more than fp32's ring at R = 4
    assert pj.round_link_bytes(inputs(**four, compress="int8")) == 3 * 1_015_628
    # the owner route sums segments at their owners and all-gathers the sums: a ring's 2(R-1)/R rows
    assert pj.round_link_bytes(inputs(**four, compress="int8", compress_route="owner")) == 1.5 * 1_015_628
    assert pj.round_link_bytes(inputs(state_bytes=4e6, state_elements=1e6, compress="bf16",
                                      compress_route="owner")) == 2e6  # R = 2: the same bytes as gather
    # a state already in bf16 gains nothing from bf16 rounds
    assert pj.wire_bytes(inputs(state_bytes=2e6, state_elements=1e6, compress="bf16")) == 2e6


def test_project_puts_methods_side_by_side():
    got = by_method(pj.project(inputs(), constant_rounds=[(0, 4), (4, 4)], schedule_rounds=[(0, 2), (2, 6)],
                               rule="qsr", h_base=2))
    assert list(got) == ["compute_only", "data_parallel", "constant_h", "qsr"]
    assert [got[k].seconds for k in got] == [4.0, 12.0, 6.0, 6.0]
    with pytest.raises(pj.ProjectionError, match="same steps"):
        pj.project(inputs(), constant_rounds=[(0, 4)], schedule_rounds=[(0, 8)], rule="qsr", h_base=4)


@pytest.mark.parametrize("field, value, needle", [
    ("step_seconds", 0.0, "step_seconds: must be a finite number > 0"),
    ("bandwidth_bits_per_s", float("inf"), "bandwidth_bits_per_s: must be a finite number > 0"),
    ("replicas", 0, "replicas: must be an integer >= 1"),
    ("replicas", 2.0, "replicas: must be an integer >= 1"),
    ("overlap_steps", -1, "overlap_steps: must be an integer >= 0"),
    ("dp_overlap", 1.5, "dp_overlap: must be a fraction between 0 and 1"),
    ("compress", "zstd", "compress: must be one of none, bf16, int8"),
    ("compress_route", "ring", "compress_route: must be one of gather, owner"),
    ("latency_s", -1e-3, "latency_s: must be a finite number >= 0"),
])
def test_bad_inputs_name_the_field(field, value, needle):
    with pytest.raises(pj.ProjectionError, match=needle) as err:
        inputs(**{field: value})
    assert err.value.field == field


def test_parsers():
    assert pj.parse_bandwidth("10gbit") == 1e10
    assert pj.parse_bandwidth("200Mbit/s") == 2e8 == pj.parse_bandwidth("200 mbps")
    assert pj.parse_count("86M") == 86e6 and pj.parse_count("7B") == 7e9 and pj.parse_count("1.5e3") == 1500
    assert pj.parse_bytes("344MB") == 344e6 and pj.parse_bytes("1GiB") == 2**30 and pj.parse_bytes("10") == 10
    assert pj.dtype_bytes("bf16") == 2 and pj.dtype_bytes("FP32") == 4
    for parse, text in ((pj.parse_bandwidth, "10"), (pj.parse_bandwidth, "10gb"), (pj.parse_count, "86X"),
                        (pj.parse_bytes, "-3MB"), (pj.parse_count, "0")):
        with pytest.raises(ValueError):
            parse(text)
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        pj.dtype_bytes("fp8")


def test_cost_inputs_count_the_averaged_state():
    config = from_dict({"h_base": 4, "total_steps": 100, "average": ["params", "exp_avg", "exp_avg_sq", "buffers"]})
    got = cost_inputs(config, step_seconds=1.0, replicas=2, params=1e6, bandwidth_bits_per_s=1e9, grad_dtype="bf16")
    assert got.state_elements == 3e6 and got.state_bytes == 12e6  # buffers not counted
    assert got.grad_bytes == 2e6
    plain = cost_inputs(from_dict({"h_base": 4, "total_steps": 100}), step_seconds=1.0, replicas=2, params=1e6,
                        bandwidth_bits_per_s=1e9, state_dtype="bf16")
    assert (plain.state_bytes, plain.grad_bytes, plain.overlap_steps, plain.compress) == (2e6, 2e6, 0, "none")
    with pytest.raises(pj.ProjectionError) as err:
        cost_inputs(config, step_seconds=1.0, replicas=2, params=1e6, bandwidth_bits_per_s=1e9, grad_dtype="fp7")
    assert err.value.field == "grad_dtype"


@pytest.mark.parametrize("name", ["vit_b_local_adamw.json", "qsr.json", "constant_h.json", "post_local.json"])
def test_round_counts_are_the_schedules(name):
    config, lr_at = load_plan_inputs(os.path.join(CONFIGS, name))
    rounds = config.schedule().rounds(lr_at)
    got = build_projection(config, lr_at, cost_inputs(config, step_seconds=0.1, replicas=2, params=1e6,
                                                      bandwidth_bits_per_s=1e9))
    methods = {m["method"]: m for m in got["methods"]}
    assert methods[config.rule]["collectives"] == len(rounds)
    assert methods["constant_h"]["collectives"] == math.ceil(config.total_steps / config.h_base)
    assert methods["data_parallel"]["collectives"] == config.total_steps
    assert {m["steps"] for m in got["methods"]} == {config.total_steps}


VIT_FLAGS = ["--project", "--step-time", "0.75", "--params", "86M", "--bandwidth", "10gbit", "--world-size", "16"]


def test_vit_worked_example_json(capsys):
    assert main(["plan", "--config", VIT, "--json", *VIT_FLAGS]) == 0
    proj = json.loads(capsys.readouterr().out)["projection"]
    assert proj["inputs"]["replicas"] == 2 and proj["ranks_per_replica"] == 8
    c = 86e6 * 4 * 8 / 10e9  # 344 MB over 10 Gbit/s, ring factor 1
    methods = {m["method"]: m for m in proj["methods"]}
    assert methods["data_parallel"]["seconds"] == pytest.approx(93_600 * (0.75 + c))
    assert methods["constant_h"]["seconds"] == pytest.approx(93_600 * 0.75 + 23_400 * c)
    assert methods["qsr"]["seconds"] == pytest.approx(93_600 * 0.75 + 9_711 * c)
    assert round(methods["data_parallel"]["hours"], 1) == 26.7 and round(methods["qsr"]["hours"], 1) == 20.2
    assert methods["qsr"]["rho"] == pytest.approx(c / 0.75)


def test_text_table_and_model_bytes(capsys):
    flags = ["--project", "--step-time", "0.75", "--model-bytes", "344MB", "--bandwidth", "10000mbit", "--replicas", "2"]
    assert main(["plan", "--config", VIT, *flags]) == 0
    out = capsys.readouterr().out
    assert "9,711" in out and "projected wall time" in out and "2(R-1)/R = 1 x" in out
    table = {line.split()[0]: line.split() for line in out.splitlines()[-6:]}
    assert table["qsr"][-3] == "20.24" and table["data"][-3] == "26.66"


@pytest.mark.parametrize("extra, needle", [
    (["--bandwidth", "10"], "error: --bandwidth: cannot read '10'"),
    (["--step-time", "0"], "error: --step-time: must be a finite number > 0"),
    (["--params", "lots"], "error: --params: cannot read 'lots'"),
    (["--compress", "zstd"], "error: --compress: must be one of none, bf16, int8"),
    (["--compress-route", "ring"], "error: --compress-route: must be one of gather, owner"),
    (["--dp-overlap", "2"], "error: --dp-overlap: must be a fraction"),
    (["--overlap-steps", "-1"], "error: --overlap-steps: must be an integer >= 0"),
    (["--int8-block", "0"], "error: --int8-block: must be an integer >= 1"),
    (["--latency-ms", "-5"], "error: --latency-ms: must be a finite number >= 0"),
    (["--grad-dtype", "fp7"], "error: --grad-dtype: unknown dtype 'fp7'"),
    (["--world-size", "12"], "error: --world-size: " + VIT + ": qsr.ranks_per_replica=8 does not divide"),
    (["--model-bytes", "1GB"], "error: --params / --model-bytes: give exactly one"),
])
def test_bad_flag_names_the_flag(capsys, extra, needle):
    flags = list(VIT_FLAGS)
    for i in range(0, len(extra), 2):
        if extra[i] in flags:
            flags[flags.index(extra[i]) + 1] = extra[i + 1]
        else:
            flags += extra[i:i + 2]
    assert main(["plan", "--config", VIT, "--json", *flags]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert captured.err.startswith(needle), captured.err
    assert captured.err.count("error:") == 1


def test_missing_and_stray_flags(capsys):
    assert main(["plan", "--config", VIT, "--project", "--step-time", "1", "--params", "1M", "--replicas", "2"]) == 2
    assert capsys.readouterr().err == "error: --bandwidth: required with --project\n"
    assert main(["plan", "--config", VIT, "--bandwidth", "1gbit"]) == 2
    assert capsys.readouterr().err == "error: --bandwidth: only used with --project\n"
    assert main(["plan", "--config", VIT, "--project", "--step-time", "1", "--params", "1M", "--bandwidth", "1gbit"]) == 2
    assert capsys.readouterr().err == "error: --replicas / --world-size: give exactly one\n"


def test_unparsable_number_names_the_flag(capsys):
    flags = [f if f != "0.75" else "fast" for f in VIT_FLAGS]
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "--config", VIT, *flags])
    assert exit_.value.code == 2
    assert "argument --step-time: invalid float value: 'fast'" in capsys.readouterr().err


def test_projection_needs_no_torch():
    code = "import sys, qsr_ds.planning.projection, qsr_ds.planning.plan; assert 'torch' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr


def load_validator():
    import importlib.util

    spec = importlib.util.spec_from_file_location("validate_projection",
                                                  os.path.join(ROOT, "benchmarks", "validate_projection.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_validator_projects_rows_from_measured_inputs():
    v = load_validator()
    # 7.5 MB per round over 50 Mbit/s: 1.2 s; the 40-step compression of configs/qsr.json runs 14 rounds
    base = dict(bandwidth_mbit=50.0, delay_ms=0.0, steps=40)
    rows = [
        dict(base, method="ceiling", seconds_per_step=0.3, repeat=0),
        dict(base, method="qsr", seconds_per_step=0.3 + 14 * 1.2 / 40, rounds=14,
             bytes_across_replicas=14 * 7.5e6, repeat=0),
        dict(base, method="data_parallel", seconds_per_step=1.5, rounds=40, link_bytes=2 * 40 * 6.25e6,
             bytes_across_replicas=0, repeat=0),
        # torchft's LocalSGD runs H = h_base = 2 throughout: 20 rounds in 40 steps, not the QSR schedule's 14
        dict(base, method="torchft_localsgd", seconds_per_step=0.3 + 20 * 1.2 / 40, rounds=20,
             bytes_across_replicas=20 * 7.5e6, repeat=0),
        dict(base, method="ceiling", median_seconds_per_step=0.5, repeat=1),
        dict(base, method="qsr", median_seconds_per_step=0.5, rounds=13, bytes_across_replicas=13 * 7.5e6, repeat=1),
        dict(base, method="torchft_diloco", seconds_per_step=0.4, link_bytes=1e6, repeat=1),
        dict(base, method="qsr", seconds_per_step=0.4, rounds=14, bytes_across_replicas=1e6, repeat=2),
    ]
    got = v.validate({"rows": rows})
    qsr, dp, torchft, odd, peer, lonely = got["rows"]
    assert torchft["inputs_note"] == "20 rounds" and torchft["error"] == pytest.approx(0.0, abs=1e-12)
    assert peer["skipped"].startswith("skipped: no bytes per round") and "error" not in peer
    assert lonely["skipped"] == "skipped: no ceiling row"
    assert qsr["projected_seconds_per_step"] == pytest.approx(0.72) and qsr["error"] == pytest.approx(0.0, abs=1e-12)
    assert qsr["inputs_note"] == "14 rounds" and qsr["within_target"]
    assert dp["projected_seconds_per_step"] == pytest.approx(0.3 + 1.0)  # 6.25 MB per direction per step
    assert dp["error"] == pytest.approx(1.3 / 1.5 - 1) and not dp["within_target"]
    assert odd["ceiling_seconds_per_step"] == 0.5  # its own repeat's ceiling
    assert odd["inputs_note"].startswith("schedule not rebuilt")
    assert odd["projected_seconds_per_step"] == pytest.approx(0.5 + 13 * 1.2 / 40)
    # judged per cell, as the throughput table reports: medians over the cell's runs
    cells = {(c["bandwidth_mbit"], c["method"]): c for c in got["cells"]}
    assert list(cells) == [(50.0, "qsr"), (50.0, "data_parallel"), (50.0, "torchft_localsgd")]
    two = cells[(50.0, "qsr")]
    assert two["repeats"] == 2 and two["row_errors"] == [qsr["error"], odd["error"]]
    assert two["measured_seconds_per_step"] == pytest.approx((0.72 + 0.5) / 2)
    assert two["projected_seconds_per_step"] == pytest.approx((0.72 + 0.5 + 13 * 1.2 / 40) / 2)
    assert not two["within_target"] and cells[(50.0, "torchft_localsgd")]["within_target"]
    assert (got["checked"], got["within_target"]) == (3, 1)

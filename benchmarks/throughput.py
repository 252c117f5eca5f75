"""Throughput of the main job when replicas talk over a real, slow link.

Two test hosts (network namespaces joined by a veth pair shaped with `tc tbf`) each run
one replica of 2 ranks (torchrun --nnodes 2). Per bandwidth, side by side in one run:

  ceiling       each host trains alone (same compute, nothing crosses the link)
  data_parallel one replica of 4 ranks over both hosts: ZeRO-2 reduces every step across the link
  constant      2 replicas x 2 ranks, H = h_base
  qsr           2 replicas x 2 ranks, the QSR schedule of configs/qsr.json

    python benchmarks/throughput.py --quick          # < 5 min on 2 cores
    python benchmarks/throughput.py                  # 50, 200, 1000 Mbit/s, writes results/
    python benchmarks/throughput.py --report-only    # regenerate the .md and plot from the JSON

Needs root (ip netns). Traffic goes only between the two namespaces it makes.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from netns import SlowLink, available  # noqa: E402

METHODS = ("ceiling", "data_parallel", "constant", "qsr")
RESULTS = HERE / "results" / "throughput.json"
REPORT = HERE / "throughput.md"
PLOT = HERE / "results" / "throughput.png"
MASTER_PORT = 29611
SEQ_LEN = 64


def make_config(base: dict, method: str, steps: int, workdir: Path) -> Path:
    cfg = copy.deepcopy(base)
    warmup = max(1, steps // 10)
    sched = cfg["scheduler"]["params"]
    sched["total_num_steps"], sched["warmup_num_steps"] = steps, warmup
    qsr = cfg["qsr"]
    qsr["total_steps"], qsr["warmup_steps"] = steps, warmup
    if method == "constant":
        qsr["rule"], qsr["alpha"] = "constant", 0.0
    path = workdir / f"{method}.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path


def train_cmd(config: Path, steps: int, ranks_per_replica: int, summary: Path, nnodes: int, node_rank: int,
              master: str, port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--node_rank={node_rank}",
            "--nproc_per_node=2", f"--master_addr={master}", f"--master_port={port}",
            str(ROOT / "examples" / "train_gpt.py"), "--deepspeed_config", str(config), "--steps", str(steps),
            "--ranks-per-replica", str(ranks_per_replica), "--summary-json", str(summary), "--no-progress",
            "--seq-len", str(SEQ_LEN)]


def run_method(link: SlowLink, method: str, config: Path, steps: int, workdir: Path, port: int) -> dict:
    cfg = json.loads(config.read_text())
    tokens_per_step = 4 * cfg["train_micro_batch_size_per_gpu"] * cfg.get("gradient_accumulation_steps", 1) * SEQ_LEN
    env = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    before = [link.tx_bytes(h) for h in (0, 1)]
    summaries = [workdir / f"{method}-{h}.json" for h in (0, 1)]
    if method == "ceiling":  # two independent single-host jobs
        cmds = [train_cmd(config, steps, 2, summaries[h], 1, 0, "127.0.0.1", port) for h in (0, 1)]
    else:
        per_replica = 4 if method == "data_parallel" else 2
        cmds = [train_cmd(config, steps, per_replica, summaries[0], 2, h, link.addresses[0], port) for h in (0, 1)]
    start = time.perf_counter()
    procs = [link.popen(h, cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for h, cmd in enumerate(cmds)]
    outputs = [p.communicate(timeout=1800)[0] for p in procs]
    wall = time.perf_counter() - start
    for p, out in zip(procs, outputs):
        if p.returncode:
            raise RuntimeError(f"{method} failed (exit {p.returncode}):\n{out[-3000:]}")
    link_bytes = sum(link.tx_bytes(h) - before[h] for h in (0, 1))
    summary = json.loads(summaries[0].read_text())
    if method == "ceiling":
        other = json.loads(summaries[1].read_text())
        summary["seconds_per_step"] = max(summary["seconds_per_step"], other["seconds_per_step"])
    reduced = summary["bytes_across_replicas"] if method in ("constant", "qsr") else 0
    model_bytes = summary["bytes_data_parallel"] // steps  # one replica's fp32 state
    return {
        "method": method,
        "seconds_per_step": summary["seconds_per_step"],
        "tokens_per_s": tokens_per_step / summary["seconds_per_step"],
        "rounds": summary["rounds"] if method in ("constant", "qsr") else (steps if method == "data_parallel" else 0),
        "link_bytes": link_bytes,
        # a 2-rank ring all-reduce sends the reduced bytes once in each direction; at start-up
        # replica 0 broadcasts its weights to replica 1 once
        "expected_link_bytes": 2 * reduced + model_bytes if method in ("constant", "qsr") else None,
        "bytes_across_replicas": reduced,
        "final_loss": summary["final_loss"],
        "wall_seconds": wall,
    }


def sweep(bandwidths: list[float], steps: int, delay_ms: float, methods=METHODS) -> list[dict]:
    base = json.loads((ROOT / "configs" / "qsr.json").read_text())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for i, mbit in enumerate(bandwidths):
            with SlowLink(mbit, delay_ms) as link:
                by_method = {}
                for j, method in enumerate(methods):
                    config = make_config(base, method, steps, workdir)
                    row = run_method(link, method, config, steps, workdir, MASTER_PORT + 10 * i + j)
                    row.update(bandwidth_mbit=mbit, delay_ms=delay_ms, steps=steps)
                    by_method[method] = row
                    print(f"{mbit:6.0f} Mbit/s  {method:14s} {row['seconds_per_step'] * 1e3:8.1f} ms/step  "
                          f"{row['tokens_per_s']:8.0f} tok/s  link {row['link_bytes'] / 1e6:8.1f} MB", flush=True)
                ceiling = by_method.get("ceiling")
                for row in by_method.values():
                    row["ratio_to_ceiling"] = (row["tokens_per_s"] / ceiling["tokens_per_s"]) if ceiling else None
                rows += by_method.values()
    return rows


def verdict(rows: list[dict]) -> list[str]:
    lines = []
    for mbit in sorted({r["bandwidth_mbit"] for r in rows}):
        at = {r["method"]: r for r in rows if r["bandwidth_mbit"] == mbit}
        if "qsr" in at and "data_parallel" in at:
            dp, q = at["data_parallel"]["ratio_to_ceiling"], at["qsr"]["ratio_to_ceiling"]
            target = "n/a (data parallel >= 0.5x)" if dp >= 0.5 else ("met" if q >= 0.9 else "MISSED")
            lines.append(f"| {mbit:g} | {dp:.2f} | {at.get('constant', {}).get('ratio_to_ceiling', float('nan')):.2f} "
                         f"| {q:.2f} | {target} |")
    return lines


def write_report(data: dict) -> None:
    rows = data["rows"]
    table = ["| Mbit/s | method | ms/step | tokens/s | x ceiling | rounds | link MB | expected MB |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        exp = f"{r['expected_link_bytes'] / 1e6:.1f}" if r["expected_link_bytes"] else "-"
        table.append(f"| {r['bandwidth_mbit']:g} | {r['method']} | {r['seconds_per_step'] * 1e3:.0f} | "
                     f"{r['tokens_per_s']:.0f} | {r['ratio_to_ceiling']:.2f} | {r['rounds']} | "
                     f"{r['link_bytes'] / 1e6:.1f} | {exp} |")
    text = f"""# Throughput over a bandwidth-limited link

Command: `{data['command']}` ({data['date']}, {data['machine']}).

Two network namespaces joined by a veth pair shaped with `tc tbf` (rate below, burst 512 kB,
{data['delay_ms']} ms added netem delay), one replica of 2 ranks in each; the main job
(`examples/train_gpt.py`, DeepSpeed ZeRO-2, {data['params_note']}) for {data['steps']} steps per method, all
methods measured one after another in the same run. "x ceiling" is throughput divided by
the compute-only ceiling (each host training alone) at the same bandwidth. Link bytes are
the veth interfaces' tx counters (both directions, with TCP/IP overhead and the tiny
per-round check); "expected" is twice the bytes the summary JSON says were all-reduced
across replicas (a 2-rank ring sends them once each way) plus one model for the start-up
broadcast from replica 0.

{chr(10).join(table)}

## Target: QSR >= 0.9x ceiling wherever data parallel < 0.5x

| Mbit/s | data parallel | constant H | QSR | target |
| ---: | ---: | ---: | ---: | --- |
{chr(10).join(verdict(rows))}

![throughput vs bandwidth](results/throughput.png)

Caveats: 4 training processes share 2 CPU cores, so the ceiling itself is compute-bound
and noisy; the schedule is configs/qsr.json compressed to {data['steps']} steps (warm-up =
10%), so QSR's H grows only in the last part of the run.

{("## Reading" + chr(10) + chr(10) + data["notes"]) if data.get("notes") else ""}
"""
    REPORT.write_text(text)


def plot(data: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in METHODS:
        pts = sorted((r["bandwidth_mbit"], r["tokens_per_s"]) for r in data["rows"] if r["method"] == method)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=method)
    ax.set_xscale("log")
    ax.set_xlabel("link bandwidth (Mbit/s)")
    ax.set_ylabel("tokens / s")
    ax.set_title("main job, 2 replicas x 2 ranks over a shaped link")
    ax.legend()
    fig.tight_layout()
    fig.savefig(PLOT, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one bandwidth, few steps (< 5 min)")
    p.add_argument("--smoke", action="store_true", help="tiny run for CI: 1 bandwidth, data parallel and qsr")
    p.add_argument("--bandwidths", type=float, nargs="+", default=[50, 200, 1000])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--delay-ms", type=float, default=0.0, help="extra netem delay (needs the sch_netem kernel module)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results JSON")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    if args.report_only:
        data = json.loads(RESULTS.read_text())
        write_report(data)
        plot(data)
        return 0
    why = available()
    if why:
        print(f"throughput benchmark needs network namespaces: {why}", file=sys.stderr)
        return 2
    methods = METHODS
    if args.smoke:
        args.bandwidths, args.steps, methods = [200], 8, ("data_parallel", "qsr")
    elif args.quick:
        args.bandwidths, args.steps = [200], 40
    rows = sweep(args.bandwidths, args.steps, args.delay_ms, methods)
    data = {
        "command": "python benchmarks/throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores, gloo over veth",
        "steps": args.steps, "delay_ms": args.delay_ms, "params_note": "1.89M-parameter GPT, 7.6 MB fp32",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1))
    if args.out == RESULTS:
        write_report(data)
        plot(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())

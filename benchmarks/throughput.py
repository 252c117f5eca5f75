"""Throughput of the main job when two hosts talk over a real, slow link, measured fairly.

Two test hosts (network namespaces joined by a veth pair shaped with `tc tbf`) each run
2 ranks (torchrun --nnodes 2). Methods (rows), all on the same 4 ranks and global batch:

  ceiling        each host trains alone (DeepSpeed ZeRO-2, nothing crosses the link)
  ceiling_fsdp   the same with FSDP2 (the compute of the hsdp row; optional)
  hsdp           fair data parallel: FSDP2 HSDP on the (replicate, shard) = (2, 2) mesh,
                 gradients cross the link once per step
  ds_overlap     DeepSpeed ZeRO-2 with overlap_comm, one replica of 4 ranks over both hosts
  constant       2 replicas x 2 ranks, H = h_base
  qsr            the QSR schedule of configs/qsr.json
  qsr_tau1, qsr_tau4           QSR with overlapped rounds (overlap_steps 1, 4)
  qsr_int8, qsr_bf16           QSR with compressed rounds
  qsr_tau1_int8, qsr_tau4_int8 both
  torchft_localsgd             the peer: torchft 0.2.0 LocalSGD at H = h_base, FSDP2 inside each host
                               (benchmarks/torchft_peer.py; needs pip install -e ".[bench]")

Each repeat runs every (bandwidth, method) cell once, methods interleaved, the ceiling
first, so slow drift of the machine spreads over all methods; cells report the median and
min-max over repeats. Local methods run the whole schedule (200 steps: H grows); data
parallel's per-step cost does not depend on the step, so it runs --dp-steps of it.

    python benchmarks/throughput.py                          # everything: 4 bandwidths x 3 repeats
    python benchmarks/throughput.py --bandwidths 50 --methods ceiling hsdp qsr qsr_tau4_int8
    python benchmarks/throughput.py --quick --out /tmp/tp.json   # tiny (CI smoke test)
    python benchmarks/throughput.py --report-only            # .md and plot again from the JSON

Needs root (ip netns). Traffic goes only between the two namespaces it makes. Run it on
an otherwise idle machine: the report records the load average before and after.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from netns import SlowLink, available  # noqa: E402
from throughput_report import plot, write_report  # noqa: E402

RESULTS = HERE / "results" / "throughput.json"
BASE_CONFIG = ROOT / "configs" / "qsr.json"
MASTER_PORT = 29611
SEQ_LEN = 64
RANKS_PER_HOST = 2
HOSTS = 2


@dataclass(frozen=True, kw_only=True)
class Method:
    """One row of the benchmark: how train_gpt.py is started for it."""

    name: str
    """Row name in the JSON and the table."""
    kind: str
    """ceiling (each host alone) | dp (data parallel over the link) | local (replicas with QSR rounds)."""
    engine: str = "deepspeed"
    """deepspeed | fsdp | hsdp (train_gpt.py --fsdp --hsdp)."""
    ranks_per_replica: int = RANKS_PER_HOST
    """S given to train_gpt.py; 4 = one replica over both hosts."""
    qsr: dict = field(default_factory=dict)
    """Keys set in the "qsr" section."""
    zero: dict = field(default_factory=dict)
    """Keys set in "zero_optimization"."""


METHODS = {m.name: m for m in (
    Method(name="ceiling", kind="ceiling"),
    Method(name="ceiling_fsdp", kind="ceiling", engine="fsdp"),
    Method(name="hsdp", kind="dp", engine="hsdp"),
    Method(name="ds_overlap", kind="dp", ranks_per_replica=HOSTS * RANKS_PER_HOST,
           zero={"overlap_comm": True, "contiguous_gradients": True}),
    Method(name="constant", kind="local", qsr={"rule": "constant", "alpha": 0.0}),
    Method(name="qsr", kind="local"),
    Method(name="qsr_tau1", kind="local", qsr={"overlap_steps": 1}),
    Method(name="qsr_tau4", kind="local", qsr={"overlap_steps": 4}),
    Method(name="qsr_int8", kind="local", qsr={"compress": "int8"}),
    Method(name="qsr_bf16", kind="local", qsr={"compress": "bf16"}),
    Method(name="qsr_tau1_int8", kind="local", qsr={"overlap_steps": 1, "compress": "int8"}),
    Method(name="qsr_tau4_int8", kind="local", qsr={"overlap_steps": 4, "compress": "int8"}),
    Method(name="torchft_localsgd", kind="torchft", engine="fsdp"),
)}
DEFAULT_METHODS = [m for m in METHODS if m not in ("ceiling_fsdp", "torchft_localsgd")]
QUICK = {"steps": 12, "dp_steps": 12, "bandwidths": [50.0], "repeats": 1,
         "methods": ["ceiling", "hsdp", "qsr_tau1_int8"]}


def make_config(base: dict, method: Method, steps: int, workdir: Path) -> Path:
    """configs/qsr.json with the schedule compressed to `steps` (warm-up 10%) and the method's keys.

    benchmarks/validate_projection.py rebuilds the same schedule from a row's steps and method name.
    """
    cfg = copy.deepcopy(base)
    warmup = max(1, steps // 10)
    sched = cfg["scheduler"]["params"]
    sched["total_num_steps"], sched["warmup_num_steps"] = steps, warmup
    cfg["qsr"].update(total_steps=steps, warmup_steps=warmup, **method.qsr)
    cfg["zero_optimization"].update(method.zero)
    path = workdir / f"{method.name}.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path


def train_cmd(method: Method, config: Path, steps: int, summary: Path, nnodes: int, node_rank: int,
              master: str, port: int, host: int = 0) -> list[str]:
    script = HERE / "torchft_peer.py" if method.kind == "torchft" else ROOT / "examples" / "train_gpt.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--node_rank={node_rank}",
           f"--nproc_per_node={RANKS_PER_HOST}", f"--master_addr={master}", f"--master_port={port}",
           str(script), "--deepspeed_config", str(config), "--steps", str(steps),
           "--ranks-per-replica", str(method.ranks_per_replica), "--summary-json", str(summary), "--no-progress",
           "--seq-len", str(SEQ_LEN)]
    if method.kind == "torchft":  # one torchft replica group per host; its H is the config's h_base
        h_base = json.loads(config.read_text())["qsr"]["h_base"]
        return cmd + ["--replica-id", str(host), "--num-replicas", str(HOSTS), "--sync-every", str(h_base)]
    if method.engine in ("fsdp", "hsdp"):
        cmd.append("--fsdp")
    if method.engine == "hsdp":
        cmd.append("--hsdp")
    return cmd


def start_lighthouse(link: SlowLink, port: int) -> tuple[subprocess.Popen, str]:
    """torchft's lighthouse on host 0 (it forms the quorum of replica groups); returns it and its URL."""
    binary = Path(sys.executable).with_name("torchft_lighthouse")
    proc = link.popen(0, [str(binary), "--min_replicas", str(HOSTS), "--bind", f"0.0.0.0:{port}",
                          "--join_timeout_ms", "100"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"http://{link.addresses[0]}:{port}"


def run_cell(link: SlowLink, method: Method, config: Path, steps: int, workdir: Path, port: int,
             timeout_s: float) -> dict:
    """One method once over the link; a failed run comes back as a row with "error"."""
    cfg = json.loads(config.read_text())
    tokens_per_step = (HOSTS * RANKS_PER_HOST * cfg["train_micro_batch_size_per_gpu"]
                       * cfg.get("gradient_accumulation_steps", 1) * SEQ_LEN)
    env = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    summaries = [workdir / f"{method.name}-{port}-{h}.json" for h in range(HOSTS)]
    lighthouse = None
    if method.kind == "ceiling":  # two independent single-host jobs
        cmds = [train_cmd(method, config, steps, summaries[h], 1, 0, "127.0.0.1", port) for h in range(HOSTS)]
    elif method.kind == "torchft":  # a job per host (its own store, on an address the other host reaches)
        lighthouse, env["TORCHFT_LIGHTHOUSE"] = start_lighthouse(link, port + 500)
        cmds = [train_cmd(method, config, steps, summaries[h], 1, 0, link.addresses[h], port, host=h) for h in range(HOSTS)]
    else:
        cmds = [train_cmd(method, config, steps, summaries[0], HOSTS, h, link.addresses[0], port) for h in range(HOSTS)]
    load = os.getloadavg()[0]
    before = [link.tx_bytes(h) for h in range(HOSTS)]
    start = time.perf_counter()
    procs = [link.popen(h, cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for h, cmd in enumerate(cmds)]
    outputs, error = [], None
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=max(1.0, timeout_s - (time.perf_counter() - start)))[0])
        except subprocess.TimeoutExpired:
            error = f"timed out after {timeout_s:.0f} s"
            for q in procs:
                q.kill()
            outputs.append(p.communicate()[0])
    wall = time.perf_counter() - start
    if lighthouse is not None:
        lighthouse.kill()
        lighthouse.wait()
    row = {"method": method.name, "kind": method.kind, "engine": method.engine, "steps": steps,
           "overlap_steps": int(method.qsr.get("overlap_steps", 0)), "compress": method.qsr.get("compress"),
           "ranks_per_replica": method.ranks_per_replica, "num_replicas": 1 if method.kind == "ceiling" else HOSTS,
           "wall_seconds": wall, "load_1min_before": load, "config": None}
    failed = [(p.returncode, out) for p, out in zip(procs, outputs) if p.returncode]
    if error or failed:
        code, out = failed[0] if failed else (None, outputs[0])
        log = workdir.parent / f"{workdir.name}-{method.name}-{port}.log"
        log.write_text("\n\n".join(f"== host {h} (exit {p.returncode}) ==\n{o}" for h, (p, o) in
                                    enumerate(zip(procs, outputs))))
        # the first traceback is the worker's own; torchrun's summary follows it
        first = out.find("Traceback")
        row["error"] = f"{error or f'exit {code}'} (full output: {log}): {out[max(0, first):][:3000]}"
        return row
    link_bytes = sum(link.tx_bytes(h) - before[h] for h in range(HOSTS))
    summary = json.loads(summaries[0].read_text())
    seconds = summary["seconds_per_step"]
    fingerprints = summary["replica_fingerprints"]
    if method.kind in ("ceiling", "torchft"):  # both hosts' work counts; the slower one sets the pace
        other = json.loads(summaries[1].read_text())
        seconds = max(seconds, other["seconds_per_step"])
        if method.kind == "torchft":  # each host's summary holds its own replica's fingerprint
            fingerprints = fingerprints + other["replica_fingerprints"]
    local = method.kind in ("local", "torchft")
    reduced = summary["bytes_across_replicas"] if local else 0
    row.update({
        "seconds_per_step": seconds,
        "tokens_per_s": tokens_per_step / seconds,
        "rounds": summary["rounds"] if local else (steps if method.kind == "dp" else 0),
        "link_bytes": link_bytes,
        # a 2-rank all-reduce (fp32 ring, or the compressed owner route) sends what the averager
        # counts once each way; at start-up replica 0 broadcasts its fp32 weights once
        # (torchft's replica groups start from the same seeded weights: no start-up broadcast)
        "expected_link_bytes": 2 * reduced + (4 * summary["params"] if method.kind == "local" else 0) if local else None,
        "bytes_across_replicas": reduced,
        "model_bytes": 4 * summary["params"],
        "engine_replicas": summary["num_replicas"],
        "final_loss": summary["final_loss"],
        "round_memory_bytes_per_rank": summary.get("round_memory_bytes_per_rank"),
        "replicas_identical": len(set(fingerprints)) == 1,
    })
    return row


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else None


def summarize(rows: list[dict]) -> list[dict]:
    """One cell per (bandwidth, method): median and min-max over repeats; x ceiling per repeat."""
    ceiling = {(r["bandwidth_mbit"], r["repeat"]): r["tokens_per_s"] for r in rows
               if r["method"] == "ceiling" and "error" not in r}
    for r in rows:
        c = ceiling.get((r["bandwidth_mbit"], r["repeat"]))
        r["ratio_to_ceiling"] = r["tokens_per_s"] / c if c and "error" not in r else None
    cells = []
    for key in dict.fromkeys((r["bandwidth_mbit"], r["method"]) for r in rows):
        runs = [r for r in rows if (r["bandwidth_mbit"], r["method"]) == key]
        ok = [r for r in runs if "error" not in r]
        cell = {"bandwidth_mbit": key[0], "method": key[1], "repeats": len(ok), "failed": len(runs) - len(ok)}
        for name in ("seconds_per_step", "tokens_per_s", "ratio_to_ceiling", "link_bytes", "rounds", "wall_seconds"):
            cell[name] = spread([r[name] for r in ok if r.get(name) is not None])
        if ok:
            cell["steps"], cell["overlap_steps"], cell["compress"] = ok[0]["steps"], ok[0]["overlap_steps"], ok[0]["compress"]
            cell["expected_link_bytes"] = ok[0]["expected_link_bytes"]
        cells.append(cell)
    return cells


def sweep(args, methods: list[Method]) -> list[dict]:
    base = json.loads(BASE_CONFIG.read_text())
    rows, port = [], MASTER_PORT
    logs = args.out.parent / f"{args.out.stem}-runs"  # configs and summaries; failed runs' logs stay
    logs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=logs) as tmp:
        workdir = Path(tmp)
        for repeat in range(args.repeats):
            for mbit in args.bandwidths:
                with SlowLink(mbit, args.delay_ms) as link:
                    for method in methods:
                        steps = args.dp_steps if method.kind == "dp" else args.steps
                        config = make_config(base, method, args.steps, workdir)
                        port += 1
                        row = run_cell(link, method, config, steps, workdir, port, args.cell_timeout)
                        if "error" in row:  # once more on a fresh port; the first error stays in the row
                            port += 1
                            first = row["error"]
                            row = dict(run_cell(link, method, config, steps, workdir, port, args.cell_timeout),
                                       first_error=first)
                        row.update(repeat=repeat, bandwidth_mbit=mbit, delay_ms=args.delay_ms,
                                   schedule_steps=args.steps)
                        rows.append(row)
                        if "error" in row:
                            print(f"repeat {repeat} {mbit:6.0f} Mbit/s {method.name:14s} FAILED {row['error'][:300]}",
                                  flush=True)
                        else:
                            print(f"repeat {repeat} {mbit:6.0f} Mbit/s {method.name:14s} "
                                  f"{row['seconds_per_step'] * 1e3:8.1f} ms/step {row['tokens_per_s']:8.0f} tok/s "
                                  f"link {row['link_bytes'] / 1e6:8.1f} MB  wall {row['wall_seconds']:6.1f} s", flush=True)
    if not any(logs.iterdir()):
        logs.rmdir()
    return rows


def upgrade(data: dict) -> dict:
    """A JSON of the earlier one-run-per-cell benchmark, read as one repeat."""
    if "cells" in data:
        return data
    for r in data["rows"]:
        r.setdefault("repeat", 0)
        r.setdefault("overlap_steps", 0)
        r.setdefault("compress", None)
    data.update(repeats=1, dp_steps=data["steps"], methods=list(dict.fromkeys(r["method"] for r in data["rows"])),
                cells=summarize(data["rows"]))
    return data


def merge(old: dict, new: dict) -> dict:
    """``new``'s sweep added to ``old``: its repeats numbered after old's (so each run keeps the
    ceiling of its own sweep and repeat), methods and bandwidths joined, the cells pooled."""
    offset = 1 + max(r["repeat"] for r in old["rows"])
    rows = [dict(r, repeat=r["repeat"] + offset) for r in new["rows"]]
    sweep_keys = ("command", "date", "load_before", "load_after", "wall_seconds", "repeats", "bandwidths", "methods")
    earlier = old.get("sweeps") or [{k: old.get(k) for k in sweep_keys}]
    data = dict(old, rows=old["rows"] + rows, sweeps=earlier + new["sweeps"],
                methods=list(dict.fromkeys(old["methods"] + new["methods"])),
                bandwidths=sorted(set(old["bandwidths"]) | set(new["bandwidths"])))
    data["cells"] = summarize(data["rows"])
    return data


def report(data: dict, out: Path) -> None:
    """The committed report and plot for the committed JSON; for another --out, files next to it."""
    if out.resolve() == RESULTS.resolve():
        write_report(data)
        plot(data)
    else:
        write_report(data, out.with_suffix(".md"))
        plot(data, out.with_suffix(".png"))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"tiny run for the smoke test: {QUICK['steps']} steps, 1 bandwidth, 1 repeat, 3 methods")
    p.add_argument("--bandwidths", type=float, nargs="+", default=[20.0, 50.0, 200.0, 1000.0], help="Mbit/s")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=DEFAULT_METHODS,
                   help="rows to run (ceiling is always added, first)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, help="schedule length (default: qsr.total_steps of configs/qsr.json)")
    p.add_argument("--dp-steps", type=int, default=50, help="steps the data-parallel rows run (<= --steps)")
    p.add_argument("--delay-ms", type=float, default=0.0, help="extra netem delay (needs the sch_netem kernel module)")
    p.add_argument("--cell-timeout", type=float, default=1800.0, help="seconds one run may take before it is killed")
    p.add_argument("--out", type=Path, default=RESULTS, help="results JSON; another path than the default gets "
                   "its .md and .png next to it, leaving the committed report alone")
    p.add_argument("--report-only", action="store_true", help="regenerate the report and plot from --out")
    p.add_argument("--merge", action="store_true", help="add this sweep's rows to those already in --out (its "
                   "repeats numbered after theirs, each x ceiling against its own sweep's ceiling)")
    args = p.parse_args(argv)
    if args.report_only:
        report(upgrade(json.loads(args.out.read_text())), args.out)
        return 0
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    base_steps = json.loads(BASE_CONFIG.read_text())["qsr"]["total_steps"]
    args.steps = args.steps or base_steps
    args.dp_steps = min(args.dp_steps, args.steps)
    if args.repeats < 1 or args.steps < 2 or args.dp_steps < 1:
        p.error("--repeats must be >= 1, --steps >= 2 and --dp-steps >= 1")
    why = available()
    if why:
        print(f"throughput benchmark needs network namespaces: {why}", file=sys.stderr)
        return 2
    names = ["ceiling"] + [m for m in dict.fromkeys(args.methods) if m != "ceiling"]
    methods = [METHODS[m] for m in names]
    old = upgrade(json.loads(args.out.read_text())) if args.merge and args.out.exists() else None
    if old and (old["steps"], old["dp_steps"], old["delay_ms"]) != (args.steps, args.dp_steps, args.delay_ms):
        p.error(f"--merge: {args.out} has steps {old['steps']}, dp-steps {old['dp_steps']}, delay {old['delay_ms']} ms; "
                f"this sweep would run {args.steps}, {args.dp_steps}, {args.delay_ms}")
    # the C++ kernels compile on first use (about a minute, per checkout): never inside a timed run
    subprocess.run([sys.executable, "-c", "import torch; from qsr_ds.kernels import cpp; cpp.load(torch.device('cpu'))"],
                   check=False, cwd=ROOT)
    load_before, started = os.getloadavg(), time.time()
    rows = sweep(args, methods)
    this_sweep = {
        "command": "python benchmarks/throughput.py " + " ".join(argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "load_before": list(load_before), "load_after": list(os.getloadavg()),
        "wall_seconds": time.time() - started, "repeats": args.repeats, "bandwidths": args.bandwidths, "methods": names,
    }
    data = {**this_sweep, "machine": f"{os.cpu_count()} CPU cores, gloo over veth",
            "steps": args.steps, "dp_steps": args.dp_steps, "delay_ms": args.delay_ms,
            "params_note": "1.89M-parameter GPT, 7.6 MB fp32", "sweeps": [this_sweep], "rows": rows}
    data = merge(old, data) if old else dict(data, cells=summarize(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    report(data, args.out)
    failed = [r for r in rows if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

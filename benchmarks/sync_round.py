#!/usr/bin/env python
"""What a sync round costs on CPU, per kernel back-end, against the all-reduce it must do.

    python benchmarks/sync_round.py                # the committed run (25M and 100M, fp32 and bf16)
    python benchmarks/sync_round.py --smoke --out-dir /tmp/sr    # tiny sizes, < 1 min
    python benchmarks/sync_round.py --report-only  # .md and chart again from the JSON files
    python benchmarks/sync_round.py --link         # over a tc-shaped veth link, 1 and 4 Gbit/s (root)

``--link``: the round where the network is the bottleneck (benchmarks/sync_round_link.py,
results/sync_round_link.json); the loopback table below stays as a memory-bound reference.

Two gloo processes on this machine (R = 2 replicas of S = 1 rank, one intra-op thread
each), GPT-shaped parameter sets of about 25M and 100M parameters:
- fp32: the parameters themselves are averaged;
- bf16: fp32 masters are averaged and the bf16 model copy is refreshed from them.
Methods, timed in the same processes, interleaved repeat by repeat:
- ``allreduce_flat``: one all-reduce of an already-flat fp32 buffer of the bytes the round
  moves; the lower bound every other row is divided by;
- ``averager[torch]`` / ``averager[cpp]``: a whole ``ReplicaAverager.average()`` round
  (non-finite check, header all-gather, pack, bucketed all-reduce, unpack) with the torch
  reference and the C++ back-end, at ``--bucket-mb``; ``no finite check`` skips the
  pre-round scan; ``4 MB buckets`` uses small buckets, which also sends every fp32 tensor of
  at least 2 MB (and no model copy) through the in-place all-reduce instead of a bucket;
- ``averager[flat]`` (fp32 only): parameters re-pointed into one flat buffer at wrap time
  (``flatten_into_buffer``), so the round all-reduces in place with no packing at all;
- ``average_parameters``: torch's own helper (cat, divide, all-reduce, re-point); for
  bf16 it averages the masters and then copies them into the bf16 parameters.
Each round is preceded by a barrier; its time is the slowest rank's. After warm-up,
``--repeats`` timed rounds give the median and the spread (min, max).
GPU numbers come from benchmarks/gpu_sync_round.py (results/sync_round_gpu.json) and are
folded into the same report.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.join(ROOT, "benchmarks")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from sync_round_common import fresh, gpt_shapes, machine  # noqa: E402
from sync_round_link import link_section, run_link  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
REPORT = os.path.join(ROOT, "benchmarks", "sync_round.md")
SIZES = {"25M": (512, 6, 8192), "100M": (768, 12, 16384)}  # d_model, layers, vocabulary
SMOKE_SIZES = {"1M": (128, 2, 1024)}
SMALL_BUCKET_MB = 4.0
METHODS = ("allreduce_flat", "averager[torch]", "averager[cpp]", "averager[cpp] no finite check",
           f"averager[cpp] {SMALL_BUCKET_MB:g} MB buckets", "averager[flat]", "average_parameters")


def _worker(rank: int, world_size: int, size: str, dims: tuple, dtype: str, warmup: int, repeats: int,
            bucket_mb: float) -> dict:
    import torch.distributed as dist
    from torch.distributed.algorithms.model_averaging.utils import average_parameters

    from qsr_ds.sync.averager import ReplicaAverager
    from qsr_ds.sync.layout import flatten_into_buffer
    from qsr_ds.kernels import get_backend
    from qsr_ds.topology import Topology

    torch.set_num_threads(1)
    topo = Topology.create(1)
    group = topo.replica_group
    shapes = gpt_shapes(*dims)
    named = fresh(shapes, seed=rank)
    params = sum(t.numel() for _, t in named)
    get_backend("cpp", torch.device("cpu"))  # build / load before any timing; fails loudly if unavailable

    methods: dict[str, callable] = {}
    averagers: dict[str, ReplicaAverager] = {}
    variants = (("averager[torch]", "torch", True, bucket_mb), ("averager[cpp]", "cpp", True, bucket_mb),
                ("averager[cpp] no finite check", "cpp", False, bucket_mb),
                (f"averager[cpp] {SMALL_BUCKET_MB:g} MB buckets", "cpp", True, SMALL_BUCKET_MB))
    if dtype == "fp32":
        for name, kernel, check, mb in variants:
            averagers[name] = ReplicaAverager(named, topology=topo, bucket_mb=mb, kernel=kernel, check_finite=check)
        flat_named = fresh(shapes, seed=rank)
        flat_buffer = flatten_into_buffer([t for _, t in flat_named])  # the parameters are views of it now
        averagers["averager[flat]"] = ReplicaAverager([("flat", flat_buffer)], topology=topo, bucket_mb=bucket_mb,
                                                      kernel="cpp")
        peer = [torch.nn.Parameter(t.clone()) for _, t in named]
        methods["average_parameters"] = lambda: average_parameters(iter(peer), group)
    else:  # bf16 model with fp32 masters
        copies = {n: t.to(torch.bfloat16) for n, t in named}
        for name, kernel, check, mb in variants:
            averagers[name] = ReplicaAverager(named, topology=topo, copies=copies, bucket_mb=mb, kernel=kernel,
                                              check_finite=check)
        peer_masters = [torch.nn.Parameter(t.clone()) for _, t in named]
        peer_bf16 = [t.to(torch.bfloat16) for _, t in named]

        def peer_round():
            average_parameters(iter(peer_masters), group)
            torch._foreach_copy_(peer_bf16, [p.data for p in peer_masters])

        methods["average_parameters"] = peer_round
    some = next(iter(averagers.values()))
    round_bytes = some.bytes_per_round
    flat = torch.randn(round_bytes // 4)
    methods["allreduce_flat"] = lambda: dist.all_reduce(flat, group=group)
    for name, avg in averagers.items():
        methods[name] = avg.average
    order = [m for m in METHODS if m in methods]

    times: dict[str, list[float]] = {m: [] for m in order}
    cpu_times: dict[str, list[float]] = {m: [] for m in order}
    splits: dict[str, list[tuple]] = {m: [] for m in averagers}
    for rep in range(warmup + repeats):
        shift = rep % len(order)
        for m in order[shift:] + order[:shift]:  # rotate: no method always runs first
            dist.barrier(group=group)
            t0, c0 = time.perf_counter(), time.process_time()
            out = methods[m]()
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
            slowest = torch.tensor([elapsed], dtype=torch.float64)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
            cpu_total = torch.tensor([cpu], dtype=torch.float64)
            dist.all_reduce(cpu_total, group=group)
            if rep >= warmup:
                times[m].append(float(slowest))
                cpu_times[m].append(float(cpu_total))
                if m in averagers:
                    splits[m].append((out.pack_s, out.comm_s, out.unpack_s))
    info = {name: {"buckets": len(a.buckets), "in_place": len(a.in_place), "kernel": a.kernel_names}
            for name, a in averagers.items()}
    return {"params": params, "bytes": round_bytes, "times": times, "cpu_times": cpu_times, "splits": splits,
            "averagers": info}


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def run(sizes: dict, dtypes: list[str], warmup: int, repeats: int, bucket_mb: float) -> list[dict]:
    from tests.ranks import run_ranks

    rows = []
    for size, dims in sizes.items():
        for dtype in dtypes:
            t0 = time.perf_counter()
            res = run_ranks(_worker, 2, size, dims, dtype, warmup, repeats, bucket_mb, timeout_s=1800)[0]
            base = statistics.median(res["times"]["allreduce_flat"])
            peer = statistics.median(res["times"]["average_parameters"])
            base_min = min(res["times"]["allreduce_flat"])
            base_cpu = statistics.median(res["cpu_times"]["allreduce_flat"])
            peer_min = min(res["times"]["average_parameters"])
            for method, ts in res["times"].items():
                med = statistics.median(ts)
                row = {
                    "method": method, "size": size, "params": res["params"], "dtype": dtype,
                    "bytes_allreduced": res["bytes"], "seconds_median": med, "seconds_min": min(ts),
                    "seconds_max": max(ts), "repeats": len(ts), "ratio_to_allreduce": med / base,
                    "ratio_to_average_parameters": med / peer,
                    # best of the repeats over best of the repeats: the least disturbed by other load
                    "min_ratio_to_allreduce": min(ts) / base_min, "min_ratio_to_average_parameters": min(ts) / peer_min,
                    # CPU seconds of both processes (all threads): what the round costs, barely moved by other load
                    "seconds_p25": _quantile(ts, 0.25), "seconds_p75": _quantile(ts, 0.75),
                    "seconds_all": ts, "cpu_seconds_all": res["cpu_times"][method],
                    "cpu_seconds_median": statistics.median(res["cpu_times"][method]),
                    "cpu_ratio_to_allreduce": statistics.median(res["cpu_times"][method]) / base_cpu,
                }
                if method in res["splits"]:
                    sp = res["splits"][method]
                    row.update(pack_s=statistics.median(s[0] for s in sp), comm_s=statistics.median(s[1] for s in sp),
                               unpack_s=statistics.median(s[2] for s in sp), **res["averagers"][method])
                rows.append(row)
                print(f"{size:>5} {dtype:>4} {method:32s} {med * 1e3:8.1f} ms  [{min(ts) * 1e3:7.1f}, "
                      f"{max(ts) * 1e3:7.1f}]  x{med / base:5.2f} (min x{min(ts) / base_min:5.2f}) of all-reduce  "
                      f"x{med / peer:5.2f} (min x{min(ts) / peer_min:5.2f}) of average_parameters  "
                      f"cpu x{row['cpu_ratio_to_allreduce']:5.2f}", flush=True)
            print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return rows


# ------------------------------------------------------------------------------ report
def _fmt_ms(s: float) -> str:
    return f"{s * 1e3:.1f}"


def _fmt_load(load) -> str:
    return " / ".join(f"{x:.1f}" for x in load) if load else "unknown"


def write_chart(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    groups = []
    for r in rows:
        key = (r["size"], r["dtype"])
        if key not in groups:
            groups.append(key)
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8))
    width = 0.8 / len(methods)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for panel, ax in enumerate(axes):
        for j, m in enumerate(methods):
            xs, ys, lo, hi = [], [], [], []
            for i, key in enumerate(groups):
                r = next((r for r in rows if (r["size"], r["dtype"]) == key and r["method"] == m), None)
                if r is None:
                    continue
                base = next(x for x in rows if (x["size"], x["dtype"]) == key and x["method"] == "allreduce_flat")
                xs.append(i + (j - (len(methods) - 1) / 2) * width)
                if panel == 0:
                    scale = base["seconds_median"]
                    ys.append(r["ratio_to_allreduce"])
                    lo.append(r["ratio_to_allreduce"] - r.get("seconds_p25", r["seconds_median"]) / scale)
                    hi.append(r.get("seconds_p75", r["seconds_median"]) / scale - r["ratio_to_allreduce"])
                else:
                    ys.append(r.get("cpu_ratio_to_allreduce", float("nan")))
            errors = [lo, hi] if panel == 0 else None
            ax.bar(xs, ys, width, yerr=errors, capsize=2, label=m, color=colors[j % len(colors)])
        ax.axhline(1.10, color="k", ls="--", lw=0.8, label="target 1.10x")
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{s}, {d}" for s, d in groups])
    axes[0].set_ylabel("wall time / flat all-reduce (median, bars: quartiles)")
    axes[0].set_title("Sync round, 2 gloo CPU processes: wall time")
    axes[1].set_ylabel("CPU seconds / flat all-reduce's (median)")
    axes[1].set_title("CPU work of a round (both ranks, all threads)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(result: dict | None, gpu: dict | None, out_dir: str, report: str, link: dict | None = None) -> None:
    lines = [
        "# Sync round: cost against the all-reduce it must do",
        "",
        "Generated by `python benchmarks/sync_round.py` (CPU, loopback), `python benchmarks/sync_round.py --link`",
        "(CPU, shaped link) and `benchmarks/gpu_sync_round.py` (GPU);",
        "`python benchmarks/sync_round.py --report-only` rewrites this page from the JSON files.",
        "",
    ]
    if link:
        lines += [*link_section(link), ""]
    if result:
        lines += ["## Loopback: a memory-bound reference (not the target)", "",
                  *loopback_section(result, out_dir, report)]
    if gpu:
        lines += ["", "## GPU: pack and unpack bandwidth", "", *gpu_section(gpu)]
    with open(report, "w") as f:
        f.write("\n".join(lines) + "\n")


def loopback_section(result: dict, out_dir: str, report: str) -> list[str]:
    chart = os.path.join(out_dir, "sync_round.png")
    write_chart(result, chart)
    meta = result["meta"]
    lines = [
        f"CPU run: {meta['cpu']}, {meta['cores']} cores shared with other work, torch {meta['torch']}; "
        f"2 gloo processes (R = 2 replicas of one rank), one intra-op thread each, bucket_mb = "
        f"{meta['bucket_mb']:g}; {meta['warmup']} warm-up rounds, then {meta['repeats']} timed rounds per method, "
        "interleaved; each round's time is the slower rank's. Load average (1, 5, 15 min) before the run: "
        f"{_fmt_load(meta.get('loadavg_before_run'))}, after: {_fmt_load(meta.get('loadavg_after_run'))}.",
        "",
        f"![round time over the flat all-reduce]({os.path.relpath(chart, os.path.dirname(report))})",
        "",
        "Ratios: median over median, and in brackets best over best (the run least disturbed by other load).",
        "",
        "CPU: process CPU seconds of both ranks, all threads (gloo's included), for one round, over the flat "
        "all-reduce's: the work a round adds, which other load on the machine barely changes.",
        "",
        "| size | dtype | method | median ms | min-max ms | x flat all-reduce | x average_parameters | "
        "CPU x all-reduce | pack / comm wait / unpack ms |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in result["rows"]:
        split = (f"{_fmt_ms(r['pack_s'])} / {_fmt_ms(r['comm_s'])} / {_fmt_ms(r['unpack_s'])}"
                 if "pack_s" in r else "")
        lines.append(
            f"| {r['size']} ({r['params'] / 1e6:.1f}M) | {r['dtype']} | {r['method']} | {_fmt_ms(r['seconds_median'])} | "
            f"{_fmt_ms(r['seconds_min'])}-{_fmt_ms(r['seconds_max'])} | {r['ratio_to_allreduce']:.2f} "
            f"({r.get('min_ratio_to_allreduce', float('nan')):.2f}) | {r['ratio_to_average_parameters']:.2f} "
            f"({r.get('min_ratio_to_average_parameters', float('nan')):.2f}) | "
            f"{r.get('cpu_ratio_to_allreduce', float('nan')):.2f} | {split} |")
    if result.get("notes"):
        lines += ["", "### What this shows", "", *[f"- {note}" for note in result["notes"]]]
    return lines


def gpu_section(gpu: dict) -> list[str]:
    meta = gpu["meta"]
    copy = gpu.get("copy_gb_per_s")
    lines = [
        f"Device: {meta.get('device')}, torch {meta.get('torch')}, triton {meta.get('triton')}. "
        f"Bucket of {meta.get('bucket_mb'):g} MB in {meta.get('tensors')} tensors. Bytes counted: each input "
        "read once plus each output written once. Achievable bandwidth: a torch `copy_` of one flat fp32 buffer "
        f"of the same size in the same run, {copy:.0f} GB/s (read + write). Triton configurations are BLOCK:warps. "
        "`call`: the Python call (plan lookup and launch) timed with CUDA events; `graph`: the same call replayed "
        "from a CUDA graph (kernel only). The scan only reads, so copy_ is not its ceiling.",
        "",
        "| op | back-end | layout | call ms | call GB/s | x copy_ | graph GB/s | x copy_ |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in gpu["rows"]:
        graph = (f"{r['graph_gb_per_s']:.0f} | {r['graph_fraction_of_copy']:.2f}" if r.get("graph_gb_per_s")
                 else " | ")
        lines.append(f"| {r['op']} | {r['backend']} | {r.get('layout', '')} | {r['ms_median']:.3f} | "
                     f"{r['gb_per_s']:.0f} | {r.get('fraction_of_copy') or 1.0:.2f} | {graph} |")
    if gpu.get("tests"):
        lines += ["", f"Kernel tests on the GPU (pytest summary): {gpu['tests']}"]
    lines += ["", *[f"- {note}" for note in gpu.get("notes", [])]]
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, few repeats")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 9, --link 7)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 2, --link 1)")
    p.add_argument("--bucket-mb", type=float, default=64.0)
    p.add_argument("--sizes", default=None, help="comma list of sizes (25M,100M)")
    p.add_argument("--out-dir", default=RESULTS)
    p.add_argument("--report", default=None, help="the .md report (default: benchmarks/sync_round.md)")
    p.add_argument("--report-only", action="store_true")
    link = p.add_argument_group("shaped link (--link)")
    link.add_argument("--link", action="store_true", help="two ranks in two namespaces over a tbf-shaped veth")
    link.add_argument("--bandwidths", type=float, nargs="+", default=[1.0, 4.0], help="Gbit/s (default 1 4)")
    link.add_argument("--params", type=float, default=25e6, help="about this many fp32 parameters")
    link.add_argument("--tensors", type=int, default=100, help="in about this many tensors")
    link.add_argument("--kernel", default="auto", help="ReplicaAverager kernel back-end (auto picks cpp on CPU)")
    link.add_argument("--delay-ms", type=float, default=0.0, help="extra netem delay on the link")
    link.add_argument("--timeout-s", type=float, default=1800.0, help="per bandwidth")
    args = p.parse_args(argv)
    if args.link:
        args.repeats = 7 if args.repeats is None else args.repeats
        args.warmup = 1 if args.warmup is None else args.warmup
    else:
        args.repeats = 9 if args.repeats is None else args.repeats
        args.warmup = 2 if args.warmup is None else args.warmup
    args.command = "python benchmarks/sync_round.py " + " ".join(sys.argv[1:] if argv is None else argv)
    return args


def _load(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    report = args.report or (REPORT if args.out_dir == RESULTS else os.path.join(args.out_dir, "sync_round.md"))
    path = os.path.join(args.out_dir, "sync_round.json")
    gpu_path = os.path.join(args.out_dir, "sync_round_gpu.json")
    link_path = os.path.join(args.out_dir, "sync_round_link.json")
    if args.report_only:
        result = _load(path)
        if result is None and not os.path.exists(link_path):
            raise SystemExit(f"--report-only: neither {path} nor {link_path} exists")
    elif args.link:
        link = run_link(args)
        previous = _load(link_path)
        if previous and args.out_dir == RESULTS:  # keep hand-written notes across re-runs
            link["notes"] = previous.get("notes", [])
        with open(link_path, "w") as f:
            json.dump(link, f, indent=1)
        result = _load(path)
    else:
        sizes = SMOKE_SIZES if args.smoke else {k: SIZES[k] for k in (args.sizes or ",".join(SIZES)).split(",")}
        warmup, repeats = (1, 3) if args.smoke else (args.warmup, args.repeats)
        load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
        rows = run(sizes, ["fp32", "bf16"], warmup, repeats, args.bucket_mb)
        result = {"meta": {**machine(), "loadavg_before_run": load_before, "world_size": 2, "backend": "gloo",
                           "bucket_mb": args.bucket_mb, "warmup": warmup, "repeats": repeats}, "rows": rows}
        if os.path.exists(path) and not args.smoke:  # keep hand-written notes across re-runs
            with open(path) as f:
                result["notes"] = json.load(f).get("notes", [])
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
    write_report(result, _load(gpu_path), args.out_dir, report, _load(link_path))
    print(f"wrote {link_path if args.link else path} and {report}")
    return result


if __name__ == "__main__":
    main()

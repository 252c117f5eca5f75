"""The sync round where the network is the bottleneck: two ranks over a tbf-shaped veth link.

    python benchmarks/sync_round.py --link                      # 1 and 4 Gbit/s, 25M params, writes results/
    python benchmarks/sync_round.py --link --params 1e6 --repeats 2 --bandwidths 1 --out-dir /tmp/srl

Per bandwidth, benchmarks/netns.py makes two network namespaces joined by a veth pair shaped
with ``tc tbf``; one rank starts in each (gloo bound to the veth with GLOO_SOCKET_IFNAME,
env:// rendezvous at the first namespace's address), R = 2 replicas of one rank. The
parameter set is GPT-shaped (about ``--params`` fp32 parameters in about ``--tensors``
tensors), once with fp32 parameters and once with fp32 masters refreshing bf16 model copies.
Rows, interleaved within each repeat (the order rotates repeat by repeat):

- ``allreduce_flat``: one all-reduce of an already-flat fp32 buffer of the round's bytes (the baseline);
- ``exact_round``: ``ReplicaAverager.average()`` (pre-check, pack, bucketed all-reduce, unpack);
- ``average_parameters``: torch's helper (for bf16, then a copy into the bf16 parameters);
- ``compressed_bf16`` / ``compressed_int8``: ``CompressedAverager`` rounds (gather route).

Each timed call sits between two barriers; its time is the slower rank's, and each rank reads
its veth's tx counter (/sys/class/net/<veth>/statistics/tx_bytes inside its namespace) right
after the first barrier and right after the second, so the counted bytes are the round's own
(plus the closing barrier's few hundred bytes, and TCP/IP headers and ACKs).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

from sync_round_common import fresh, gpt_shapes, machine  # noqa: E402

METHODS = ("allreduce_flat", "exact_round", "average_parameters", "compressed_bf16", "compressed_int8")
DTYPES = ("fp32", "bf16")
MASTER_PORT = 29731
TARGET_RATIO = 1.05
# compressed link bytes over the exact round's: bf16 is half; int8 a quarter plus one fp32
# scale per 256-element block (1/256) plus per-tensor block and segment padding
BYTE_TARGETS = {"compressed_bf16": 0.51, "compressed_int8": 0.27}
# veth tx over the bytes the averager says go on the link: TCP/IP headers (~3.5% at MTU 1500)
# plus the ACKs for what this rank receives
COUNTER_AGREEMENT = (1.0, 1.08)


def shapes_for(params: float, tensors: int) -> list[tuple[str, tuple]]:
    """GPT-shaped tensors, (tensors - 4) / 12 layers, d_model picked to give about ``params``."""
    layers, vocab, context = max(1, (tensors - 4) // 12), 8192, 1024
    a, b = 12 * layers, vocab + context + 13 * layers + 2
    d = int((-b + (b * b + 4 * a * params) ** 0.5) / (2 * a))
    return gpt_shapes(max(8, d // 8 * 8), layers, vocab, context)


# ------------------------------------------------------------------------------ one rank
def _tx_reader(device: str):
    path = f"/sys/class/net/{device}/statistics/tx_bytes"

    def read() -> int:
        with open(path) as f:
            return int(f.read())

    read()  # fail before any timing if this namespace does not show the veth
    return read


def _methods(named, dtype: str, topo, bucket_mb: float, kernel: str, seed: int):
    """name -> (call, counted bytes per round or None (from RoundStats), link bytes per rank per round)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.model_averaging.utils import average_parameters

    from qsr_ds.sync.averager import ReplicaAverager
    from qsr_ds.sync.compress import CompressedAverager

    group, r = topo.replica_group, topo.num_replicas
    copies = {n: t.to(torch.bfloat16) for n, t in named} if dtype == "bf16" else None
    common = dict(topology=topo, copies=copies, bucket_mb=bucket_mb, kernel=kernel)
    exact = ReplicaAverager(named, **common)
    ring = 2 * (r - 1) / r  # a ring all-reduce sends this many times the buffer from each rank
    flat = torch.randn(exact.bytes_per_round // 4)
    peer = [torch.nn.Parameter(t.clone()) for _, t in named]
    peer_bf16 = [t.to(torch.bfloat16) for _, t in named] if dtype == "bf16" else None

    def peer_round():
        average_parameters(iter(peer), group)
        if peer_bf16 is not None:
            torch._foreach_copy_(peer_bf16, [p.data for p in peer])

    # after a round the replicas are identical, so q() would only ever see zeros: each compressed
    # round is preceded (outside the timing) by a small rank-specific drift of the parameters
    gen = torch.Generator().manual_seed(1000 + seed)
    drift = [torch.randn(t.shape, generator=gen) * 1e-3 for _, t in named]
    live = [t for _, t in named]
    methods = {
        "allreduce_flat": (lambda: dist.all_reduce(flat, group=group), None, int(ring * flat.numel() * 4)),
        "exact_round": (exact.average, exact.bytes_per_round, int(ring * exact.bytes_per_round)),
        "average_parameters": (peer_round, None, int(ring * exact.bytes_per_round)),
    }
    averagers = {"exact_round": exact}
    for mode in ("bf16", "int8"):
        comp = CompressedAverager(named, mode=mode, **common)
        methods[f"compressed_{mode}"] = (comp.average, comp.bytes_per_round, comp.link_bytes_per_round)
        averagers[f"compressed_{mode}"] = comp
    prepare = {name: (lambda: torch._foreach_add_(live, drift)) for name in methods if name.startswith("compressed")}
    return methods, prepare, averagers


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from qsr_ds.kernels import get_backend
    from qsr_ds.topology import Topology

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="env://")
    rank = dist.get_rank()
    topo = Topology.create(1)
    group = topo.replica_group
    read_tx = _tx_reader(args.device)
    get_backend(args.kernel, torch.device("cpu"))  # build / load before any timing
    shapes = shapes_for(args.params, args.tensors)
    out = {"rank": rank, "tensors": len(shapes), "cells": {}}
    for dtype in DTYPES:
        named = fresh(shapes, seed=rank)
        methods, prepare, averagers = _methods(named, dtype, topo, args.bucket_mb, args.kernel, rank)
        order = [m for m in METHODS if m in methods]
        cell = {m: {"seconds": [], "tx_bytes": [], "counted_bytes": [], "link_bytes": methods[m][2]} for m in order}
        for rep in range(args.warmup + args.repeats):
            shift = rep % len(order)
            for m in order[shift:] + order[:shift]:
                call, _, _ = methods[m]
                if m in prepare:
                    prepare[m]()
                dist.barrier(group=group)
                tx0 = read_tx()
                t0 = time.perf_counter()
                stats = call()
                elapsed = time.perf_counter() - t0
                dist.barrier(group=group)  # the peer has received everything this rank sent
                tx1 = read_tx()
                if rep >= args.warmup:
                    cell[m]["seconds"].append(elapsed)
                    cell[m]["tx_bytes"].append(tx1 - tx0)
                    cell[m]["counted_bytes"].append(stats.bytes if m in averagers else None)
                    if m in averagers:
                        cell[m].setdefault("parts", []).append(
                            {k: getattr(stats, k) for k in ("check_s", "pack_s", "comm_s", "unpack_s")})
        for m, avg in averagers.items():
            cell[m]["kernel"] = avg.kernel_names
            cell[m]["buckets"] = len(getattr(avg, "wire", avg.buckets))
        out["params"] = sum(t.numel() for _, t in named)
        out["cells"][dtype] = cell
        del methods, prepare, averagers, named
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, out)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()
    os._exit(0)


# ------------------------------------------------------------------------------ the runner
def _summarize(ranks: list[dict], gbit: float) -> list[dict]:
    rows = []
    for dtype in DTYPES:
        cells = [r["cells"][dtype] for r in ranks]
        slowest = {m: [max(ts) for ts in zip(*(c[m]["seconds"] for c in cells))] for m in cells[0]}
        base = slowest["allreduce_flat"]
        for m in cells[0]:
            ts = slowest[m]
            tx = [sum(t) / len(t) for t in zip(*(c[m]["tx_bytes"] for c in cells))]  # per rank, both averaged
            counted = cells[0][m]["counted_bytes"][-1]
            link = sum(c[m]["link_bytes"] for c in cells) / len(cells)
            per_repeat = [t / b for t, b in zip(ts, base)]
            row = {
                "bandwidth_gbit": gbit, "dtype": dtype, "method": m, "params": ranks[0]["params"],
                "tensors": ranks[0]["tensors"], "repeats": len(ts), "seconds_all": ts,
                "seconds_median": statistics.median(ts), "seconds_min": min(ts), "seconds_max": max(ts),
                "ratio_to_allreduce": statistics.median(ts) / statistics.median(base),
                "ratio_min": min(per_repeat), "ratio_max": max(per_repeat),
                "counted_bytes": counted, "link_bytes_expected": link,
                "veth_tx_bytes": statistics.median(tx), "veth_tx_bytes_all": tx,
                "veth_over_expected": statistics.median(tx) / link if link else None,
                "veth_gbit_per_s": 8 * statistics.median(tx) / statistics.median(ts) / 1e9,
            }
            for key in ("kernel", "buckets"):
                if key in cells[0][m]:
                    row[key] = cells[0][m][key]
            if "parts" in cells[0][m]:  # RoundStats parts: per repeat the slower rank's, then the median
                row["parts_ms"] = {k: 1e3 * statistics.median(max(c[m]["parts"][i][k] for c in cells)
                                                              for i in range(len(ts)))
                                   for k in cells[0][m]["parts"][0]}
            rows.append(row)
        exact = next(r for r in rows if r["dtype"] == dtype and r["method"] == "exact_round")
        for r in rows:
            if r["dtype"] == dtype:
                r["link_bytes_vs_exact"] = r["link_bytes_expected"] / exact["link_bytes_expected"]
                r["veth_bytes_vs_exact"] = r["veth_tx_bytes"] / exact["veth_tx_bytes"]
    return rows


def _launch(link, gbit: float, port: int, args: argparse.Namespace, out: str) -> list[dict]:
    cmd_base = [sys.executable, os.path.abspath(__file__), "--worker", "--params", str(args.params),
                "--tensors", str(args.tensors), "--warmup", str(args.warmup), "--repeats", str(args.repeats),
                "--bucket-mb", str(args.bucket_mb), "--kernel", args.kernel, "--out", out]
    procs = []
    for host in (0, 1):
        env = {"MASTER_ADDR": link.addresses[0], "MASTER_PORT": str(port), "RANK": str(host), "WORLD_SIZE": "2",
               "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
        procs.append(link.popen(host, [*cmd_base, "--device", link.devices[host]], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=args.timeout_s)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise RuntimeError(f"sync_round link run at {gbit:g} Gbit/s took longer than {args.timeout_s} s")
    for host, (p, text) in enumerate(zip(procs, outputs)):
        if p.returncode:
            raise RuntimeError(f"rank {host} at {gbit:g} Gbit/s failed (exit {p.returncode}):\n{text[-4000:]}")
    with open(out) as f:
        return json.load(f)


def run_link(args: argparse.Namespace) -> dict:
    from netns import SlowLink, available

    why = available()
    if why:
        raise SystemExit(f"the shaped-link mode needs network namespaces: {why}")
    if args.warmup < 1:
        raise SystemExit("--warmup must be >= 1: a compressed averager's first round is the exact one")
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, gbit in enumerate(args.bandwidths):
            t0 = time.perf_counter()
            with SlowLink(gbit * 1000, args.delay_ms) as link:
                ranks = _launch(link, gbit, MASTER_PORT + i, args, os.path.join(tmp, f"ranks-{i}.json"))
            for row in _summarize(ranks, gbit):
                rows.append(row)
                print(f"{gbit:4g} Gbit/s {row['dtype']:>4} {row['method']:18s} {row['seconds_median'] * 1e3:8.1f} ms "
                      f"[{row['seconds_min'] * 1e3:7.1f}, {row['seconds_max'] * 1e3:7.1f}] "
                      f"x{row['ratio_to_allreduce']:5.2f}  link {row['link_bytes_expected'] / 1e6:7.2f} MB  "
                      f"veth {row['veth_tx_bytes'] / 1e6:7.2f} MB (x{row['veth_over_expected']:.3f})", flush=True)
            print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    meta = {**machine(), "loadavg_before_run": list(load_before), "loadavg_after_run": list(os.getloadavg()),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": args.command,
            "params_target": args.params, "tensors_target": args.tensors, "bucket_mb": args.bucket_mb,
            "kernel": args.kernel, "warmup": args.warmup, "repeats": args.repeats, "delay_ms": args.delay_ms,
            "world_size": 2, "backend": "gloo", "tbf": "burst 512kb latency 100ms, both ends"}
    return {"meta": meta, "rows": rows}


# ------------------------------------------------------------------------------ the report
def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**MISSED**"


def target_lines(rows: list[dict]) -> list[str]:
    lines = []
    cells = sorted({(r["bandwidth_gbit"], r["dtype"]) for r in rows}, key=lambda c: (c[0], DTYPES.index(c[1])))
    at = {(r["bandwidth_gbit"], r["dtype"], r["method"]): r for r in rows}
    for gbit, dtype in cells:
        e = at.get((gbit, dtype, "exact_round"))
        if e:
            lines.append(f"- exact round <= {TARGET_RATIO:.2f}x a flat all-reduce, {gbit:g} Gbit/s, {dtype}: "
                         f"{e['ratio_to_allreduce']:.2f}x (per repeat {e['ratio_min']:.2f}-{e['ratio_max']:.2f}) "
                         f"{_verdict(e['ratio_to_allreduce'] <= TARGET_RATIO)}")
    for gbit, dtype in cells:
        for m, limit in BYTE_TARGETS.items():
            r = at.get((gbit, dtype, m))
            if r:
                ok = r["link_bytes_vs_exact"] <= limit and r["veth_bytes_vs_exact"] <= limit
                lines.append(f"- {m} bytes <= {limit:.2f} of the exact round's, {gbit:g} Gbit/s, {dtype}: counted "
                             f"{r['link_bytes_vs_exact']:.3f}, veth {r['veth_bytes_vs_exact']:.3f} {_verdict(ok)}")
    lo, hi = COUNTER_AGREEMENT
    worst = [r["veth_over_expected"] for r in rows if r["veth_over_expected"]]
    if worst:
        ok = all(lo <= x <= hi for x in worst)
        lines.append(f"- veth tx within {lo:.2f}-{hi:.2f}x of the bytes counted for the link, every row: "
                     f"{min(worst):.3f}-{max(worst):.3f}x {_verdict(ok)}")
    return lines


def _parts(row: dict) -> str:
    parts = row.get("parts_ms")
    return " / ".join(f"{parts[k]:.1f}" for k in ("check_s", "pack_s", "comm_s", "unpack_s")) if parts else ""


def link_section(data: dict) -> list[str]:
    meta, rows = data["meta"], data["rows"]
    load = " / ".join(f"{x:.1f}" for x in meta["loadavg_before_run"])
    load_after = " / ".join(f"{x:.1f}" for x in meta["loadavg_after_run"])
    lines = [
        "## Over a shaped link: where the network is the bottleneck",
        "",
        f"Command: `{meta['command']}` ({meta['date']}; {meta['cpu']}, {meta['cores']} cores, torch {meta['torch']}). "
        f"Load average (1, 5, 15 min) before: {load}, after: {load_after}.",
        "",
        "Two network namespaces joined by a veth pair shaped with `tc tbf` "
        f"({meta['tbf']}, {meta['delay_ms']:g} ms added delay), one gloo rank in each (R = 2 replicas of one "
        f"rank, GLOO_SOCKET_IFNAME = the veth, env:// rendezvous); about {meta['params_target'] / 1e6:g}M params in "
        f"{rows[0]['tensors'] if rows else '?'} tensors ({rows[0]['params'] / 1e6:.2f}M exactly), fp32 parameters and "
        f"fp32 masters with bf16 copies; bucket_mb = {meta['bucket_mb']:g}, kernel {meta['kernel']}; "
        f"{meta['warmup']} warm-up and {meta['repeats']} timed repeats, the methods interleaved in each (order "
        "rotating); a round's time is the slower rank's. Ratios: median over the flat all-reduce's median, in "
        "brackets the range of the per-repeat ratios (same repeat). Bytes are per rank per round: 'counted' "
        "is RoundStats.bytes (fp32 bytes all-reduced, or the compressed rows); 'link' what that puts on this "
        "rank's link (a 2-rank ring all-reduce sends the buffer once, a compressed all-gather the other rank's "
        "row: link_bytes_per_round); 'veth' the median tx-counter delta inside each namespace over the timed "
        "call (mean of both ranks; TCP/IP headers and ACKs included). 'check / pack / wait / unpack': the "
        "round's RoundStats parts (the slower rank's per repeat, then the median; 'wait' is time blocked on "
        "all-reduces, the NaN/Inf scan is in none of them).",
        "",
        "| Gbit/s | dtype | method | kernel | median ms | min-max ms | x flat all-reduce | counted MB | link MB | "
        "veth MB | veth / link | link x exact | veth Gbit/s | buckets | check / pack / wait / unpack ms |",
        "| ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        counted = f"{r['counted_bytes'] / 1e6:.2f}" if r["counted_bytes"] is not None else "-"
        lines.append(
            f"| {r['bandwidth_gbit']:g} | {r['dtype']} | {r['method']} | {','.join(r.get('kernel', [])) or '-'} | "
            f"{r['seconds_median'] * 1e3:.1f} | {r['seconds_min'] * 1e3:.1f}-{r['seconds_max'] * 1e3:.1f} | "
            f"{r['ratio_to_allreduce']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) | {counted} | "
            f"{r['link_bytes_expected'] / 1e6:.2f} | {r['veth_tx_bytes'] / 1e6:.2f} | {r['veth_over_expected']:.3f} | "
            f"{r['link_bytes_vs_exact']:.3f} | {r['veth_gbit_per_s']:.2f} | {r.get('buckets', '-')} | {_parts(r)} |")
    lines += ["", "### Targets", "", *target_lines(rows)]
    if data.get("notes"):
        lines += ["", "### Reading", "", *[f"- {note}" for note in data["notes"]]]
    return lines


def parse_worker_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="one rank of the shaped-link sync round (started by run_link)")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--params", type=float, required=True)
    p.add_argument("--tensors", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--repeats", type=int, required=True)
    p.add_argument("--bucket-mb", type=float, required=True)
    p.add_argument("--kernel", required=True)
    p.add_argument("--device", required=True, help="this namespace's veth")
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


if __name__ == "__main__":
    worker(parse_worker_args(sys.argv[1:]))

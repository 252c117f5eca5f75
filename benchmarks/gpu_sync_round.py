#!/usr/bin/env python
"""Pack / unpack bandwidth of the Triton back-end on one GPU, against a flat copy_.

    python benchmarks/gpu_sync_round.py --out DIR            # on a CUDA machine (~1 min)
    TRITON_INTERPRET=1 python benchmarks/gpu_sync_round.py --device cpu --mb 0.25 --out /tmp/g   # dry run

A single-GPU NCCL all-reduce over a world of one moves nothing, so the GPU side of the
sync-round benchmark is the kernels' bandwidth: a bucket of ``--mb`` MB of fp32 spread
over GPT-shaped tensors (about a hundred, from biases to 4d x d matrices), packed from
fp32 or bf16 sources and unpacked into fp32 targets with or without a bf16 model copy.
Bytes counted: each input read once plus each output written once. The achievable
bandwidth is ``dst.copy_(src)`` of one flat fp32 buffer of the bucket's size, measured
in the same run. Layouts: ``aligned`` (model shapes: every size and offset a multiple of
8, so 16-byte vectors) and ``odd`` (every tensor one element longer: scalar accesses).
"call" rows time the Python call (plan lookup + launch); "graph" rows replay the same
call captured in a CUDA graph (kernel time only). Every timed result is checked bitwise
against the torch reference. Writes DIR/sync_round_gpu.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from qsr_ds.kernels.reference import ReferenceKernels  # noqa: E402


def shapes_for(numel: int, d: int) -> list[tuple[int, ...]]:
    out, total = [], 0
    layer = [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    while True:
        for s in layer:
            n = 1
            for x in s:
                n *= x
            if total + n > numel:
                return out
            out.append(s)
            total += n


def timer(fn, device) -> dict:
    if device.type == "cuda":
        import triton.testing

        med, lo, hi = triton.testing.do_bench(fn, warmup=25, rep=150, quantiles=[0.5, 0.2, 0.8])
        return {"ms_median": med, "ms_p20": lo, "ms_p80": hi}
    fn()
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return {"ms_median": statistics.median(ts), "ms_p20": min(ts), "ms_p80": max(ts)}


def graphed(fn, device):
    if device.type != "cuda":
        return None
    fn()  # plans and compilation outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def run_tests(device) -> str:
    if device.type != "cuda":
        return "skipped (no CUDA)"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/unit/test_kernels.py"],
                          cwd=ROOT, env={**os.environ, "QSR_DS_NO_CPP": "1"}, capture_output=True, text=True,
                          timeout=300)
    lines = (done.stdout + done.stderr).strip().splitlines()
    print("\n".join(lines[-25:]), flush=True)
    return lines[-1] if lines else f"pytest exit {done.returncode}"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--device", default="cuda")
    p.add_argument("--mb", type=float, default=256.0)
    p.add_argument("--d", type=int, default=768, help="model width of the tensor shapes")
    p.add_argument("--configs", default="2048:4,4096:8,8192:8", help="BLOCK:num_warps to compare")
    p.add_argument("--no-tests", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    import triton

    from qsr_ds.kernels.triton_bucket import TritonKernels

    tests = "not run" if args.no_tests else run_tests(device)
    ref = ReferenceKernels()
    numel = int(args.mb * 2**20) // 4
    d = args.d if args.mb >= 64 else 16
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)",
            "torch": torch.__version__, "triton": triton.__version__, "bucket_mb": args.mb}
    gen = torch.Generator(device="cpu").manual_seed(0)
    rows = []

    def add(op, backend, layout, nbytes, timing, **extra):
        gbs = nbytes / (timing["ms_median"] * 1e-3) / 1e9
        row = {"op": op, "backend": backend, "layout": layout, "bytes": nbytes, **timing, "gb_per_s": gbs, **extra}
        rows.append(row)
        print(f"{op:28s} {backend:22s} {layout:8s} {timing['ms_median']:8.3f} ms {gbs:8.0f} GB/s", flush=True)

    flat_src = torch.randn(numel, generator=gen).to(device)
    flat_dst = torch.empty_like(flat_src)
    add("copy_ (flat fp32)", "torch", "flat", 2 * 4 * numel, timer(lambda: flat_dst.copy_(flat_src), device))
    copy_gbs = rows[-1]["gb_per_s"]
    del flat_src, flat_dst

    for layout in ("aligned", "odd"):
        shapes = shapes_for(numel, d)
        if layout == "odd":
            shapes = [(int(torch.tensor(s).prod()) + 1,) for s in shapes]
        sizes = [int(torch.tensor(s).prod()) for s in shapes]
        offsets, pos = [], 0
        for n in sizes:
            offsets.append(pos)
            pos += n
        meta["tensors"] = len(shapes)
        n_el = pos
        src32 = [torch.randn(s, generator=gen).to(device) for s in shapes]
        src16 = [t.to(torch.bfloat16) for t in src32]
        bucket = torch.empty(n_el, device=device)
        want = torch.empty(n_el, device=device)
        targets = [torch.empty_like(t) for t in src32]
        copies = [torch.empty_like(t) for t in src16]
        ref_targets = [torch.empty_like(t) for t in src32]
        ref_copies = [torch.empty_like(t) for t in src16]
        cases = {
            "pack fp32": (lambda b: b.pack(src32, bucket, offsets, 0.5), 8 * n_el),
            "pack bf16": (lambda b: b.pack(src16, bucket, offsets, 0.5), 6 * n_el),
            "unpack fp32": (lambda b: b.unpack(bucket, targets, offsets, [None] * len(targets)), 8 * n_el),
            "unpack fp32 + bf16 copy": (lambda b: b.unpack(bucket, targets, offsets, copies), 10 * n_el),
            "non-finite scan fp32": (lambda b: b.first_nonfinite(src32), 4 * n_el),
        }
        backends = [(f"triton {cfg}", TritonKernels(*map(int, cfg.split(":")))) for cfg in args.configs.split(",")]
        backends.append(("torch reference", ref))
        for name, backend in backends:
            for op, (fn, nbytes) in cases.items():
                call = lambda fn=fn, backend=backend: fn(backend)  # noqa: E731
                timing = timer(call, device)
                extra = {}
                if name.startswith("triton") and not op.startswith("non-finite"):
                    replay = graphed(call, device)
                    if replay is not None:
                        g = timer(replay, device)
                        extra = {"graph_ms_median": g["ms_median"], "graph_gb_per_s": nbytes / (g["ms_median"] * 1e-3) / 1e9}
                add(op, name, layout, nbytes, timing, fraction_of_copy=None, **extra)
                rows[-1]["fraction_of_copy"] = rows[-1]["gb_per_s"] / copy_gbs
                if "graph_gb_per_s" in extra:
                    rows[-1]["graph_fraction_of_copy"] = extra["graph_gb_per_s"] / copy_gbs
            # results of this back-end, bitwise against the reference
            backend.pack(src32, bucket, offsets, 0.5)
            ref.pack(src32, want, offsets, 0.5)
            assert torch.equal(bucket, want), f"{name}: pack fp32 differs from the reference"
            backend.pack(src16, bucket, offsets, 0.5)
            ref.pack(src16, want, offsets, 0.5)
            assert torch.equal(bucket, want), f"{name}: pack bf16 differs from the reference"
            bucket.copy_(torch.randn(n_el, generator=gen))  # values that bf16 must round
            backend.unpack(bucket, targets, offsets, copies)
            ref.unpack(bucket, ref_targets, offsets, ref_copies)
            assert all(torch.equal(a, b) for a, b in zip(targets, ref_targets)), f"{name}: unpack targets differ"
            if device.type == "cuda":  # (the CPU interpreter truncates to bf16: one rounding, not RNE)
                assert all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(copies, ref_copies)), \
                    f"{name}: bf16 copies differ"
            src32[-1].view(-1)[-1] = float("nan")
            assert backend.first_nonfinite(src32) == len(src32) - 1, f"{name}: scan missed a NaN"
            src32[-1].view(-1)[-1] = 0.0
        del src32, src16, bucket, want, targets, copies, ref_targets, ref_copies
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = {"meta": meta, "tests": tests, "copy_gb_per_s": copy_gbs, "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "sync_round_gpu.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\ncopy_ baseline {copy_gbs:.0f} GB/s; tests: {tests}")
    print(f"{'op':28s} {'back-end':22s} {'layout':8s} {'GB/s':>7s} {'xcopy':>6s} {'graph GB/s':>10s} {'xcopy':>6s}")
    for r in rows[1:]:
        g = r.get("graph_gb_per_s")
        print(f"{r['op']:28s} {r['backend']:22s} {r['layout']:8s} {r['gb_per_s']:7.0f} {r['fraction_of_copy']:6.2f} "
              + (f"{g:10.0f} {r['graph_fraction_of_copy']:6.2f}" if g else ""))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()

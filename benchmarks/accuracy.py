#!/usr/bin/env python
"""Accuracy of Local AdamW under QSR and its baselines on a small byte-level language model.

    python benchmarks/accuracy.py                 # every method: 2 regimes x 12 methods x 3 seeds
    python benchmarks/accuracy.py --methods qsr qsr_int8   # these rows again, merged into the committed JSON
    python benchmarks/accuracy.py --smoke --out-dir /tmp/acc    # tiny sizes, < 30 s
    python benchmarks/accuracy.py --report-only   # plots and .md again from the JSON

Data: the English help texts that ship with CPython (``pydoc_data.topics``), sorted by key,
joined, byte level (vocabulary 256); the first 90 % by position is training data, the
last 10 % validation. Model: a byte MLP that predicts the next byte from the previous
``context`` bytes. R replicas are simulated in one process: R model copies, each with its
own AdamW and its own data stream, all from the same initialization. Data parallel is one
model on the R streams' batches together (gradient averaging over R x batch); the local
methods take their steps independently and average parameters when the
``qsr_ds.SyncTracker`` of their ``qsr_ds.SyncSchedule`` closes a round, with the library's
arithmetic (benchmarks/accuracy_rounds.py): exact rounds as ``qsr_ds.ReplicaAverager``,
and for the VARIANTS of QSR overlapped rounds (qsr_ds/sync/overlap.py) and compressed ones
(qsr_ds/sync/compress.py, the torch reference quantize / dequantize kernels).
tests/dist/test_accuracy_sim.py checks this simulation against ``qsr_ds.LocalOptimizer``
on R real gloo ranks. A run merges into the JSON already in --out-dir: its runs replace
those of the same regime, method and seed, the others are kept. Two regimes (REGIMES): the whole training text in under one pass,
and its first 50 KB for several epochs, where the model over-fits.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.accuracy_report import commands_of, plot, summarize, table, verdict, write_report  # noqa: E402
from benchmarks.accuracy_sim import (  # noqa: E402
    LABELS, METHODS, REGIMES, SMOKE, ByteMLP, Config, config_args, corpus, h_large, run, split)

RESULTS = os.path.join(ROOT, "benchmarks", "results")
REPORT = os.path.join(ROOT, "benchmarks", "accuracy.md")


def parse_args(argv=None) -> tuple[argparse.Namespace, dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (< 30 s); use with --out-dir")
    p.add_argument("--out-dir", default=RESULTS, help="where accuracy.json and the plots go")
    p.add_argument("--report", default=None, help="the .md report (default: benchmarks/accuracy.md, or "
                   "OUT_DIR/accuracy.md when --out-dir is given)")
    p.add_argument("--report-only", action="store_true", help="rebuild plots and report from OUT_DIR/accuracy.json")
    p.add_argument("--merge-from", nargs="+", metavar="JSON", help="merge these accuracy.json files (e.g. from runs "
                   "in parallel) into OUT_DIR/accuracy.json, in order, and rebuild plots and report; no training")
    p.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    p.add_argument("--threads", type=int, default=1)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, tuple):
            p.add_argument(flag, nargs="+", type=int if f.name == "seeds" else str, default=None)
        else:
            p.add_argument(flag, type=type(f.default), default=None)
    args = p.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if getattr(args, f.name) is not None}
    overrides = config_args(overrides)
    unknown = set(overrides.get("methods", ())) - set(METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    configs = {}
    for name in args.regimes:
        configs[name] = Config(**{**REGIMES[name]["overrides"], **(SMOKE if args.smoke else {}), **overrides})
    if args.report is None:
        same = os.path.abspath(args.out_dir) == os.path.abspath(RESULTS)
        args.report = REPORT if same else os.path.join(args.out_dir, "accuracy.md")
    return args, configs


def run_regime(name: str, cfg: Config, train: torch.Tensor, val: torch.Tensor) -> dict:
    if cfg.train_bytes:
        train = train[: cfg.train_bytes]
    start, runs = time.perf_counter(), []
    print(f"\n{name}: {REGIMES[name]['about']}")
    print(f"{'method':24s} {'seed':>4s} {'rounds':>6s} {'val acc':>8s} {'val loss':>8s} {'seconds':>7s}")
    for method in cfg.methods:
        for seed in cfg.seeds:
            r = run(method, seed, cfg, train, val)
            r.pop("params")
            runs.append(r)
            print(f"{LABELS[method]:24s} {seed:4d} {r['rounds']:6d} {100 * r['val_acc']:7.2f}% "
                  f"{r['val_loss']:8.4f} {r['train_seconds']:7.1f}", flush=True)
    return {"config": dataclasses.asdict(cfg), "train_bytes": len(train), "wall_seconds": time.perf_counter() - start,
            "params": sum(p.numel() for p in ByteMLP(cfg).parameters()), "h_large": h_large(cfg),
            "summary": summarize(runs, cfg), "runs": runs}




def check_mergeable(name: str, old: dict, new: dict) -> None:
    """SystemExit naming the fields unless two configs of a regime differ only in methods and seeds."""
    a, b = ({k: v for k, v in json.loads(json.dumps(dataclasses.asdict(Config(**config_args(c))))).items()
             if k not in ("methods", "seeds")} for c in (old, new))  # a key added since: its default
    if a != b:
        raise SystemExit(f"cannot merge regime {name} into the JSON: config differs in "
                         f"{sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))}")


def merge_results(old: dict, new: dict) -> dict:
    """``new``'s runs replace ``old``'s of the same regime, method and seed; old's other runs are kept.

    A regime in both must have the same config but for methods and seeds (else SystemExit naming
    the fields that differ), so merged rows are side by side with the same data, schedule and seeds.
    """
    new = json.loads(json.dumps(new))  # the JSON's lists, not tuples, in configs
    regimes = dict(old["regimes"])
    for name, res in new["regimes"].items():
        prev = regimes.get(name)
        if prev is None:
            regimes[name] = res
            continue
        check_mergeable(name, prev["config"], res["config"])
        ran = {(r["method"], r["seed"]) for r in res["runs"]}
        runs = [r for r in prev["runs"] if (r["method"], r["seed"]) not in ran] + res["runs"]
        runs.sort(key=lambda r: (METHODS.index(r["method"]), r["seed"]))
        cfg = Config(**config_args({**res["config"], "methods": [m for m in METHODS if any(r["method"] == m for r in runs)],
                                  "seeds": sorted({r["seed"] for r in runs})}))
        regimes[name] = {**res, "config": dataclasses.asdict(cfg), "summary": summarize(runs, cfg), "runs": runs,
                         "wall_seconds": prev["wall_seconds"] + res["wall_seconds"]}
    return {**new, "regimes": regimes, "commands": commands_of(old) + commands_of(new),
            "wall_seconds": old["wall_seconds"] + new["wall_seconds"], "cpu_seconds": old["cpu_seconds"] + new["cpu_seconds"]}


def main(argv=None) -> dict:
    args, configs = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    json_path = os.path.join(args.out_dir, "accuracy.json")
    old = None
    if os.path.exists(json_path):
        with open(json_path) as f:
            old = json.load(f)
    if args.report_only or args.merge_from:
        if old is None and not args.merge_from:
            raise SystemExit(f"--report-only: no {json_path}")
        result = old
        for path in args.merge_from or ():
            with open(path) as f:
                result = json.load(f) if result is None else merge_results(result, json.load(f))
        if args.merge_from:
            with open(json_path, "w") as f:
                json.dump(result, f, indent=1)
    else:
        for name, cfg in configs.items():  # before any training
            if old is not None and name in old["regimes"]:
                check_mergeable(name, old["regimes"][name]["config"], dataclasses.asdict(cfg))
        torch.set_num_threads(args.threads)
        argv = sys.argv[1:] if argv is None else list(argv)
        start, cpu, load = time.perf_counter(), time.process_time(), os.getloadavg()[0]
        train, val = split(corpus())
        regimes = {name: run_regime(name, cfg, train, val) for name, cfg in configs.items()}
        result = {"command": " ".join(["python benchmarks/accuracy.py", *argv]),
                  "wall_seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu, "torch": torch.__version__,
                  "python": sys.version.split()[0], "threads": args.threads, "val_bytes": len(val),
                  "load": [load, os.getloadavg()[0]], "regimes": regimes}
        if old is not None:
            result = merge_results(old, result)
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
    for name, res in result["regimes"].items():
        cfg = Config(**config_args(res["config"]))
        plot(res["runs"], cfg, os.path.join(args.out_dir, f"accuracy_{name}.png"), REGIMES[name]["about"])
        print(f"\n{name}: {REGIMES[name]['about']}\n{table(res['summary'])}\n" + "\n".join(verdict(res["summary"])))
    write_report(result, args.out_dir, args.report)
    print(f"\nwrote {json_path}, plots and {args.report} ({result['wall_seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()

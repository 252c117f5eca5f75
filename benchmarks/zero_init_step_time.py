"""Step time of the ZeRO-3 main job built under qsr_ds.zero_init against the same job built normally.

    python benchmarks/zero_init_step_time.py --steps 30 --repeats 3

configs/qsr.json with zero_optimization.stage 3, 2 replicas x 2 ranks under torchrun, the two
builds interleaved in each repeat; reads seconds_per_step from the main job's summary. Writes
benchmarks/results/zero_init.json and benchmarks/zero_init.md (generated, `--report-only`).
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "zero_init.json")
REPORT = os.path.join(ROOT, "benchmarks", "zero_init.md")
BUILDS = {"normal": [], "zero_init": ["--zero-init"]}


def run_once(config: str, steps: int, flags: list[str], workdir: str, name: str) -> dict:
    summary = os.path.join(workdir, f"{name}.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
           os.path.join(ROOT, "examples", "train_gpt.py"), "--deepspeed_config", config, "--steps", str(steps),
           "--no-progress", "--summary-json", summary, *flags]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-3000:]}")
    with open(summary) as f:
        return json.load(f)


def write_report(data: dict) -> None:
    rows = data["rows"]
    med = {b: statistics.median(r["seconds_per_step"] for r in rows if r["build"] == b) for b in BUILDS}
    lines = ["# ZeRO-3 main job: built under `qsr_ds.zero_init` vs built normally", "",
             "Generated from `benchmarks/results/zero_init.json` (`python benchmarks/zero_init_step_time.py --report-only`).",
             "", f"Command: `{data['command']}`; {data['date']}; load average before {data['load_before']}, "
             f"after {data['load_after']}. {data['steps']} steps of configs/qsr.json with ZeRO-3, 2 replicas x 2 ranks, "
             "builds interleaved in each repeat.", "",
             "| build | ms/step per repeat | median ms/step | final val loss |",
             "| --- | --- | ---: | ---: |"]
    for b in BUILDS:
        mine = [r for r in rows if r["build"] == b]
        per_repeat = ", ".join(f"{r['seconds_per_step'] * 1e3:.0f}" for r in mine)
        lines.append(f"| {b} | {per_repeat} | {med[b] * 1e3:.0f} | "
                     f"{mine[0]['final_loss']:.4f} |")
    same = len({r["fingerprint"] for r in rows}) == 1
    lines += ["", f"zero_init / normal: {med['zero_init'] / med['normal']:.2f}x the step time. Every run of both builds "
              f"ends with {'the same' if same else 'DIFFERENT'} replica 0 fingerprint (sha256 of its fp32 parameters).", ""]
    with open(REPORT, "w") as f:
        f.write("\n".join(lines))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    if args.report_only:
        with open(RESULTS) as f:
            write_report(json.load(f))
        return
    with open(os.path.join(ROOT, "configs", "qsr.json")) as f:
        config = json.load(f)
    config["zero_optimization"] = {"stage": 3}
    load_before = [round(v, 2) for v in os.getloadavg()]
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        path = os.path.join(workdir, "qsr_zero3.json")
        with open(path, "w") as f:
            json.dump(config, f)
        for repeat in range(args.repeats):
            for build, flags in BUILDS.items():
                s = run_once(path, args.steps, flags, workdir, f"{build}{repeat}")
                rows.append({"build": build, "repeat": repeat, "seconds_per_step": s["seconds_per_step"],
                             "final_loss": s["final_loss"], "fingerprint": s["replica_fingerprints"][0]})
                print(f"repeat {repeat} {build}: {s['seconds_per_step'] * 1e3:.0f} ms/step", flush=True)
    data = {"command": "python benchmarks/zero_init_step_time.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "steps": args.steps,
            "load_before": load_before, "load_after": [round(v, 2) for v in os.getloadavg()], "rows": rows}
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(data, f, indent=1)
    write_report(data)


if __name__ == "__main__":
    main()

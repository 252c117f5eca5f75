"""What the sync rounds hold per rank, blocking against overlapped and compressed rounds.

Runs the main job (examples/train_gpt.py, DeepSpeed ZeRO-2, 2 replicas x 2 ranks on gloo over
loopback) for a few steps in each round mode and reads ``round_memory_bytes_per_rank`` from its
summary: the bytes the rounds keep allocated beyond the engine's own state on the rank holding
most (qsr_ds.sync.core.SyncCore.round_memory_bytes). These are counts of allocated tensors, not
timings, so they do not depend on the machine's load.

    python benchmarks/round_memory.py      # writes results/round_memory.json and round_memory.md
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
OUT = HERE / "results" / "round_memory.json"
REPORT = HERE / "round_memory.md"
MODES = {
    "blocking": {},
    "overlap_steps 1": {"overlap_steps": 1},
    "compress bf16": {"compress": "bf16"},
    "compress int8": {"compress": "int8"},
    "overlap_steps 1 + int8": {"overlap_steps": 1, "compress": "int8"},
}


def run_mode(name: str, keys: dict, steps: int, workdir: Path, port: int) -> dict:
    cfg = copy.deepcopy(json.loads((ROOT / "configs" / "qsr.json").read_text()))
    # the schedule compressed to `steps` (as benchmarks/throughput.py does), so the run ends on its last,
    # blocking round with identical replicas
    warmup = max(1, steps // 10)
    cfg["scheduler"]["params"].update(total_num_steps=steps, warmup_num_steps=warmup)
    cfg["qsr"].update(keys, total_steps=steps, warmup_steps=warmup)
    config, summary = workdir / f"{port}.json", workdir / f"{port}-summary.json"
    config.write_text(json.dumps(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4", f"--master_port={port}",
           str(ROOT / "examples" / "train_gpt.py"), "--deepspeed_config", str(config), "--steps", str(steps),
           "--summary-json", str(summary), "--no-progress"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise SystemExit(f"{name}: train_gpt.py failed (exit {done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    s = json.loads(summary.read_text())
    shard_bytes = 4 * s["params"] // s["ranks_per_replica"]  # one rank's fp32 shard of the model (ZeRO-2)
    return {"mode": name, "qsr": keys, "steps": steps, "rounds": s["rounds"], "params": s["params"],
            "ranks_per_replica": s["ranks_per_replica"], "shard_fp32_bytes": shard_bytes,
            "round_memory_bytes_per_rank": s["round_memory_bytes_per_rank"],
            "x_shard": s["round_memory_bytes_per_rank"] / shard_bytes,
            "replicas_identical": len(set(s["replica_fingerprints"])) == 1}


def write_report(data: dict) -> None:
    lines = [
        "# Memory the sync rounds hold per rank",
        "",
        f"Command: `{data['command']}`, {data['date']}. The main job (DeepSpeed ZeRO-2, 2 replicas x 2 ranks, "
        f"{data['rows'][0]['params'] / 1e6:.2f}M parameters, configs/qsr.json with its schedule compressed to "
        f"{data['rows'][0]['steps']} steps: H = 2, so every round of the overlapped modes but the last overlaps).",
        "",
        "`round_memory_bytes_per_rank`: what the rounds keep allocated beyond the engine's own state, on the "
        "rank holding most (qsr_ds.sync.core.SyncCore.round_memory_bytes), against one rank's fp32 shard of the "
        "averaged parameters.",
        "",
        "| mode | rounds | MB per rank | x fp32 shard | replicas identical |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for r in data["rows"]:
        lines.append(f"| {r['mode']} | {r['rounds']} | {r['round_memory_bytes_per_rank'] / 1e6:.2f} | "
                     f"{r['x_shard']:.2f} | {'yes' if r['replicas_identical'] else 'NO'} |")
    lines += ["", "What each mode holds, by construction (qsr_ds/sync/averager.py, overlap.py, compress.py): a blocking "
              "round its scratch buckets (two at most, each at most `bucket_mb` and at most the shard; none when the "
              "averaged tensors are flat fp32 shards all-reduced in place, as ZeRO's partitions are here); an overlapped "
              "round one fp32 snapshot of the shard plus scratch that the blocking rounds share; a compressed round "
              "an fp32 anchor and an fp32 residual per element plus its quantized wire rows.", ""]
    REPORT.write_text("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_mode(name, keys, args.steps, Path(tmp), 29850 + i) for i, (name, keys) in enumerate(MODES.items())]
    data = {"command": "python benchmarks/round_memory.py" + "".join(f" {a}" for a in (argv or sys.argv[1:])),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    if args.out.resolve() == OUT.resolve():
        write_report(data)
    for r in rows:
        print(f"{r['mode']:24s} rounds {r['rounds']:3d}  {r['round_memory_bytes_per_rank'] / 1e6:7.2f} MB/rank "
              f"({r['x_shard']:.2f}x the fp32 shard)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

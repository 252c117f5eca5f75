"""benchmarks/throughput.md and results/throughput.png, generated from results/throughput.json.

Every number in the report comes from the JSON, so the text cannot go stale:
`python benchmarks/throughput.py --report-only` writes both again.
"""
from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
REPORT = HERE / "throughput.md"
PLOT = HERE / "results" / "throughput.png"
TARGET_BANDWIDTH = 50.0
CEILING_TARGET = 0.9
DP_TARGET = 3.0
DP_METHODS = ("hsdp", "ds_overlap")


def _fmt(spread: dict | None, scale: float = 1.0, digits: int = 0) -> str:
    if not spread:
        return "-"
    med, lo, hi = (spread[k] * scale for k in ("median", "min", "max"))
    if lo == hi:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def _cells(data: dict) -> dict:
    return {(c["bandwidth_mbit"], c["method"]): c for c in data["cells"]}


def cell_table(data: dict) -> list[str]:
    lines = ["| Mbit/s | method | steps | ms/step | x ceiling | rounds | link MB | expected MB | runs |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    order = {m: i for i, m in enumerate(data["methods"])}
    for c in sorted(data["cells"], key=lambda c: (c["bandwidth_mbit"], order.get(c["method"], 99))):
        exp = f"{c['expected_link_bytes'] / 1e6:.1f}" if c.get("expected_link_bytes") else "-"
        runs = f"{c['repeats']}" + (f" ({c['failed']} FAILED)" if c["failed"] else "")
        lines.append(f"| {c['bandwidth_mbit']:g} | {c['method']} | {c.get('steps', '-')} | "
                     f"{_fmt(c['seconds_per_step'], 1e3)} | {_fmt(c['ratio_to_ceiling'], digits=2)} | "
                     f"{_fmt(c['rounds'])} | {_fmt(c['link_bytes'], 1e-6, 1)} | {exp} | {runs} |")
    return lines


def targets(data: dict, mbit: float = TARGET_BANDWIDTH) -> list[str]:
    """The two targets of issue 17 at `mbit`, each line a verdict computed from the cells."""
    cells = _cells(data)
    lines = [f"### QSR with overlapped or compressed rounds >= {CEILING_TARGET}x ceiling at {mbit:g} Mbit/s", ""]
    variants = [c for (b, m), c in cells.items() if b == mbit and m.startswith("qsr")
                and (c.get("overlap_steps") or c.get("compress")) and c["ratio_to_ceiling"]]
    if not variants:
        lines.append(f"Not measured in this run (no QSR row with overlap or compression at {mbit:g} Mbit/s).")
    for c in variants:
        x = c["ratio_to_ceiling"]
        verdict = "met" if x["median"] >= CEILING_TARGET else "MISSED"
        lines.append(f"- {c['method']}: {_fmt(x, digits=2)} x ceiling (median, min-max over {c['repeats']} "
                     f"repeat(s)): **{verdict}**")
    if variants:
        best = max(variants, key=lambda c: c["ratio_to_ceiling"]["median"])
        met = best["ratio_to_ceiling"]["median"] >= CEILING_TARGET
        lines += ["", f"Target **{'met' if met else 'MISSED'}**: the best is {best['method']} at "
                      f"{best['ratio_to_ceiling']['median']:.2f}x."]
    lines += ["", f"### QSR >= {DP_TARGET:g}x the fair data parallel at {mbit:g} Mbit/s", ""]
    qsr = cells.get((mbit, "qsr"))
    dps = [cells[(mbit, m)] for m in DP_METHODS if (mbit, m) in cells and cells[(mbit, m)]["tokens_per_s"]]
    if not qsr or not qsr["tokens_per_s"] or not dps:
        lines.append(f"Not measured in this run (needs the qsr row and a data-parallel row, "
                     f"{' or '.join(DP_METHODS)}, at {mbit:g} Mbit/s).")
        return lines
    for dp in dps:
        ratio = qsr["tokens_per_s"]["median"] / dp["tokens_per_s"]["median"]
        worst = qsr["tokens_per_s"]["min"] / dp["tokens_per_s"]["max"]
        lines.append(f"- qsr / {dp['method']}: {ratio:.2f}x (medians; {worst:.2f}x slowest qsr against fastest "
                     f"{dp['method']}): **{'met' if ratio >= DP_TARGET else 'MISSED'}**")
    fair = max(dps, key=lambda c: c["tokens_per_s"]["median"])
    ratio = qsr["tokens_per_s"]["median"] / fair["tokens_per_s"]["median"]
    lines += ["", f"Target **{'met' if ratio >= DP_TARGET else 'MISSED'}** against the faster data parallel "
                  f"({fair['method']}): {ratio:.2f}x."]
    return lines


def peer(data: dict) -> list[str]:
    """qsr-ds against torchft's LocalSGD, per bandwidth: the same fixed H, then QSR's rows."""
    cells = _cells(data)
    lines = []
    for mbit in sorted({b for b, m in cells if m == "torchft_localsgd"}):
        ft = cells[(mbit, "torchft_localsgd")]
        if not ft["tokens_per_s"]:
            lines.append(f"- {mbit:g} Mbit/s: torchft_localsgd FAILED in {ft['failed']} run(s) (each after one retry); "
                         "the errors are in the JSON rows" + (", the reading below says what happened" if data.get("notes") else ""))
            continue
        parts = [f"{m} {cells[(mbit, m)]['tokens_per_s']['median'] / ft['tokens_per_s']['median']:.2f}x"
                 for m in data["methods"] if (mbit, m) in cells and m not in ("ceiling", "torchft_localsgd")
                 and cells[(mbit, m)]["tokens_per_s"]]
        lines.append(f"- {mbit:g} Mbit/s, tokens/s over torchft_localsgd's (medians): {', '.join(parts)}")
    return lines or ["Not measured in this run (no torchft_localsgd row)."]


def bytes_check(data: dict) -> list[str]:
    lines = []
    for c in data["cells"]:
        if c.get("expected_link_bytes") and c["link_bytes"]:
            lines.append(f"{c['method']} at {c['bandwidth_mbit']:g} Mbit/s "
                         f"{c['link_bytes']['median'] / c['expected_link_bytes']:.3f}")
    return lines


def _sweeps(data: dict) -> str:
    """How the numbers were made: each sweep's command, start, duration and machine load."""
    def load(sweep: dict, key: str) -> str:
        return ", ".join(f"{v:.2f}" for v in sweep[key]) if sweep.get(key) else "not recorded"

    sweeps = data.get("sweeps") or [data]
    lines = [f"Command: `{s['command']}`, started {s['date']}, {data['machine']}; took "
             f"{(s.get('wall_seconds') or 0) / 60:.0f} min. Load average (1, 5, 15 min) before: "
             f"{load(s, 'load_before')}; after: {load(s, 'load_after')}." for s in sweeps]
    if len(sweeps) > 1:
        lines.append("The sweeps' rows are pooled: a cell's runs are every repeat of every sweep that ran it, "
                     "each divided by the ceiling of its own sweep and repeat.")
    return "\n\n".join(lines)


def write_report(data: dict, path: Path = REPORT) -> None:
    dp_note = (f"The data-parallel rows run the first {data['dp_steps']} steps of the {data['steps']}-step "
               "schedule (their cost per step does not depend on the step); every other row runs all of it."
               if data["dp_steps"] < data["steps"] else "Every row runs the whole schedule.")
    failed = sum(c["failed"] for c in data["cells"])
    retried = sum(1 for r in data["rows"] if r.get("first_error"))
    checks = bytes_check(data)
    text = f"""# Throughput over a bandwidth-limited link

{_sweeps(data)}

Two network namespaces joined by a veth pair shaped with `tc tbf` (burst 512 kB,
{data['delay_ms']:g} ms added netem delay), 2 ranks in each; the main job (`examples/train_gpt.py`,
{data['params_note']}, 4 ranks x 8 sequences x 64 tokens per step) on `configs/qsr.json` with
its schedule over {data['steps']} steps. {dp_note}
In each repeat of a sweep every bandwidth and method of that sweep ran once, methods interleaved and
the compute-only ceiling (each host training alone) first. Cells: median (min-max) over repeats.
"x ceiling" divides a run's tokens/s by the ceiling of the same repeat and bandwidth.

Rows: `hsdp` = FSDP2 HSDP on the (replicate, shard) = (2, 2) mesh (gradients cross the link
once per step); `ds_overlap` = DeepSpeed ZeRO-2 with overlap_comm over all 4 ranks; `constant` =
H = h_base; `qsr` = the QSR schedule; `_tauN` = overlapped rounds (overlap_steps N); `_int8`,
`_bf16` = compressed rounds; `torchft_localsgd` = torchft 0.2.0's LocalSGD at H = h_base (FSDP2
inside each host, a torchft replica group per host, its lighthouse on host 0;
`benchmarks/torchft_peer.py`). Link MB: the veth tx counters of both ends; expected: twice the
bytes the averager counted across replicas plus one fp32 model (qsr-ds's start-up broadcast;
torchft's replicas start from the same seeded weights instead).

{chr(10).join(cell_table(data))}
{f"{chr(10)}**{failed} run(s) FAILED** (after one retry); their errors are in the JSON rows.{chr(10)}" if failed else ""}\
{f"{chr(10)}{retried} run(s) failed once and were run again (first_error in the JSON rows).{chr(10)}" if retried else ""}
## Targets (computed from the JSON)

{chr(10).join(targets(data))}

### Against the peer: torchft LocalSGD at H = h_base

{chr(10).join(peer(data))}

![x ceiling vs bandwidth](results/throughput.png)

Link bytes / expected (median): {'; '.join(checks) if checks else 'no local rows'}.

Caveats: {data['machine'].split(',')[0]} run 4 training processes, so the ceiling is
compute-bound and sensitive to anything else on the machine (see the load above); on CPU
gloo collectives run on the training thread, so DeepSpeed's overlap_comm and FSDP2's
backward overlap hide little.
{(chr(10) + "## Reading" + chr(10) + chr(10) + data["notes"] + chr(10)) if data.get("notes") else ""}"""
    path.write_text(text)


def plot(data: dict, path: Path = PLOT) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in data["methods"]:
        cells = sorted((c for c in data["cells"] if c["method"] == method and c["ratio_to_ceiling"]),
                       key=lambda c: c["bandwidth_mbit"])
        if not cells or method == "ceiling":
            continue
        x = [c["bandwidth_mbit"] for c in cells]
        med = [c["ratio_to_ceiling"]["median"] for c in cells]
        err = [[m - c["ratio_to_ceiling"]["min"] for m, c in zip(med, cells)],
               [c["ratio_to_ceiling"]["max"] - m for m, c in zip(med, cells)]]
        ax.errorbar(x, med, yerr=err, marker="o", capsize=3, label=method)
    ax.axhline(CEILING_TARGET, color="k", linestyle="--", linewidth=1, label=f"target {CEILING_TARGET}x")
    ax.axhline(1.0, color="grey", linewidth=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("link bandwidth (Mbit/s)")
    ax.set_ylabel("throughput / compute-only ceiling")
    ax.set_title(f"main job, 2 hosts x 2 ranks, median and min-max of {data['repeats']} repeat(s)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)

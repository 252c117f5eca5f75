"""The summary and report of benchmarks/accuracy.py: per-method statistics, the paper's claims, plots, accuracy.md.

``summarize`` turns one regime's runs (benchmarks/accuracy_sim.py ``run``) into per-method
rows; ``verdict`` and ``variant_claims`` check the paper's ordering on them, per seed;
``plot`` draws the curves; ``write_report`` rewrites the generated part of accuracy.md (between
BEGIN and END) and keeps the hand-written rest.
"""
from __future__ import annotations

import os
import re
import statistics

from benchmarks.accuracy_sim import LABELS, REGIMES, VARIANTS, Config, alpha_for, config_args, lr_fn, schedule_for


def summarize(runs: list[dict], cfg: Config) -> dict:
    out = {}
    for method in cfg.methods:
        mine = [r for r in runs if r["method"] == method]
        if not mine:
            continue
        mine.sort(key=lambda r: r["seed"])
        row = {"label": LABELS[method], "seeds": [r["seed"] for r in mine], "rounds": mine[0]["rounds"],
               "overlapped_rounds": mine[0].get("overlapped_rounds", 0)}
        for key in ("val_acc", "val_loss", "train_acc", "train_loss"):
            vals = [r[key] for r in mine]
            row[key] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                        "median": statistics.median(vals), "min": min(vals), "max": max(vals), "values": vals}
        sched = schedule_for(method, cfg)
        if sched is not None:
            hs = [h for _, h in sched.rounds(lr_fn(cfg))]
            row.update(rule=sched.rule, gamma=sched.effective_gamma, alpha=sched.alpha, h_base=sched.h_base,
                       h_first=hs[0], h_max=max(hs), h_last=hs[-1])
        out[method] = row
    return out


def compare(summary: dict, a: str, b: str) -> dict | None:
    """a minus b in validation accuracy, per seed (same seed: same init and data streams)."""
    if a not in summary or b not in summary:
        return None
    va, vb = (dict(zip(summary[m]["seeds"], summary[m]["val_acc"]["values"])) for m in (a, b))
    per_seed = [va[seed] - vb[seed] for seed in sorted(set(va) & set(vb))]
    mean = statistics.fmean(per_seed)
    if mean >= 0:
        state = "holds" if min(per_seed) > 0 else "holds on the mean, not for every seed"
    else:
        state = "does NOT hold" if max(per_seed) < 0 else "does not hold on the mean, not for every seed"
    return {"a": a, "b": b, "mean": mean, "per_seed": per_seed, "state": state}


CLAIMS = (("qsr", "const_base", "QSR >= constant H = H_base"),
          ("qsr", "const_large", "QSR >= constant H = H_large (about QSR's communication)"),
          ("qsr", "dp", "QSR >= data parallel"),
          ("qsr", "post_local", "QSR >= post-local SGD"),
          ("qsr", "qsr_g1", "gamma 2 >= gamma 1"),
          ("qsr", "qsr_g3", "gamma 2 >= gamma 3"))
# the claims that must survive overlapped and compressed rounds
VARIANT_BASELINES = ("const_base", "const_large", "dp")


def variant_claims(summary: dict) -> list[str]:
    """Each variant of QSR against exact QSR and against the baselines QSR is compared with."""
    lines = []
    for v in (m for m in VARIANTS if m in summary):
        c = compare(summary, v, "qsr")
        if c is not None:
            seeds = ", ".join(f"{100 * d:+.2f}" for d in c["per_seed"])
            shown = summary[v]["overlapped_rounds"]
            shown = f" ({shown} of {summary[v]['rounds']} rounds overlapped)" if shown else ""
            lines.append(f"- {LABELS[v]}{shown}: {100 * summary[v]['val_acc']['mean']:.2f} %, exact QSR "
                         f"{100 * summary['qsr']['val_acc']['mean']:.2f} %: {100 * c['mean']:+.2f} points (per seed "
                         f"{seeds}).")
        same, differ = [], []
        for b in VARIANT_BASELINES:
            mine, exact = compare(summary, v, b), compare(summary, "qsr", b)
            if mine is None:
                continue
            text = f"vs {LABELS[b]} {100 * mine['mean']:+.2f} points, {mine['state']}"
            if exact is None or exact["state"] == mine["state"]:
                same.append(text)
            else:
                differ.append(f"{text} (exact QSR: {exact['state']})")
        if same or differ:
            head = "the ordering is the same as exact QSR's" if not differ else "the ordering differs from exact QSR's"
            lines.append(f"  - {head}: " + "; ".join(differ + same) + ".")
    return lines


def verdict(summary: dict) -> list[str]:
    lines = []
    for a, b, what in CLAIMS:
        c = compare(summary, a, b)
        if c is None:
            continue
        seeds = ", ".join(f"{100 * d:+.2f}" for d in c["per_seed"])
        lines.append(f"- {what}: **{c['state']}**: {LABELS[a]} {100 * summary[a]['val_acc']['mean']:.2f} % vs "
                     f"{LABELS[b]} {100 * summary[b]['val_acc']['mean']:.2f} %, difference "
                     f"{100 * c['mean']:+.2f} points (per seed {seeds}).")
    return lines


def plot(runs: list[dict], cfg: Config, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for row, (metric, name) in enumerate((("val_acc", "val next-byte accuracy"), ("val_loss", "val loss (nats)"))):
        late = [p[metric] for r in runs for p in r["curve"][len(r["curve"]) // 3:]]
        for method in cfg.methods:
            mine = [r["curve"] for r in runs if r["method"] == method and r["curve"]]
            if not mine:
                continue
            steps = [p["step"] for p in mine[0]]
            rounds = [max(1, p["rounds"]) for p in mine[0]]
            mean = [statistics.fmean(c[i][metric] for c in mine) for i in range(len(steps))]
            style = "--" if method in ("qsr_g1", "qsr_g3") else ":" if method in VARIANTS else "-"
            axes[row, 0].plot(steps, mean, style, label=LABELS[method])
            axes[row, 1].plot(rounds, mean, style, marker=".", label=LABELS[method])
        axes[row, 0].set_xlabel("optimizer steps")
        axes[row, 1].set_xlabel("communication rounds (log scale)")
        axes[row, 1].set_xscale("log")
        for ax in axes[row]:
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
            if late and metric == "val_acc":
                ax.set_ylim(min(late) - 0.01, max(late) + 0.005)
            elif late:
                ax.set_ylim(min(late) - 0.02, max(late) + 0.05)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"{title}: mean over {len(cfg.seeds)} seeds, curves on {cfg.eval_positions} validation positions "
                 "(the replicas' mean between boundaries)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(summary: dict) -> str:
    lines = ["| method | rounds | H (first / max / last) | val acc % (mean ± std) | val acc % median [min, max] "
             "| val loss | train loss |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for row in summary.values():
        hs = f"{row['h_first']} / {row['h_max']} / {row['h_last']}" if "h_first" in row else "1 (gradients)"
        va, vl, tl = row["val_acc"], row["val_loss"], row["train_loss"]
        median = statistics.median(va["values"])
        lines.append(f"| {row['label']} | {row['rounds']} | {hs} | {100 * va['mean']:.2f} ± {100 * va['std']:.2f} "
                     f"| {100 * median:.2f} [{100 * va['min']:.2f}, {100 * va['max']:.2f}] "
                     f"| {vl['mean']:.4f} ± {vl['std']:.4f} | {tl['mean']:.4f} ± {tl['std']:.4f} |")
    return "\n".join(lines)


BEGIN, END = "<!-- BEGIN GENERATED (benchmarks/accuracy.py) -->", "<!-- END GENERATED -->"


def regime_text(name: str, res: dict, rel: str) -> list[str]:
    cfg = res["config"]
    epochs = cfg["steps"] * cfg["replicas"] * cfg["batch"] / res["train_bytes"]
    return [
        f"### {name}: {REGIMES[name]['about']}",
        "",
        f"{res['train_bytes']} training bytes ({epochs:.1f} epochs), {res['params']} parameters; "
        f"R = {cfg['replicas']} replicas x batch {cfg['batch']} (data parallel: global batch "
        f"{cfg['replicas'] * cfg['batch']}), {cfg['steps']} steps, {cfg['optimizer']} (weight decay "
        f"{cfg['weight_decay']}), peak LR {cfg['lr']} after {cfg['warmup']} linear warm-up steps, cosine to "
        f"{cfg['min_lr']}; H_base {cfg['h_base']}, alpha {cfg['alpha']} for gamma 2 (gamma 1 and 3: alpha "
        f"{alpha_for(1, Config(**config_args(cfg))):.4g} and {alpha_for(3, Config(**config_args(cfg))):.4g}, so H "
        f"leaves H_base at the same LR), H_large {res['h_large']}; post-local: H = 1 until step "
        f"{int(cfg['steps'] * cfg['post_local_switch'])}, then H_large. Seeds {list(cfg['seeds'])}; "
        f"{res['wall_seconds']:.0f} s.",
        "",
        table(res["summary"]),
        "",
        "The paper's ordering, on final validation accuracy ('holds' when every seed agrees; a seed "
        "pairs the same initialization and data streams across methods):",
        "",
        *verdict(res["summary"]),
        "",
        *((["QSR with overlapped or compressed rounds (same seeds, same schedule):", "",
            *variant_claims(res["summary"]), ""]) if any(m in res["summary"] for m in VARIANTS) else []),
        f"![{name}]({rel}/accuracy_{name}.png)",
        "",
    ]


def commands_of(result: dict) -> list[dict]:
    """The runs a result holds, oldest first (a JSON written before merging holds one)."""
    return result.get("commands") or [{k: result.get(k) for k in ("command", "wall_seconds", "cpu_seconds", "load")}]


def write_report(result: dict, out_dir: str, report: str) -> None:
    rel = os.path.relpath(out_dir, os.path.dirname(os.path.abspath(report)))
    runs = [f"`{c['command']}`: {c['wall_seconds']:.0f} s wall ({c['cpu_seconds']:.0f} s CPU)"
            + (f", load average {c['load'][0]:.1f} at the start, {c['load'][1]:.1f} at the end" if c.get("load") else "")
            for c in commands_of(result)]
    body = [BEGIN, f"Run: {'; then '.join(runs)} (a later run's rows replace the same method and seed, the "
            f"rest are kept); torch {result['torch']}, Python {result['python']}, {result['threads']} thread(s); "
            f"validation: the last {result['val_bytes']} bytes.", ""]
    for name, res in result["regimes"].items():
        body += regime_text(name, res, rel)
    body = "\n".join(body + [END])
    if os.path.exists(report):
        with open(report) as f:
            text = f.read()
        if BEGIN in text and END in text:
            text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: body, text, flags=re.S)
        else:
            text = text.rstrip() + "\n\n" + body + "\n"
    else:
        text = f"# Accuracy: QSR and its baselines\n\n{body}\n"
    with open(report, "w") as f:
        f.write(text)

"""The `qsr-ds` command.

Each command is a pair: ``_add_<name>(subparsers)`` declares its arguments and sets
``func``; ``func(args) -> int`` runs it. To add a command, write the pair and list the
``_add_`` function in COMMANDS.
"""
from __future__ import annotations

import argparse
import json
import sys

from .config import QSRConfigError
from .planning.plan import build_plan, build_projection, cost_inputs, format_plan, load_plan_inputs, write_plot
from .planning.projection import (ProjectionError, dtype_bytes, format_projection, parse_bandwidth, parse_bytes,
                                  parse_count)
from .schedule import ScheduleError


class FlagError(ValueError):
    """A command-line flag that cannot be used, named in the message."""


# --project's flags: (flag, keyword of plan.cost_inputs or None, argparse options)
_PROJECT_FLAGS = (
    ("--step-time", "step_seconds", dict(type=float, metavar="SECONDS",
     help="measured compute-only time of one optimizer step of one replica")),
    ("--params", "params", dict(metavar="N", help="parameters of the model, e.g. 86M or 7B")),
    ("--model-bytes", None, dict(metavar="BYTES", help="or the model's size in --state-dtype, e.g. 344MB")),
    ("--state-dtype", "state_dtype", dict(default="fp32", metavar="DTYPE",
     help="dtype of the averaged state (default fp32 masters)")),
    ("--grad-dtype", "grad_dtype", dict(metavar="DTYPE",
     help="dtype of data parallel's gradients (default: --state-dtype)")),
    ("--bandwidth", "bandwidth_bits_per_s", dict(metavar="RATE",
     help="the slow inter-replica link, each way, with a unit: 10gbit, 200mbit")),
    ("--replicas", "replicas", dict(type=int, metavar="R", help="replicas across the slow link")),
    ("--world-size", None, dict(type=int, metavar="N", help="or all ranks: R = N / qsr.ranks_per_replica")),
    ("--latency-ms", "latency_s", dict(type=float, default=0.0, metavar="MS",
     help="fixed cost of one collective (default 0)")),
    ("--overlap-steps", "overlap_steps", dict(type=int, metavar="TAU",
     help="overlapped rounds hide up to TAU steps of compute (default: the config's, else 0)")),
    ("--compress", "compress", dict(metavar="none|bf16|int8",
     help="local rounds sent as none, bf16 or int8 (default: the config's, else none)")),
    ("--compress-route", "compress_route", dict(metavar="gather|owner",
     help="how compressed rows cross the replicas (default: the config's, else gather)")),
    ("--int8-block", "int8_block", dict(type=int, default=256, metavar="N",
     help="elements per fp32 scale in int8 rounds")),
    ("--dp-overlap", "dp_overlap", dict(type=float, default=0.0, metavar="FRACTION",
     help="fraction of a step's compute that hides data parallel's all-reduce (default 0)")),
)
_FLAG_OF = {key: flag for flag, key, _ in _PROJECT_FLAGS if key}


def _dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


def _parsed(flag: str, text: str, parse):
    try:
        return parse(text)
    except ValueError as err:
        raise FlagError(f"{flag}: {err}") from None


def _projection_inputs(args: argparse.Namespace, config):
    """plan.cost_inputs from the --project flags; a FlagError names the flag that is wrong."""
    for flag in ("--step-time", "--bandwidth"):
        if getattr(args, _dest(flag)) is None:
            raise FlagError(f"{flag}: required with --project")
    if (args.params is None) == (args.model_bytes is None):
        raise FlagError("--params / --model-bytes: give exactly one (the model's size)")
    if (args.replicas is None) == (args.world_size is None):
        raise FlagError("--replicas / --world-size: give exactly one")
    if args.params is not None:
        params = _parsed("--params", args.params, parse_count)
    else:
        size = _parsed("--state-dtype", args.state_dtype, dtype_bytes)
        params = _parsed("--model-bytes", args.model_bytes, parse_bytes) / size
    if args.world_size is not None:
        if args.world_size < 1:
            raise FlagError(f"--world-size: must be >= 1, got {args.world_size}")
        try:
            replicas = config.num_replicas(args.world_size)
        except QSRConfigError as err:
            raise FlagError(f"--world-size: {err}") from None
    else:
        replicas = args.replicas
    try:
        return cost_inputs(
            config, step_seconds=args.step_time, replicas=replicas, params=params,
            bandwidth_bits_per_s=_parsed("--bandwidth", args.bandwidth, parse_bandwidth),
            state_dtype=args.state_dtype, grad_dtype=args.grad_dtype, latency_s=args.latency_ms / 1e3,
            overlap_steps=args.overlap_steps, compress=args.compress, int8_block=args.int8_block,
            dp_overlap=args.dp_overlap, compress_route=args.compress_route,
        )
    except ProjectionError as err:
        flag = _FLAG_OF.get(err.field, err.field)
        raise FlagError(f"{flag}: {err.reason}") from None


def _check_project_flags(args: argparse.Namespace) -> None:
    if args.project:
        return
    for flag, _, options in _PROJECT_FLAGS:
        if getattr(args, _dest(flag)) != options.get("default"):
            raise FlagError(f"{flag}: only used with --project")


def _plan(args: argparse.Namespace) -> int:
    _check_project_flags(args)
    config, lr_at = load_plan_inputs(args.config)
    inputs = _projection_inputs(args, config) if args.project else None
    plan = build_plan(config, lr_at)
    if inputs is not None:
        plan["projection"] = build_projection(config, lr_at, inputs)
    for warning in plan["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps(plan))
    else:
        print(format_plan(plan))
        if inputs is not None:
            print("\n" + format_projection(plan["projection"]))
    if args.plot:
        try:
            write_plot(config, lr_at, args.plot)
        except OSError as err:
            print(f"error: cannot write the plot {args.plot}: {err.strerror or err}", file=sys.stderr)
            return 1
        if not args.json:
            print(f"plot written to {args.plot}")
    return 0


def _add_plan(subparsers) -> None:
    p = subparsers.add_parser("plan", help="show the H schedule and round count of a config")
    p.add_argument("--config", required=True, help="DeepSpeed JSON with \"qsr\" and \"scheduler\" sections")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    p.add_argument("--plot", metavar="PNG", help="also plot lr and H against the step into this file")
    p.add_argument("--project", action="store_true",
                   help="also project whole-run hours of data parallel, constant H and the schedule "
                        "(needs --step-time, --params or --model-bytes, --bandwidth, --replicas or --world-size)")
    group = p.add_argument_group("projection (with --project; cost model in docs/planner.md)")
    for flag, _, options in _PROJECT_FLAGS:
        group.add_argument(flag, **options)
    p.set_defaults(func=_plan)


def _info(args: argparse.Namespace) -> int:
    import platform
    from importlib import metadata

    import torch

    from . import __version__
    from .kernels import describe_backends

    versions = {"qsr-ds": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for dist in ("triton", "deepspeed"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    versions["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
    backends = describe_backends()
    if args.json:
        print(json.dumps({"versions": versions, "kernels": backends}))
        return 0
    for name, version in versions.items():
        print(f"{name:10s} {version or 'not available'}")
    print("kernel back-ends:")
    for name in ("torch", "cpp", "triton"):
        entry = backends[name]
        where = ", ".join(entry["devices"])
        print(f"  {name:7s} " + (f"available ({where})" if entry["available"] else f"unavailable: {entry['reason']}"))
    print("  auto    " + ", ".join(f"{dev} -> {name}" for dev, name in backends["auto"].items()))
    return 0


def _add_info(subparsers) -> None:
    p = subparsers.add_parser("info", help="versions and which kernel back-ends can run here (and why not)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_info)


COMMANDS = [_add_plan, _add_info]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qsr-ds", description="Local SGD/AdamW with the Quadratic Synchronization Rule")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (QSRConfigError, ScheduleError, FlagError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

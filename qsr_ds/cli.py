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
from .schedule import ScheduleError


def _plan(args: argparse.Namespace) -> int:
    from .plan import build_plan, format_plan, load_plan_inputs, write_plot

    config, lr_at = load_plan_inputs(args.config)
    plan = build_plan(config, lr_at)
    for warning in plan["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print(json.dumps(plan) if args.json else format_plan(plan))
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
    except (QSRConfigError, ScheduleError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

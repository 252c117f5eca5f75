"""Whole-run wall time of data parallel, constant H and a sync schedule: a stated cost model.

Pure arithmetic, no torch. The model, for a run of N optimizer steps on R replicas joined
by one slow link (one replica per node, its S ranks on fast links inside):

* t = the measured compute time of one step of one replica training alone (whatever the
  replica does inside itself, e.g. ZeRO's own collectives over NVLink, is part of t).
* A collective of P bytes per replica is a ring all-reduce across the R replicas: each node
  sends 2(R-1)/R x P bytes over its link (all S shard groups share the node's link, so P
  is the whole replica's bytes), taking latency + 2(R-1)/R x P x 8 / bandwidth seconds.
  R = 1 sends nothing and costs nothing.
* data parallel (hierarchical: reduce inside the node, then across nodes) all-reduces the
  gradient bytes once per step; a fraction f of the step's compute can hide it (overlap
  with backward): step wall = t + max(0, c_dp - f t).
* local methods (constant H, QSR, ...) all-reduce the averaged state once per round.
  Compressed rounds (qsr_ds/sync/compress.py) all-gather each replica's quantized row instead
  (bf16: 2 bytes per element; int8: 1 byte plus one fp32 scale per block), so a node
  sends (R-1) rows: the same bytes as the fp32 ring at R = 2 halved (bf16) or quartered
  (int8), less saving for larger R. A blocking round costs its time c; an overlapped round (tau >= 1)
  hides min(c, tau t) of it, except rounds shorter than tau + 1 steps and the last round
  of the run, which block: wall = N t + sum over rounds of the exposed time.
* rho = one collective's time / t, the number that decides how much communication costs.

Not modelled: the start-up broadcast, pack/unpack passes (near zero where rounds are
zero-copy), compute slowed by concurrent communication, stragglers.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from ..config import COMPRESS_ROUTES as ROUTES

COMPRESS = ("none", "bf16", "int8")
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp64": 8, "float64": 8}


class ProjectionError(ValueError):
    """A cost-model input that cannot be used; ``field`` names the input."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


@dataclass(frozen=True, kw_only=True)
class CostInputs:
    """What the cost model needs to know about the machine and the model."""

    step_seconds: float
    """t: measured compute-only time of one optimizer step of one replica (nothing crossing the slow link)."""
    replicas: int
    """R: replicas that average across the slow link (typically nodes)."""
    state_bytes: float
    """Bytes one replica averages per round, all its shards together (fp32 masters: 4 per parameter)."""
    state_elements: float
    """Numbers averaged per round; compression sends bytes per element, so it needs the count."""
    grad_bytes: float
    """Bytes of gradients that data parallel all-reduces across the slow link once per step."""
    bandwidth_bits_per_s: float
    """Bandwidth of one node's slow link in bits per second, each direction."""
    latency_s: float = 0.0
    """Fixed cost of one collective across the slow link (one per round, one per data-parallel step)."""
    overlap_steps: int = 0
    """tau: an overlapped round's all-reduce runs under the next tau steps; 0 = blocking rounds."""
    compress: str = "none"
    """Local rounds send none (the fp32 state as is), bf16 (2 bytes/element) or int8 (1 + scales)."""
    int8_block: int = 256
    """Elements sharing one fp32 scale in int8 rounds (compress.py starts blocks per tensor; ignored here)."""
    compress_route: str = "gather"
    """Compressed rows all-gathered ("gather": R - 1 rows on a node's link) or summed by segment owners
    and all-gathered back ("owner": 2 (R - 1) / R rows, like a ring)."""
    dp_overlap: float = 0.0
    """f: fraction of a step's compute that data parallel's gradient all-reduce can hide behind (0..1)."""

    def __post_init__(self) -> None:
        _positive(self, "step_seconds")
        _positive(self, "state_bytes")
        _positive(self, "state_elements")
        _positive(self, "grad_bytes")
        _positive(self, "bandwidth_bits_per_s")
        _integer(self, "replicas", 1)
        _integer(self, "overlap_steps", 0)
        _integer(self, "int8_block", 1)
        if not (_finite(self.latency_s) and self.latency_s >= 0):
            raise ProjectionError("latency_s", f"must be a finite number >= 0, got {self.latency_s!r}")
        if not (_finite(self.dp_overlap) and 0 <= self.dp_overlap <= 1):
            raise ProjectionError("dp_overlap", f"must be a fraction between 0 and 1, got {self.dp_overlap!r}")
        if self.compress not in COMPRESS:
            raise ProjectionError("compress", f"must be one of {', '.join(COMPRESS)}, got {self.compress!r}")
        if self.compress_route not in ROUTES:
            raise ProjectionError("compress_route", f"must be one of {', '.join(ROUTES)}, got {self.compress_route!r}")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive(inputs: CostInputs, name: str) -> None:
    value = getattr(inputs, name)
    if not (_finite(value) and value > 0):
        raise ProjectionError(name, f"must be a finite number > 0, got {value!r}")


def _integer(inputs: CostInputs, name: str, low: int) -> None:
    value = getattr(inputs, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ProjectionError(name, f"must be an integer >= {low}, got {value!r}")


def ring_factor(replicas: int) -> float:
    """Bytes each node sends per byte all-reduced, ring algorithm: 2(R-1)/R."""
    return 2 * (replicas - 1) / replicas


def wire_bytes(inputs: CostInputs) -> float:
    """One replica's payload in one round: its fp32 state, or its quantized row when compressed."""
    if inputs.compress == "bf16":
        return min(inputs.state_bytes, 2 * inputs.state_elements)
    if inputs.compress == "int8":
        return inputs.state_elements + 4 * math.ceil(inputs.state_elements / inputs.int8_block)
    return inputs.state_bytes


def round_link_bytes(inputs: CostInputs) -> float:
    """Bytes one node sends over its link in one local round."""
    if inputs.compress == "none":
        return ring_factor(inputs.replicas) * inputs.state_bytes
    if inputs.compress_route == "owner":  # all_to_all of segments, then all-gather of the owners' sums
        return ring_factor(inputs.replicas) * wire_bytes(inputs)
    return (inputs.replicas - 1) * wire_bytes(inputs)  # all-gather of every replica's quantized row


def link_seconds(inputs: CostInputs, link_bytes: float) -> float:
    """Time of one collective that puts ``link_bytes`` on each node's link (0 for R = 1)."""
    if inputs.replicas == 1:
        return 0.0
    return inputs.latency_s + link_bytes * 8 / inputs.bandwidth_bits_per_s


def round_seconds(inputs: CostInputs) -> float:
    """c: one local round's communication time."""
    return link_seconds(inputs, round_link_bytes(inputs))


def dp_step_comm_seconds(inputs: CostInputs) -> float:
    """c_dp: one data-parallel step's gradient all-reduce time (ring)."""
    return link_seconds(inputs, ring_factor(inputs.replicas) * inputs.grad_bytes)


def is_blocking(h: int, last: bool, overlap_steps: int) -> bool:
    """Whether a round of ``h`` steps waits for its all-reduce (tau = 0, too short, or last)."""
    return overlap_steps == 0 or last or h < overlap_steps + 1


@dataclass(frozen=True, kw_only=True)
class MethodProjection:
    """The projected wall time of one method over the whole run."""

    method: str
    """data_parallel, constant_h, or the config's rule."""
    label: str
    """How the method is printed."""
    steps: int
    """Optimizer steps in the run."""
    collectives: int
    """Collectives across the slow link: one per step (data parallel) or per round; 0 when R = 1."""
    blocking: int
    """Collectives whose time is fully exposed."""
    seconds_per_collective: float
    """One collective across the slow link (latency included)."""
    rho: float
    """seconds_per_collective / step_seconds."""
    compute_seconds: float
    """steps x step_seconds."""
    exposed_comm_seconds: float
    """Communication time not hidden behind compute."""

    @property
    def seconds(self) -> float:
        return self.compute_seconds + self.exposed_comm_seconds

    @property
    def hours(self) -> float:
        return self.seconds / 3600

    def to_dict(self) -> dict:
        return dict(asdict(self), seconds=self.seconds, hours=self.hours)


def project_data_parallel(inputs: CostInputs, total_steps: int) -> MethodProjection:
    """Hierarchical data parallel: one gradient all-reduce across replicas per step."""
    comm = dp_step_comm_seconds(inputs)
    exposed = max(0.0, comm - inputs.dp_overlap * inputs.step_seconds)
    return MethodProjection(
        method="data_parallel", label="data parallel", steps=total_steps, collectives=total_steps if comm else 0,
        blocking=total_steps if exposed else 0, seconds_per_collective=comm, rho=comm / inputs.step_seconds,
        compute_seconds=total_steps * inputs.step_seconds, exposed_comm_seconds=total_steps * exposed,
    )


def project_rounds(inputs: CostInputs, rounds: list[tuple[int, int]], *, method: str, label: str) -> MethodProjection:
    """A local method with these rounds, as (start_step, H) pairs covering the run in order."""
    if not rounds:
        raise ProjectionError("rounds", "a schedule needs at least one round")
    comm = round_seconds(inputs)
    hidden = min(comm, inputs.overlap_steps * inputs.step_seconds)
    blocking = sum(1 for i, (_, h) in enumerate(rounds) if is_blocking(h, i == len(rounds) - 1, inputs.overlap_steps))
    overlapped = len(rounds) - blocking
    steps = rounds[-1][0] + rounds[-1][1]
    return MethodProjection(
        method=method, label=label, steps=steps, collectives=len(rounds) if comm else 0,
        blocking=blocking if comm else 0, seconds_per_collective=comm, rho=comm / inputs.step_seconds,
        compute_seconds=steps * inputs.step_seconds,
        exposed_comm_seconds=blocking * comm + overlapped * (comm - hidden),
    )


def compute_only(inputs: CostInputs, total_steps: int) -> MethodProjection:
    """The ceiling: every replica training alone, nothing crossing the link."""
    return MethodProjection(
        method="compute_only", label="compute only", steps=total_steps, collectives=0, blocking=0,
        seconds_per_collective=0.0, rho=0.0, compute_seconds=total_steps * inputs.step_seconds,
        exposed_comm_seconds=0.0,
    )


def project(inputs: CostInputs, *, constant_rounds: list[tuple[int, int]], schedule_rounds: list[tuple[int, int]],
            rule: str, h_base: int) -> list[MethodProjection]:
    """Compute only, data parallel, constant H = h_base and the schedule, over the same steps."""
    total = constant_rounds[-1][0] + constant_rounds[-1][1]
    if schedule_rounds[-1][0] + schedule_rounds[-1][1] != total:
        raise ProjectionError("rounds", "the constant-H and the schedule's rounds must cover the same steps")
    suffix = _round_suffix(inputs)
    return [
        compute_only(inputs, total),
        project_data_parallel(inputs, total),
        project_rounds(inputs, constant_rounds, method="constant_h", label=f"constant H={h_base}{suffix}"),
        project_rounds(inputs, schedule_rounds, method=rule, label=f"{rule}{suffix}"),
    ]


def _round_suffix(inputs: CostInputs) -> str:
    parts = [f"tau={inputs.overlap_steps}"] if inputs.overlap_steps else []
    parts += [inputs.compress + (" owner" if inputs.compress_route == "owner" else "")] if inputs.compress != "none" else []
    return f" ({', '.join(parts)})" if parts else ""


# Human input: "10gbit", "86M", "344MB" ...

_NUMBER = r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*"
_BANDWIDTH_UNITS = {"gbit": 1e9, "gbps": 1e9, "gbit/s": 1e9, "mbit": 1e6, "mbps": 1e6, "mbit/s": 1e6,
                    "kbit": 1e3, "kbps": 1e3, "kbit/s": 1e3}
_COUNT_UNITS = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
_BYTE_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def _number_with_unit(text: str, units: dict, example: str) -> float:
    match = re.fullmatch(_NUMBER + r"([A-Za-z/]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in units:
        raise ValueError(f"cannot read {text!r}; expected a number and one of "
                         f"{', '.join(u for u in units if u) or 'no unit'}, e.g. {example}")
    value = float(match.group(1)) * units[unit]
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"must be > 0, got {text!r}")
    return value


def parse_bandwidth(text: str) -> float:
    """'10gbit', '200Mbit/s', '50mbps' -> bits per second (SI prefixes, as tc uses)."""
    return _number_with_unit(text, _BANDWIDTH_UNITS, "10gbit or 200mbit")


def parse_count(text: str) -> float:
    """'86M', '7B', '1.3e9' -> a number of parameters."""
    return _number_with_unit(text, _COUNT_UNITS, "86M or 7B")


def parse_bytes(text: str) -> float:
    """'344MB', '7GiB', '1.5e9' -> bytes."""
    return _number_with_unit(text, _BYTE_UNITS, "344MB or 16GiB")


def dtype_bytes(name: str) -> int:
    """Bytes per element of a dtype name such as fp32 or bf16."""
    try:
        return DTYPE_BYTES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPE_BYTES)}") from None


def assumptions(inputs: CostInputs) -> list[str]:
    """The cost model's inputs and rules, in words, as the report prints them."""
    r = inputs.replicas
    lines = [
        f"t = {inputs.step_seconds:g} s compute per step (one replica alone); R = {r} replicas; "
        f"link {format_rate(inputs.bandwidth_bits_per_s)} each way, latency {inputs.latency_s * 1e3:g} ms per collective",
        f"data parallel and fp32 rounds are ring all-reduces: a node sends 2(R-1)/R = {ring_factor(r):g} x the replica's bytes",
        f"data parallel: {inputs.grad_bytes / 1e6:,.1f} MB of gradients per step, "
        + (f"{inputs.dp_overlap:g} of the step's compute hides it" if inputs.dp_overlap else "not overlapped"),
        f"local rounds: {inputs.state_bytes / 1e6:,.1f} MB averaged per round"
        + (f", sent as {inputs.compress} rows of {wire_bytes(inputs) / 1e6:,.1f} MB, " + (
            f"summed by segment owners: 2(R-1)/R = {ring_factor(r):g} rows on the link" if inputs.compress_route == "owner"
            else f"all-gathered: (R-1) = {r - 1} rows on the link") if inputs.compress != "none" else "")
        + (f"; overlapped by tau={inputs.overlap_steps} steps (rounds shorter than {inputs.overlap_steps + 1} "
           "and the last round block)" if inputs.overlap_steps else "; blocking"),
        "hours = (steps x t + exposed communication) / 3600; rho = one collective's time / t",
    ]
    return lines


def format_rate(bits_per_s: float) -> str:
    """10000000000.0 -> '10 Gbit/s', 5e7 -> '50 Mbit/s'."""
    if bits_per_s >= 1e9:
        return f"{bits_per_s / 1e9:g} Gbit/s"
    if bits_per_s >= 1e6:
        return f"{bits_per_s / 1e6:g} Mbit/s"
    return f"{bits_per_s / 1e3:g} kbit/s"


def to_dict(inputs: CostInputs, methods: list[MethodProjection]) -> dict:
    """JSON-ready inputs, assumptions and per-method results."""
    return {
        "inputs": asdict(inputs),
        "wire_bytes_per_round": wire_bytes(inputs),
        "link_bytes_per_round": round_link_bytes(inputs),
        "round_seconds": round_seconds(inputs),
        "dp_step_comm_seconds": dp_step_comm_seconds(inputs),
        "assumptions": assumptions(inputs),
        "methods": [m.to_dict() for m in methods],
    }


def format_projection(projection: dict) -> str:
    """The table of a ``to_dict`` result."""
    methods = projection["methods"]
    by_name = {m["method"]: m for m in methods}
    ceiling, dp = by_name["compute_only"]["hours"], by_name["data_parallel"]["hours"]
    lines = ["projected wall time (cost model, not a measurement):"]
    lines += [f"  {line}" for line in projection["assumptions"]]
    if projection.get("averaged"):
        lines.append(f"  a round averages: {', '.join(projection['averaged'])}; "
                     f"S = {projection.get('ranks_per_replica', '?')} ranks per replica share the node's link")
    width = max(len(m["label"]) for m in methods)
    lines += ["", f"  {'method':<{width}} {'collectives':>11} {'blocking':>9} {'s each':>8} {'rho':>7} "
                  f"{'comm h':>8} {'hours':>8} {'vs DP':>6} {'x ceiling':>9}"]
    for m in methods:
        each = f"{m['seconds_per_collective']:.3f}" if m["collectives"] else "-"
        rho = f"{m['rho']:.3f}" if m["collectives"] else "-"
        lines.append(
            f"  {m['label']:<{width}} {m['collectives']:>11,} {m['blocking']:>9,} {each:>8} {rho:>7} "
            f"{m['exposed_comm_seconds'] / 3600:>8.2f} {m['hours']:>8.2f} {dp / m['hours']:>5.2f}x {ceiling / m['hours']:>9.2f}"
        )
    lines.append("  (vs DP: data parallel's hours / the method's; x ceiling: compute-only hours / the method's)")
    return "\n".join(lines)

"""The "qsr" section of a DeepSpeed JSON file, as a typed, validated dataclass, and the one
SyncSettings (how rounds run) every engine builds from it or from keyword arguments.

Every bad input raises one QSRConfigError that names the key and the file (or "keyword
arguments"), before any process-group traffic. Imports nothing of the sync core.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from typing import Any

from .schedule import RULES, ScheduleError, SyncSchedule

AVERAGE_CHOICES = ("params", "buffers", "exp_avg", "exp_avg_sq", "momentum")
KERNEL_CHOICES = ("auto", "triton", "cpp", "torch")
COMPRESS_CHOICES = ("bf16", "int8")
COMPRESS_ROUTES = ("gather", "owner")
OUTER_OPTIMIZERS = ("sgd", "nesterov")


class QSRConfigError(ValueError):
    """A "qsr" config section that cannot be used, with the key and file named."""


@dataclass(frozen=True, kw_only=True)
class OuterSettings:
    """The outer optimizer on the pseudo-gradient theta - mean_r(x_r) at every boundary (qsr_ds/sync/outer.py)."""

    optimizer: str = "nesterov"
    """sgd | nesterov: torch.optim.SGD's step (dampening 0), with Nesterov momentum or without."""
    lr: float = 0.7
    """Outer learning rate; sgd with lr 1 and momentum 0 is plain averaging, bit for bit."""
    momentum: float = 0.9
    """Outer momentum in [0, 1); nesterov needs it > 0."""
    offload: bool = False
    """Keep theta and the momentum buffer in (pinned) host memory instead of beside the shards."""


@dataclass(frozen=True, kw_only=True)
class SyncSettings:
    """How rounds are run; everything but the schedule and the topology. Build with ``from_config``."""

    average: tuple[str, ...] = ("params",)
    """What replicas average: params, plus buffers, exp_avg, exp_avg_sq, momentum."""
    bucket_mb: float = 64.0
    """Size of one communication bucket in MiB of fp32."""
    kernel: str = "auto"
    """Pack/unpack back-end: auto | triton | cpp | torch."""
    check_finite: bool = True
    """Refuse to average (raise on every rank, nothing written) when a replica holds NaN/Inf."""
    overlap_steps: int = 0
    """tau: a round's all-reduce runs behind the next tau steps (0 = blocking rounds)."""
    compress: str | None = None
    """None (exact fp32 rounds), "bf16" or "int8": send deltas from the last average, error-fed back."""
    compress_route: str = "gather"
    """Compressed rows' route over the replica group: "gather" or "owner" (qsr_ds/sync/compress.py)."""
    outer: OuterSettings | None = None
    """The outer optimizer applied to the parameters at each boundary (None: plain averaging)."""

    @classmethod
    def from_config(cls, config: QSRConfig | None = None, **keywords) -> SyncSettings:
        """A QSRConfig's round keys (the defaults without one), each replaced by a keyword that is not None.

        Keywords are checked as the "qsr" section's keys are (one QSRConfigError naming the key);
        ``average`` always includes "params".
        """
        given = {key: value for key, value in keywords.items() if value is not None}
        for key in given:
            if key not in ROUND_KEYS:
                raise _fail("keyword arguments", key, f"not a round setting; expected one of {', '.join(ROUND_KEYS)}")
        if "average" in given:
            given["average"] = list(dict.fromkeys(("params", *given["average"])))
        _check_types(given, "keyword arguments")
        _check_values(given, "keyword arguments")
        if "outer" in given:
            given["outer"] = outer_settings(given["outer"], "keyword arguments")
        values = {key: getattr(config, key) for key in ROUND_KEYS} if config is not None else {}
        values.update(given)
        values["average"] = tuple(values.get("average", cls.average))
        settings = cls(**values)
        if settings.outer is not None and (settings.overlap_steps or settings.compress):
            source = config.source if config is not None else "keyword arguments"
            raise _fail(source, "outer", "the outer optimizer does not run with overlapped (overlap_steps) or "
                                         "compressed (compress) rounds yet: use blocking exact rounds with it")
        return settings


@dataclass(frozen=True, kw_only=True)
class QSRConfig:
    """Settings of local training with the Quadratic Synchronization Rule."""

    rule: str = "qsr"
    """qsr | constant | linear | cubic | post_local."""
    h_base: int = SyncSchedule.h_base
    """Smallest number of local steps per round (the constant rule's H)."""
    alpha: float = 0.0
    """QSR growth coefficient: H = floor((alpha / lr) ** gamma); 0 means constant H."""
    gamma: float | None = None
    """Exponent; None takes the rule's own (qsr 2, linear 1, cubic 3)."""
    warmup_steps: int = 0
    """H = h_base while fewer steps than this are completed."""
    total_steps: int = 1
    """Optimizer steps in the whole run; training ends on an average at this step."""
    switch_step: int | None = None
    """post_local only: H = 1 before this step, h_base after."""
    ranks_per_replica: int = 1
    """S, ranks inside one replica (ZeRO / FSDP shard over them); R = world_size / S."""
    average: tuple[str, ...] = ("params",)
    """What replicas average at a boundary: params, plus buffers, exp_avg, exp_avg_sq, momentum."""
    bucket_mb: float = 64.0
    """Size of one communication bucket in MiB of fp32."""
    kernel: str = "auto"
    """Pack/unpack back-end: auto | triton | cpp | torch."""
    check_finite: bool = True
    """Refuse to average (raise, nothing written) when any replica holds NaN or Inf."""
    timeout_s: float = 600.0
    """Timeout of the replica group's collectives; a dead replica fails instead of hanging."""
    overlap_steps: int = 0
    """tau: a round's all-reduce runs behind the next tau steps (0 = blocking rounds, bit for bit)."""
    compress: str | None = None
    """Send rounds as bf16 or int8 deltas from the last average, with error feedback (None = exact fp32)."""
    compress_route: str = "gather"
    """How compressed rows cross the replicas: "gather" (all-gather every row; (R - 1) rows on each
    rank's link, best at small R) or "owner" (each replica sums and re-quantizes one segment, then
    all-gathers the result; about 2 (R - 1) / R rows, like an fp32 ring, for large R)."""
    outer: OuterSettings | None = None
    """{"optimizer": "sgd" | "nesterov", "lr", "momentum", "offload"}: an outer step on the pseudo-gradient
    theta - mean_r(x_r) at every boundary (DiLoCo's, e.g. nesterov lr 0.7 momentum 0.9); None = plain averaging."""
    source: str = field(default="<dict>", compare=False)
    """Where the section came from, for error messages (not a config key)."""

    def schedule(self) -> SyncSchedule:
        return SyncSchedule(
            rule=self.rule,
            h_base=self.h_base,
            alpha=self.alpha,
            gamma=self.gamma,
            warmup_steps=self.warmup_steps,
            total_steps=self.total_steps,
            switch_step=self.switch_step,
        )

    def settings(self, **keywords) -> SyncSettings:
        """How the sync core runs rounds (everything but the schedule and the topology); keywords that
        are not None replace this section's values."""
        return SyncSettings.from_config(self, **keywords)

    def num_replicas(self, world_size: int) -> int:
        """R for a world size; a world size that S does not divide is an error."""
        if world_size % self.ranks_per_replica:
            raise QSRConfigError(
                f"{self.source}: qsr.ranks_per_replica={self.ranks_per_replica} does not divide "
                f"the world size {world_size}"
            )
        return world_size // self.ranks_per_replica

    @property
    def averages(self) -> frozenset[str]:
        return frozenset(self.average)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "source"}
        out["average"] = list(self.average)
        out["outer"] = dataclasses.asdict(self.outer) if self.outer is not None else None
        return out


_KEYS = tuple(f.name for f in dataclasses.fields(QSRConfig) if f.name != "source")
ROUND_KEYS = tuple(f.name for f in dataclasses.fields(SyncSettings))
_INT_KEYS = {"h_base", "warmup_steps", "total_steps", "ranks_per_replica", "overlap_steps"}
_NUMBER_KEYS = {"alpha", "bucket_mb", "timeout_s"}
_OPTIONAL_INT_KEYS = {"switch_step"}
_OPTIONAL_NUMBER_KEYS = {"gamma"}


def _fail(source: str, key: str, message: str) -> QSRConfigError:
    return QSRConfigError(f"{source}: qsr.{key}: {message}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_types(section: dict, source: str) -> None:
    for key, value in section.items():
        if key in _INT_KEYS and not _is_int(value):
            raise _fail(source, key, f"expected an integer, got {type(value).__name__} {value!r}")
        if key in _OPTIONAL_INT_KEYS and value is not None and not _is_int(value):
            raise _fail(source, key, f"expected an integer or null, got {type(value).__name__} {value!r}")
        if key in _NUMBER_KEYS and not _is_number(value):
            raise _fail(source, key, f"expected a number, got {type(value).__name__} {value!r}")
        if key in _OPTIONAL_NUMBER_KEYS and value is not None and not _is_number(value):
            raise _fail(source, key, f"expected a number or null, got {type(value).__name__} {value!r}")
        if key in ("rule", "kernel", "compress_route") and not isinstance(value, str):
            raise _fail(source, key, f"expected a string, got {type(value).__name__} {value!r}")
        if key == "compress" and value is not None and not isinstance(value, str):
            raise _fail(source, key, f"expected \"bf16\", \"int8\" or null, got {type(value).__name__} {value!r}")
        if key == "check_finite" and not isinstance(value, bool):
            raise _fail(source, key, f"expected true or false, got {value!r}")
        if key == "average" and not (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        ):
            raise _fail(source, key, f"expected a list of strings, got {value!r}")


def outer_settings(value: Any, source: str) -> OuterSettings | None:
    """The "outer" key checked (one QSRConfigError naming what is wrong) as OuterSettings; None stays None."""
    if value is None or isinstance(value, OuterSettings):
        return value
    if not isinstance(value, dict):
        raise _fail(source, "outer", f"expected an object like {{\"optimizer\": \"nesterov\", \"lr\": 0.7, "
                                     f"\"momentum\": 0.9}} or null, got {type(value).__name__} {value!r}")
    known = [f.name for f in dataclasses.fields(OuterSettings)]
    for key in value:
        if key not in known:
            raise _fail(source, f"outer.{key}", f"unknown key; known keys: {', '.join(known)}")
    settings = OuterSettings(**value)
    if settings.optimizer not in OUTER_OPTIMIZERS:
        raise _fail(source, "outer.optimizer", f"unknown optimizer {settings.optimizer!r}; expected sgd or nesterov")
    if not _is_number(settings.lr) or not 0 < settings.lr < float("inf"):
        raise _fail(source, "outer.lr", f"must be a finite number > 0, got {settings.lr!r}")
    if not _is_number(settings.momentum) or not 0 <= settings.momentum < 1:
        raise _fail(source, "outer.momentum", f"must be a number in [0, 1), got {settings.momentum!r}")
    if settings.optimizer == "nesterov" and settings.momentum == 0:
        raise _fail(source, "outer.momentum", "nesterov needs a momentum > 0 (use \"sgd\" for none)")
    if not isinstance(settings.offload, bool):
        raise _fail(source, "outer.offload", f"expected true or false, got {settings.offload!r}")
    return dataclasses.replace(settings, lr=float(settings.lr), momentum=float(settings.momentum))


def _check_values(section: dict, source: str) -> None:
    checks = {
        "h_base": (lambda v: v >= 1, "must be >= 1"),
        "alpha": (lambda v: v >= 0 and v == v and v != float("inf"), "must be a finite number >= 0"),
        "gamma": (lambda v: v is None or (v > 0 and v != float("inf")), "must be > 0"),
        "warmup_steps": (lambda v: v >= 0, "must be >= 0"),
        "total_steps": (lambda v: v >= 1, "must be >= 1"),
        "switch_step": (lambda v: v is None or v >= 0, "must be >= 0"),
        "ranks_per_replica": (lambda v: v >= 1, "must be >= 1"),
        "overlap_steps": (lambda v: 0 <= v <= 10**6, "must be between 0 and 1000000"),
        # bounded above: an infinite or astronomically large value passed "> 0" and then overflowed
        # (int(bucket_mb * 2**20), timedelta(seconds=timeout_s)) once training had started
        "bucket_mb": (lambda v: 0 < v <= 2**20, "must be > 0 and at most 1048576 (1 TiB)"),
        "timeout_s": (lambda v: 1e-3 <= v <= 1e9, "must be between 0.001 and 1e9 seconds"),
    }
    for key, (ok, why) in checks.items():
        if key in section and not ok(section[key]):
            raise _fail(source, key, f"{why}, got {section[key]!r}")
    if "rule" in section and section["rule"] not in RULES:
        raise _fail(source, "rule", f"unknown rule {section['rule']!r}; expected one of {', '.join(RULES)}")
    if "kernel" in section and section["kernel"] not in KERNEL_CHOICES:
        raise _fail(source, "kernel", f"unknown kernel {section['kernel']!r}; expected one of {', '.join(KERNEL_CHOICES)}")
    if section.get("compress") is not None and section["compress"] not in COMPRESS_CHOICES:
        raise _fail(source, "compress", f"unknown compression {section['compress']!r}; expected bf16, int8 or null")
    if "compress_route" in section and section["compress_route"] not in COMPRESS_ROUTES:
        raise _fail(source, "compress_route",
                    f"unknown route {section['compress_route']!r}; expected one of {', '.join(COMPRESS_ROUTES)}")
    for item in section.get("average", []):
        if item not in AVERAGE_CHOICES:
            raise _fail(source, "average", f"unknown entry {item!r}; expected some of {', '.join(AVERAGE_CHOICES)}")
    if "average" in section and "params" not in section["average"]:
        raise _fail(source, "average", "must include 'params' (parameters are always averaged)")
    if section.get("rule") == "post_local" and section.get("switch_step") is None:
        raise _fail(source, "switch_step", "the post_local rule needs switch_step (the step where H becomes h_base)")


def from_dict(section: Any, source: str = "<dict>") -> QSRConfig:
    """Validate a "qsr" section (the dict under the "qsr" key)."""
    if not isinstance(section, dict):
        raise QSRConfigError(f"{source}: the \"qsr\" section must be a JSON object, got {type(section).__name__}")
    for key in section:
        if key not in _KEYS:
            close = difflib.get_close_matches(str(key), _KEYS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(_KEYS)}"
            raise _fail(source, key, f"unknown key{hint}")
    _check_types(section, source)
    _check_values(section, source)
    values = dict(section)
    if "average" in values:
        values["average"] = tuple(dict.fromkeys(values["average"]))
    for key in ("alpha", "bucket_mb", "timeout_s"):
        if key in values:
            values[key] = float(values[key])
    if values.get("gamma") is not None:
        values["gamma"] = float(values["gamma"])
    if "outer" in values:
        values["outer"] = outer_settings(values["outer"], source)
    config = QSRConfig(source=source, **values)
    try:
        config.schedule()
    except ScheduleError as err:
        raise QSRConfigError(f"{source}: qsr: {err}") from None
    config.settings()  # the keys that only fail together
    return config


def read_json(path: str | os.PathLike) -> dict:
    """A JSON file as a dict, with a QSRConfigError naming the file, line and column."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise QSRConfigError(f"{path}: config file not found") from None
    except OSError as err:
        raise QSRConfigError(f"{path}: cannot read config file: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise QSRConfigError(f"{path}: not UTF-8 text (byte {err.start}): is this a JSON file?") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise QSRConfigError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except RecursionError:
        raise QSRConfigError(f"{path}: JSON nested too deeply to read") from None
    if not isinstance(data, dict):
        raise QSRConfigError(f"{path}: a DeepSpeed config must be a JSON object, got {type(data).__name__}")
    return data


def load(config: str | os.PathLike | dict, *, required: bool = True) -> QSRConfig | None:
    """The "qsr" section of a DeepSpeed config given as a path or an already-loaded dict.

    Returns None when the section is absent and ``required`` is False.
    """
    if isinstance(config, dict):
        data, source = config, "<config dict>"
    else:
        data, source = read_json(config), os.fspath(config)
    if "qsr" not in data:
        if required:
            raise QSRConfigError(f"{source}: no \"qsr\" section; add one (see the README's config reference)")
        return None
    return from_dict(data["qsr"], source)

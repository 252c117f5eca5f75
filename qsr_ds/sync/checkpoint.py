"""QSR state in and out of checkpoints, with checks that fail the same way on every rank.

An engine checkpoint of R replicas x S ranks is laid out as

    save_dir/latest                 the last tag (one line)
    save_dir/<tag>.qsr.json         manifest: R, S, step, the schedule tracker, the files written
    save_dir/replica<r>/<tag>/...   replica r's own engine checkpoint (DeepSpeed's files, with
                                    {"qsr": state_dict(...)} in its client state)
    save_dir/replica<r>/latest

Replicas get their own directories because between boundaries their parameters (and, unless
averaged, their optimizer state) differ, while the engine names its files by the rank inside a
replica. That is the "per_replica" layout. Where every replica holds the same state (a save
right after a boundary with everything the engine saves averaged) one replica's files are the
whole checkpoint: the "one_replica" layout writes only replica0/ and every replica resumes from
it. The manifest's "layout" says which was written (absent in older manifests: per_replica).
The manifest lets every rank check, before the engine reads anything, that the checkpoint
was written with this run's R and S and that no file is missing or truncated; errors are
then agreed over all ranks (``agree``) so every rank raises the same message instead of a
few ranks hanging in a collective the others never reach. A shared filesystem is assumed.
No DeepSpeed import here: FSDP and plain-PyTorch integrations can use the same format.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import torch

from ..schedule import ScheduleError
from .layout import module_signature

FORMAT = 1
MANIFEST_SUFFIX = ".qsr.json"
PER_REPLICA = "per_replica"
ONE_REPLICA = "one_replica"
LAYOUTS = (PER_REPLICA, ONE_REPLICA)


class QSRCheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed by this run: other R/S, missing, truncated or corrupt."""


def replica_dir(save_dir: str | os.PathLike, replica_index: int) -> str:
    return os.path.join(os.fspath(save_dir), f"replica{replica_index}")


def written_replicas(layout: str, num_replicas: int) -> list[int]:
    """The replica directories a save of this layout writes."""
    return [0] if layout == ONE_REPLICA else list(range(num_replicas))


def source_replica(layout: str, replica_index: int) -> int:
    """Whose files a rank of replica ``replica_index`` writes / reads in this layout."""
    return 0 if layout == ONE_REPLICA else replica_index


def manifest_layout(manifest: Mapping) -> str:
    return manifest.get("layout", PER_REPLICA)


def manifest_path(save_dir: str | os.PathLike, tag: str) -> str:
    return os.path.join(os.fspath(save_dir), f"{tag}{MANIFEST_SUFFIX}")


def tensor_file(directory: str | os.PathLike, topology) -> str:
    """Where a rank keeps its own QSR tensors (a round in flight, compression anchors and residuals), for
    every engine: ``qsr_tensors.shard<k>.pt`` in its replica's own directory of the checkpoint (DeepSpeed:
    save_dir/replica<r>/<tag>/, FSDP2: path/replica<r>/)."""
    return os.path.join(os.fspath(directory), f"qsr_tensors.shard{topology.shard_rank}.pt")


def write_tensor_state(directory: str | os.PathLike, topology, state: Mapping) -> None:
    """Write SyncCore.qsr_tensor_state() to this rank's tensor file (nothing when it is empty)."""
    if state:
        os.makedirs(os.fspath(directory), exist_ok=True)
        torch.save(dict(state), tensor_file(directory, topology))


def read_tensor_state(directory: str | os.PathLike, topology) -> dict:
    """This rank's tensor file as written by ``write_tensor_state``; {} where none was written."""
    path = tensor_file(directory, topology)
    return torch.load(path, weights_only=True) if os.path.isfile(path) else {}


def state_dict(tracker, totals, topology) -> dict:
    """The QSR state a rank saves (plain Python values only)."""
    return {
        "format": FORMAT,
        "num_replicas": topology.num_replicas,
        "ranks_per_replica": topology.ranks_per_replica,
        "tracker": tracker.state_dict(),
        "totals": totals.state_dict(),
    }


def _layout(num_replicas: int, ranks_per_replica: int) -> str:
    return f"{num_replicas} replica(s) x {ranks_per_replica} rank(s) (R={num_replicas}, S={ranks_per_replica})"


def check_layout(saved: Mapping, topology, source: str) -> None:
    """Same R and S as this run, or a QSRCheckpointError that says which differ."""
    r, s = saved.get("num_replicas"), saved.get("ranks_per_replica")
    if (r, s) != (topology.num_replicas, topology.ranks_per_replica):
        raise QSRCheckpointError(
            f"{source}: checkpoint was written by {_layout(r, s)}, but this run has "
            f"{_layout(topology.num_replicas, topology.ranks_per_replica)}; resume with the same "
            "qsr.ranks_per_replica and world size (the replicas' shards and optimizer states are not "
            "re-partitioned across layouts)"
        )


def write_latest(directory: str, tag: str) -> None:
    tmp = os.path.join(directory, f".latest.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(tag)
    os.replace(tmp, os.path.join(directory, "latest"))


def read_latest(save_dir: str | os.PathLike) -> str | None:
    """The tag in save_dir/latest, or None when there is no checkpoint there."""
    path = os.path.join(os.fspath(save_dir), "latest")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    if not tag:
        raise QSRCheckpointError(f"{path}: empty 'latest' file (an interrupted save?); pass the tag explicitly")
    return tag


def list_files(save_dir: str | os.PathLike, tag: str, num_replicas: int, layout: str = PER_REPLICA) -> dict[str, int]:
    """Relative path -> size of every file of ``tag`` in the replica directories the layout writes."""
    out = {}
    for r in written_replicas(layout, num_replicas):
        root = os.path.join(replica_dir(save_dir, r), tag)
        for dirpath, _, files in os.walk(root):
            for name in files:
                path = os.path.join(dirpath, name)
                out[os.path.relpath(path, os.fspath(save_dir))] = os.path.getsize(path)
    return dict(sorted(out.items()))


def model_layout(module) -> list[list]:
    """[name, shape] of every parameter in registration order (full shapes under ZeRO-3), for the manifest."""
    return [[name.removeprefix("module:"), list(shape)] for name, shape, _ in module_signature(module)]


def check_model(manifest: Mapping, module, source: str) -> None:
    """The checkpoint holds this model (names, shapes, order), checked before the engine reads a byte."""
    saved = manifest.get("model")
    if saved is None:  # written before manifests recorded the model
        return
    mine = model_layout(module)
    if saved == mine:
        return
    saved_shapes, my_shapes = {n: tuple(s) for n, s in saved}, {n: tuple(s) for n, s in mine}
    problems = []
    missing = [n for n in my_shapes if n not in saved_shapes]
    unknown = [n for n in saved_shapes if n not in my_shapes]
    resized = [f"{n} {saved_shapes[n]} there, {my_shapes[n]} here" for n in my_shapes
               if n in saved_shapes and saved_shapes[n] != my_shapes[n]]
    for label, names in (("not in the checkpoint", missing), ("only in the checkpoint", unknown),
                         ("other shape", resized)):
        if names:
            more = f" (+{len(names) - 3} more)" if len(names) > 3 else ""
            problems.append(f"{label}: {', '.join(names[:3])}{more}")
    if not problems:
        problems.append("the same parameters registered in another order (ZeRO's flat shards would not line up)")
    raise QSRCheckpointError(
        f"{source}: checkpoint holds a different model than this run ({len(saved)} parameters there, {len(mine)} "
        f"here; {'; '.join(problems)}); nothing was loaded"
    )


def write_manifest(save_dir: str | os.PathLike, tag: str, state: Mapping, *, step: int, model: list | None = None,
                   layout: str = PER_REPLICA) -> str:
    """Rank 0, after every rank has written its files; ``model``: ``model_layout(module)``, checked at load."""
    if layout not in LAYOUTS:
        raise ValueError(f"checkpoint layout {layout!r}: expected one of {LAYOUTS}")
    manifest = {
        "format": FORMAT,
        "tag": tag,
        "step": step,
        "num_replicas": state["num_replicas"],
        "ranks_per_replica": state["ranks_per_replica"],
        "tracker": state["tracker"],
        "layout": layout,
        "files": list_files(save_dir, tag, state["num_replicas"], layout),
    }
    if model is not None:
        manifest["model"] = model
    path = manifest_path(save_dir, tag)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, path)
    return path


def read_manifest(save_dir: str | os.PathLike, tag: str) -> dict:
    path = manifest_path(save_dir, tag)
    if not os.path.isfile(path):
        if os.path.isdir(os.path.join(os.fspath(save_dir), tag)):
            raise QSRCheckpointError(
                f"{os.path.join(os.fspath(save_dir), tag)} looks like a checkpoint written without qsr-ds "
                f"(no {os.path.basename(path)}); it cannot be resumed as {tag!r} with replicas"
            )
        raise QSRCheckpointError(f"{path}: no QSR checkpoint {tag!r} in {os.fspath(save_dir)}")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise QSRCheckpointError(f"{path}: corrupt or truncated QSR manifest ({err})") from None
    need = {"format", "tag", "step", "num_replicas", "ranks_per_replica", "tracker", "files"}
    if not isinstance(manifest, dict) or need - set(manifest):
        missing = sorted(need - set(manifest)) if isinstance(manifest, dict) else sorted(need)
        raise QSRCheckpointError(f"{path}: corrupt QSR manifest, missing {missing}")
    if manifest["format"] != FORMAT:
        raise QSRCheckpointError(f"{path}: QSR checkpoint format {manifest['format']!r}, this qsr-ds reads {FORMAT}")
    if manifest["tag"] != tag:
        raise QSRCheckpointError(f"{path}: manifest is for tag {manifest['tag']!r}, not {tag!r}")
    if manifest_layout(manifest) not in LAYOUTS:
        raise QSRCheckpointError(f"{path}: unknown checkpoint layout {manifest['layout']!r} (expected one of {LAYOUTS})")
    return manifest


def check_files(save_dir: str | os.PathLike, manifest: Mapping, replica_index: int) -> None:
    """Every file this rank's replica reads (its own, or replica 0's in the one_replica layout) is there, whole."""
    source = source_replica(manifest_layout(manifest), replica_index)
    prefix = os.path.basename(replica_dir(save_dir, source)) + os.sep
    mine = {p: n for p, n in manifest["files"].items() if p.startswith(prefix)}
    if not mine:
        raise QSRCheckpointError(
            f"{manifest_path(save_dir, manifest['tag'])}: lists no files for replica {source}"
        )
    for rel, size in mine.items():
        path = os.path.join(os.fspath(save_dir), rel)
        if not os.path.isfile(path):
            raise QSRCheckpointError(f"{path}: missing (listed in the QSR manifest of {manifest['tag']!r})")
        actual = os.path.getsize(path)
        if actual != size:
            raise QSRCheckpointError(
                f"{path}: {actual} bytes, but {size} were written: truncated or overwritten checkpoint"
            )


def agree(error: BaseException | None, group=None) -> None:
    """Raise on every rank if any rank failed a check (one small all-gather)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        if error is not None:
            raise error
        return
    messages: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(messages, None if error is None else str(error), group=group)
    if error is not None:
        raise error
    for rank, message in enumerate(messages):
        if message is not None:
            raise QSRCheckpointError(f"rank {rank} cannot load the checkpoint: {message}")


def check_schedule(tracker, manifest: Mapping, source: str) -> None:
    """The checkpoint continues this run's schedule; loads the tracker from the manifest."""
    try:
        tracker.load_state_dict(manifest["tracker"])
    except (ScheduleError, KeyError, TypeError, ValueError) as err:
        raise QSRCheckpointError(f"{source}: {err}") from None


def load_state(tracker, totals, saved: Any, manifest: Mapping, topology, source: str) -> None:
    """Check a rank's client state against the manifest, then restore tracker and totals."""
    if not isinstance(saved, Mapping):
        raise QSRCheckpointError(f"{source}: no QSR state in the checkpoint's client state (written without qsr-ds?)")
    if saved.get("format") != FORMAT or not {"tracker", "totals"} <= set(saved):
        raise QSRCheckpointError(f"{source}: corrupt QSR client state (keys {sorted(saved)})")
    check_layout(saved, topology, source)
    if saved["tracker"] != manifest["tracker"]:
        raise QSRCheckpointError(
            f"{source}: its QSR state (step {saved['tracker'].get('completed_steps')}) does not match the "
            f"manifest (step {manifest['tracker'].get('completed_steps')}): files from different saves mixed"
        )
    check_schedule(tracker, saved, source)
    try:
        totals.load_state_dict(saved["totals"])
    except (AttributeError, TypeError, ValueError) as err:
        raise QSRCheckpointError(f"{source}: corrupt averager totals in the QSR client state ({err})") from None

"""The (replicate, shard) mesh FSDP2 replicas live on, sharding a model over it, and checks of both."""
from __future__ import annotations

import weakref
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from ..sync.selection import averaged_tensors
from ..topology import Topology, TopologyError, check_divides


MESH_DIMS = ("replicate", "shard")


class FSDPSetupError(ValueError):
    """A model, mesh or optimizer that QSR on FSDP2 cannot work with; the message says why."""


_MESH_TOPOLOGIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Mesh built by init_mesh -> the Topology whose process groups (with the QSR timeout) it uses."""


def init_mesh(ranks_per_replica: int, *, device_type: str | None = None, timeout_s: float | None = 600.0) -> DeviceMesh:
    """The 2-D ("replicate", "shard") mesh of R x S ranks, R = world_size / S.

    Replica r is ranks [r*S, (r+1)*S) (the same layout as Topology.create). Every rank
    must call it. ``device_type`` defaults to "cuda" when CUDA is available, else "cpu".
    The mesh is built on Topology.create's groups, so FSDP's collectives inside a replica and
    QSR's rounds share them and their ``timeout_s`` (a dead rank fails them instead of
    hanging; under NCCL the watchdog ends the job, see docs/reliability.md).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise TopologyError("torch.distributed is not initialized: call dist.init_process_group (or use torchrun) first")
    world = dist.get_world_size()
    check_divides(world, ranks_per_replica)
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    topology = Topology.create(ranks_per_replica, timeout_s=timeout_s)
    layout = torch.arange(world).view(world // ranks_per_replica, ranks_per_replica)
    mesh = DeviceMesh.from_group([topology.replica_group, topology.shard_group], device_type, mesh=layout,
                                 mesh_dim_names=MESH_DIMS)
    _MESH_TOPOLOGIES[mesh] = topology
    return mesh


def check_mesh(mesh: DeviceMesh) -> tuple[int, int]:
    """(R, S) of a user's mesh; raises FSDPSetupError unless it is a world-covering R x S mesh."""
    if not isinstance(mesh, DeviceMesh):
        raise FSDPSetupError(f"mesh must be a torch DeviceMesh, got {type(mesh).__name__}")
    if mesh.ndim != 2 or tuple(mesh.mesh_dim_names or ()) != MESH_DIMS:
        raise FSDPSetupError(
            f"QSR needs a 2-D mesh with dims {MESH_DIMS} (build it with init_mesh(S)); got dims "
            f"{mesh.mesh_dim_names} of shape {tuple(mesh.mesh.shape)}"
        )
    world = dist.get_world_size()
    num_replicas, per_replica = (int(n) for n in mesh.mesh.shape)
    if num_replicas * per_replica != world:
        raise FSDPSetupError(
            f"mesh shape {num_replicas} x {per_replica} (replicate x shard) covers {num_replicas * per_replica} ranks "
            f"but the world has {world}"
        )
    if mesh.mesh.flatten().tolist() != list(range(world)):
        raise FSDPSetupError(
            f"mesh {mesh.mesh.tolist()} does not put replica r on ranks [r*S, (r+1)*S); build it with init_mesh(S)"
        )
    return num_replicas, per_replica


def topology_of(mesh: DeviceMesh, *, timeout_s: float | None = 600.0) -> Topology:
    """The QSR Topology of a mesh: init_mesh's own; for a mesh built otherwise (whose groups may
    have no timeout), new replica and shard groups of the same layout with ``timeout_s``."""
    _, per_replica = check_mesh(mesh)
    known = _MESH_TOPOLOGIES.get(mesh)
    return known if known is not None else Topology.create(per_replica, timeout_s=timeout_s)


def default_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules ``shard_model`` wraps by default: each child that holds parameters.

    Containers without a forward of their own (ModuleList, ModuleDict) are entered, so a
    GPT's transformer blocks are wrapped one by one. A child sharing a parameter with
    another (tied embeddings) is left to the root group.
    """
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
                visit(child)
            elif any(True for _ in child.parameters()):
                found.append(child)

    visit(model)
    owners: dict[int, int] = {}
    for block in found:
        for p in block.parameters():
            owners[id(p)] = owners.get(id(p), 0) + 1
    return [b for b in found if all(owners[id(p)] == 1 for p in b.parameters())]


def shard_model(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    blocks: Iterable[nn.Module] | Callable[[nn.Module], bool] | None = None,
    **fully_shard_kwargs,
) -> nn.Module:
    """``fully_shard`` each block and then the root over ``mesh["shard"]``; returns the model.

    ``blocks``: the modules to wrap (in that order), or a predicate over
    ``model.modules()``; None takes ``default_blocks(model)``. Extra keyword arguments
    (mp_policy, reshard_after_forward, ...) go to every ``fully_shard`` call.
    """
    check_mesh(mesh)
    if isinstance(model, FSDPModule):
        raise FSDPSetupError("the model is already wrapped by fully_shard; pass it to FSDPQSR directly")
    if blocks is None:
        chosen = default_blocks(model)
    elif callable(blocks) and not isinstance(blocks, nn.Module):
        chosen = [m for m in model.modules() if m is not model and blocks(m)]
    else:
        chosen = list(blocks)
    for block in chosen:
        fully_shard(block, mesh=mesh["shard"], **fully_shard_kwargs)
    fully_shard(model, mesh=mesh["shard"], **fully_shard_kwargs)
    return model


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def local_tensors(model: nn.Module, optimizer: torch.optim.Optimizer | None, average: Iterable[str]) -> list[tuple[str, torch.Tensor]]:
    """What a boundary averages on this rank: local shards, named, in a replica-independent order."""
    with torch.no_grad():
        return averaged_tensors(model, optimizer, average, local=_local)


def check_sharded(model: nn.Module, mesh: DeviceMesh) -> None:
    """Raise FSDPSetupError unless every parameter is a shard over this rank's mesh["shard"]."""
    if not isinstance(model, FSDPModule):
        raise FSDPSetupError(
            f"{type(model).__name__} is not wrapped by FSDP2: call qsr_ds.fsdp.shard_model(model, mesh) "
            "(or fully_shard(model, mesh=mesh['shard'])) before attaching QSR"
        )
    want = mesh["shard"].mesh.tolist()
    for name, p in model.named_parameters():
        if not isinstance(p, DTensor):
            raise FSDPSetupError(f"parameter {name} is not sharded by FSDP2 (a plain tensor); wrap the root with fully_shard")
        if p.device_mesh.mesh.tolist() != want:
            raise FSDPSetupError(
                f"parameter {name} is sharded over ranks {p.device_mesh.mesh.tolist()} but QSR's shard dim is {want}: "
                "apply fully_shard with mesh=mesh['shard'] (a replicate dim in FSDP's mesh, HSDP, would all-reduce "
                "over replicas every step)"
            )

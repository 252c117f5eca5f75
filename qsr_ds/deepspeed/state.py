"""Which tensors a DeepSpeed engine averages at a QSR boundary, per ZeRO stage.

Every stage averages the fp32 copy of the weights this rank owns (its shard), never a
gathered parameter, and afterwards refreshes the low-precision model copy the way
DeepSpeed does after an optimizer step (inside the replica only):

  ZeRO 0, fp32         module parameters (re-pointed once into one flat fp32 buffer)
  ZeRO 0, bf16/fp16    FP16_UnfusedOptimizer.fp32_groups (per tensor; the bf16 params are
                       refreshed in the same unpack pass) or FP16_Optimizer.fp32_groups_flat
                       (flat, in place; then copied into fp16_groups_flat)
  ZeRO 1 + bf16 with fp32 gradient accumulation
                       BF16_Optimizer.fp32_groups_flat_partition, then update_lp_params()
  ZeRO 1, 2            DeepSpeedZeroOptimizer.single_partition_of_fp32_groups (flat, in place),
                       then update_lp_params(): copy into the bit16 partition + all-gather
                       over the shard group
  ZeRO 3               DeepSpeedZeroOptimizer_Stage3.fp32_partitioned_groups_flat (flat, in
                       place), then as in its step(): _partition_all_parameters(),
                       _reassign_or_swap_out_partitioned_parameters(i) per sub-group (refreshes
                       the ds_tensor shards) and _post_step() (re-gathers persistent parameters
                       inside the replica, invalidates hpZ secondary shards)

Optimizer state ("exp_avg", "exp_avg_sq", "momentum" in qsr.average) is looked up in the
torch optimizer DeepSpeed wraps (engine.basic_optimizer), keyed by those fp32 tensors; under
ZeRO 1-3 it is flat and partitioned like them, so it is all-reduced in place too.
The DeepSpeed internals used here are listed at the top of qsr_ds/deepspeed/hook.py.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..sync.layout import flatten_into_buffer, module_signature
from ..sync.core import SyncPlan
from ..sync.selection import optimizer_state_tensors


class UnsupportedEngineError(NotImplementedError):
    """An engine set-up whose state qsr-ds does not know how to average."""


def _ds_classes():
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    return BF16_Optimizer, FP16_Optimizer, FP16_UnfusedOptimizer, DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3


def check_supported(engine) -> str:
    """Refuse set-ups whose averaging is not implemented, at initialize time; returns the plan's kind."""
    opt = engine.optimizer
    if opt is None:
        raise UnsupportedEngineError("qsr-ds needs an optimizer (pass one, or an \"optimizer\" section)")
    if getattr(opt, "cpu_offload", False) or getattr(opt, "offload_optimizer", False) or getattr(opt, "offload_param", False):
        raise UnsupportedEngineError(
            "qsr-ds does not support ZeRO offload (offload_optimizer / offload_param) yet: the fp32 shards "
            "would live on the host or NVMe; remove the offload settings from zero_optimization"
        )
    if getattr(engine, "has_moe_layers", False):
        raise UnsupportedEngineError("qsr-ds does not support MoE layers (expert groups) yet")
    return plan(engine, ("params",), check_only=True).kind


def prepare(engine) -> None:
    """One-time set-up for zero-copy rounds: ZeRO 0 fp32 parameters into one flat buffer."""
    if engine.zero_optimization_stage() != 0 or engine.optimizer is not engine.basic_optimizer:
        return
    params = list(engine.module.parameters())
    devices = {p.device for p in params}
    if params and len(devices) == 1 and all(p.dtype == torch.float32 for p in params):
        engine._qsr_flat_params = flatten_into_buffer(params)


def _zero3_real_elements(opt, index: int, shard: Tensor) -> list[Tensor]:
    """Views of the real elements of ZeRO-3 sub-group ``index``'s flat fp32 shard.

    The shard is the concatenation of each parameter's partition (``ds_tensor``, the same size
    on every rank); the last rank's partition of a parameter whose size S does not divide is
    padded with uninitialised memory, which must never refuse a round. Adjacent real ranges merge.
    """
    import torch.distributed as dist

    views, offset, run_start, run_end = [], 0, 0, 0
    for param in opt.fp16_groups[index]:
        part = param.ds_tensor.ds_numel
        rank = dist.get_rank(group=param.ds_process_group)
        real = max(0, min(param.ds_numel - rank * part, part))
        if offset != run_end:  # a gap (padding) before this parameter
            if run_end > run_start:
                views.append(shard.narrow(0, run_start, run_end - run_start))
            run_start = offset
        run_end = offset + real
        offset += part
    if run_end > run_start:
        views.append(shard.narrow(0, run_start, run_end - run_start))
    return views


def plan(engine, average, topology=None, *, check_only: bool = False) -> SyncPlan:
    """The tensors of this rank for ``qsr.average`` (params, buffers, optimizer state).

    With ``topology`` and ZeRO 0 over S > 1 ranks, each rank of a replica averages only its
    1/S share (see ``_share_zero0``); without it, every tensor (for inspection and tests).
    """
    BF16_Optimizer, FP16_Optimizer, FP16_UnfusedOptimizer, ZeroOptimizer, ZeroOptimizerStage3 = _ds_classes()
    opt, stage = engine.optimizer, engine.zero_optimization_stage()
    inner = engine.basic_optimizer
    average = set(average)
    tensors: list[tuple[str, Tensor]] = []
    copies: dict[str, Tensor] = {}
    refresh: Callable[[], None] = lambda: None
    state_keys: list[tuple[str, Tensor]] = []
    flat = True  # the stage keeps its fp32 shards as a few flat tensors

    def add(name: str, t: Tensor, copy: Tensor | None = None) -> None:
        tensors.append((name, t))
        if copy is not None:
            copies[name] = copy

    sub_group_of: dict[int, int] = {}  # ZeRO-3: index in tensors -> the sub-group it is partitioned like
    if isinstance(opt, ZeroOptimizerStage3):
        kind = "zero3"
        for i, shard in enumerate(opt.fp32_partitioned_groups_flat):
            sub_group_of[len(tensors)] = i
            add(f"zero3.sub{i}.fp32", shard)

        def refresh() -> None:
            opt._partition_all_parameters()  # release persistent params so _post_step re-gathers them
            for i in range(len(opt.fp32_partitioned_groups_flat)):
                opt._reassign_or_swap_out_partitioned_parameters(i)
            opt._post_step(set())

    elif isinstance(opt, ZeroOptimizer):
        kind = f"zero{stage}"
        for i, shard in enumerate(opt.single_partition_of_fp32_groups):
            add(f"{kind}.group{i}.fp32", shard)
        refresh = opt.update_lp_params
    elif isinstance(opt, BF16_Optimizer):
        kind = f"zero{stage}.bf16_optimizer"
        for i, shard in enumerate(opt.fp32_groups_flat_partition):
            add(f"{kind}.group{i}.fp32", shard)
        refresh = opt.update_lp_params
    elif isinstance(opt, FP16_Optimizer):
        kind = "zero0.fp16_fused"
        for i, shard in enumerate(opt.fp32_groups_flat):
            add(f"{kind}.group{i}.fp32", shard)

        def refresh() -> None:
            for lp, hp in zip(opt.fp16_groups_flat, opt.fp32_groups_flat):
                lp.copy_(hp)

    elif isinstance(opt, FP16_UnfusedOptimizer):
        kind, flat = "zero0.fp16_unfused", False
        names = {p: n for n, p in engine.module.named_parameters()}
        for i, (hp_group, lp_group) in enumerate(zip(opt.fp32_groups, opt.fp16_groups)):
            for j, (hp, lp) in enumerate(zip(hp_group, lp_group)):
                add(f"param:{names.get(lp, f'group{i}.{j}')}", hp, lp)
    elif stage == 0 and opt is inner:
        kind = "zero0.fp32"
        flat_params = getattr(engine, "_qsr_flat_params", None)
        if flat_params is not None:
            add("zero0.flat.fp32", flat_params)
            state_keys = [(f"param:{n}", p) for n, p in engine.module.named_parameters()]
        else:
            flat = False
            for name, p in engine.module.named_parameters():
                add(f"param:{name}", p)
    else:
        raise UnsupportedEngineError(
            f"qsr-ds does not know which tensors to average for ZeRO stage {stage} with {type(opt).__name__}"
        )
    if check_only:
        return SyncPlan(kind, [])
    flat_numel = min((t.numel() for _, t in tensors), default=0) if flat else 0
    if average - {"params", "buffers"}:
        for index, (name, t) in enumerate(state_keys or list(tensors)):
            for state_entry in optimizer_state_tensors(inner, t, name, average):
                if index in sub_group_of:  # optimizer state is partitioned (and padded) like its fp32 shard
                    sub_group_of[len(tensors)] = sub_group_of[index]
                tensors.append(state_entry)
    if "buffers" in average:
        tensors.extend(
            (f"buffer:{n}", b) for n, b in engine.module.named_buffers() if b is not None and b.is_floating_point()
        )
    scan = None
    if sub_group_of:
        scan = [(j, view) for j, (_, t) in enumerate(tensors)
                for view in (_zero3_real_elements(opt, sub_group_of[j], t) if j in sub_group_of else [t])]
    # ZeRO's flat shards hide the parameters: other model code of the same size would pass
    result = SyncPlan(kind, tensors, copies, refresh, flat_numel, signature=module_signature(engine.module), scan=scan)
    if stage == 0 and topology is not None and topology.ranks_per_replica > 1:
        return _share_zero0(result, topology)
    return result


def _share_zero0(full: SyncPlan, topology) -> SyncPlan:
    """ZeRO 0 holds S identical copies of everything in a replica: split the averaging S ways.

    Flat fp32 buffers are cut into S contiguous chunks, other tensors are dealt out greedily by
    size (the same deal on every rank). Rank k of each replica averages its share with rank k
    of the other replicas, then each share is broadcast from its owner inside the replica. The
    bytes sent across replicas per replica are then one model, not S models.
    """
    import torch.distributed as dist

    ranks, k = topology.ranks_per_replica, topology.shard_rank
    parts: list[tuple[str, Tensor, int]] = []
    load = [0] * ranks
    for name, t in full.tensors:
        if name not in full.copies and full.flat_numel and t.is_contiguous() and t.numel() >= 1024 * ranks:
            chunk = -(-t.numel() // ranks)
            for j in range(ranks):
                piece = t.view(-1)[j * chunk:(j + 1) * chunk]
                parts.append((f"{name}[{j}/{ranks}]", piece, j))
                load[j] += piece.numel()
        else:
            owner = min(range(ranks), key=lambda j: load[j])
            parts.append((name, t, owner))
            load[owner] += t.numel()
    mine = [(n, t) for n, t, owner in parts if owner == k]
    chunks = [t.numel() for n, t in mine if n.endswith(f"/{ranks}]")]

    @torch.no_grad()
    def refresh() -> None:
        group, members = topology.shard_group, topology.shard_ranks
        works = [dist.broadcast(t, src=members[owner], group=group, async_op=True) for _, t, owner in parts]
        for work in works:
            work.wait()
        for name, t, owner in parts:
            if owner != k and name in full.copies:
                full.copies[name].copy_(t)
        full.refresh()

    copies = {n: full.copies[n] for n, _ in mine if n in full.copies}
    return SyncPlan(full.kind, mine, copies, refresh, min(chunks) if chunks else 0, signature=full.signature)


def full_fp32_params(engine) -> list[tuple[str, Tensor]]:
    """This replica's full fp32 (master) parameters in module order, on the CPU.

    Under ZeRO 1-3 each is assembled from the replica's shards (a collective over the shard
    group: every rank of the replica must call this). For summaries and tests, not the hot path.
    """
    from deepspeed.utils import safe_get_full_fp32_param
    from torch._utils import _unflatten_dense_tensors

    _, FP16_Optimizer, FP16_UnfusedOptimizer, _, _ = _ds_classes()
    opt, out = engine.optimizer, []
    if engine.zero_optimization_stage() == 0:
        masters: dict[Tensor, Tensor] = {}
        if isinstance(opt, FP16_UnfusedOptimizer):
            for lp_group, hp_group in zip(opt.fp16_groups, opt.fp32_groups):
                masters.update(zip(lp_group, hp_group))
        elif isinstance(opt, FP16_Optimizer):
            for lp_group, hp_flat in zip(opt.fp16_groups, opt.fp32_groups_flat):
                masters.update(zip(lp_group, _unflatten_dense_tensors(hp_flat, lp_group)))
        for name, p in engine.module.named_parameters():
            out.append((name, masters.get(p, p).detach().float().cpu()))
        return out
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        if full is None and engine.zero_optimization_stage() < 3:
            full = p  # not optimized (frozen): ZeRO 1/2 keep it whole
        if full is None:
            raise UnsupportedEngineError(f"no fp32 master for parameter {name} (frozen under ZeRO {engine.zero_optimization_stage()}?)")
        out.append((name, full.detach().float().cpu()))
    return out

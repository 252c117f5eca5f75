"""``qsr_ds.fingerprint(x)``: a replica's fp32 parameters as one sha256, to check that replicas agree.

Collective inside a replica (every rank of it must call it): sharded parameters are gathered
over the replica's shard group, never across replicas. Right after a boundary every replica
gives the same string.
"""
from __future__ import annotations

from torch import nn
from torch.distributed.tensor import DTensor

from .sync.layout import params_digest


def fingerprint(target) -> str:
    """sha256 of this replica's full fp32 parameters, in module order.

    ``target``: a DeepSpeed engine from ``qsr_ds.initialize`` (its fp32 masters, also under ZeRO
    1-3 and bf16/fp16), an FSDP2 model or an FSDPQSR (DTensor shards gathered), a LocalOptimizer,
    or a plain ``nn.Module``.
    """
    if callable(getattr(target, "zero_optimization_stage", None)):  # a DeepSpeed engine
        from .deepspeed.state import full_fp32_params  # only a DeepSpeed user has deepspeed installed

        return params_digest(full_fp32_params(target))
    module = getattr(target, "model", target)  # FSDPQSR and LocalOptimizer hold the model
    if not isinstance(module, nn.Module):
        raise TypeError(f"qsr_ds.fingerprint: expected a DeepSpeed engine, an FSDPQSR, a LocalOptimizer or an "
                        f"nn.Module, got {type(target).__name__}")
    return params_digest((name, p.full_tensor() if isinstance(p, DTensor) else p)
                         for name, p in module.named_parameters())

"""A small GPT and a byte-level corpus for the main job (examples/train_gpt.py).

The corpus is the English help text that ships with CPython itself (``pydoc_data.topics``:
the pages `help("FOR")` and friends print), so nothing is downloaded. Tokens are bytes
(vocabulary 256). The last 10% of the byte stream is a fixed validation split.

Batches are a pure function of (seed, step, replica, shard rank): a resumed run sees
exactly the batches the uninterrupted run would have seen, and every rank of every
replica sees different data.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 256


def corpus_bytes() -> bytes:
    """CPython's pydoc topics, in a fixed (sorted) order, as UTF-8 bytes."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")


class ByteCorpus:
    """Train / validation token streams and deterministic batch sampling."""

    def __init__(self, val_fraction: float = 0.1) -> None:
        data = torch.frombuffer(bytearray(corpus_bytes()), dtype=torch.uint8).long()
        split = int(len(data) * (1 - val_fraction))
        self.train, self.val = data[:split], data[split:]
        self.sha256 = hashlib.sha256(corpus_bytes()).hexdigest()

    @staticmethod
    def _seed(*parts: int) -> int:
        digest = hashlib.sha256(",".join(map(str, parts)).encode()).digest()
        return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)

    def batch(self, *, seed: int, step: int, replica: int, shard: int, batch_size: int, seq_len: int,
              split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of shape (batch_size, seq_len); targets are inputs shifted by one byte."""
        data = self.train if split == "train" else self.val
        gen = torch.Generator().manual_seed(self._seed(seed, step, replica, shard, split == "train"))
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=gen)
        idx = starts[:, None] + torch.arange(seq_len + 1)[None, :]
        window = data[idx]
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()


@dataclass(frozen=True)
class GPTConfig:
    seq_len: int = 64
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    dropout: float = 0.0


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.out = nn.Linear(4 * cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """A compact decoder-only transformer over bytes (no weight tying: simpler under ZeRO 3)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(VOCAB, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, VOCAB, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith(("proj.weight", "out.weight")):  # GPT-2's scaled residual init
                with _whole(p):
                    nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, VOCAB), targets.reshape(-1))


def _whole(p: nn.Parameter):
    """The full parameter for an in-place init: a ZeRO-3 one built under zero.Init holds only a shard."""
    if not hasattr(p, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([p], modifier_rank=0)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices and embeddings, none on biases and LayerNorm."""
    dims = {p: len(getattr(p, "ds_shape", p.shape)) for p in model.parameters()}  # ZeRO-3: the full shape
    decay = [p for n, p in model.named_parameters() if dims[p] >= 2]
    no_decay = [p for n, p in model.named_parameters() if dims[p] < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

"""Pre-train a small GPT-2 with Hugging Face Trainer + DeepSpeed + QSR, on CPU, nothing downloaded.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 4 examples/hf_trainer.py --deepspeed configs/qsr.json
    torchrun --nproc_per_node 4 examples/hf_trainer.py --deepspeed configs/qsr.json    # the same

The model is transformers' GPT2LMHeadModel built from a GPT2Config (byte vocabulary);
the corpus is CPython's own help texts (``pydoc_data.topics``, see examples/gpt.py).
Compared with a plain Trainer script, the only change is ``QSRTrainer`` in place of
``Trainer``; the "qsr" section of the DeepSpeed JSON does the rest (drop it, or pass
--no-qsr, and this is plain data-parallel Trainer).

The JSON is the source of truth: learning rate, weight decay, warm-up, batch size and
clipping are read from it into TrainingArguments, because Trainer refuses a DeepSpeed
config whose values differ from its arguments. --max-steps rewrites the step counts of the
"scheduler" and "qsr" sections (training must end on an average). On a machine without
GPUs an Adam/AdamW "optimizer" section becomes Trainer's torch AdamW with the same settings
(DeepSpeed would first JIT-compile its fused Adam for the CPU), and TrainingArguments get
use_cpu=True (without it accelerate counts one process, and every rank reads the same data).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpt import ByteCorpus  # noqa: E402  (examples/gpt.py: the packaged corpus)


class Windows(torch.utils.data.Dataset):
    """Fixed, seeded byte windows of a token stream: {"input_ids", "labels"} (the model shifts labels)."""

    def __init__(self, tokens: torch.Tensor, count: int, seq_len: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.starts = torch.randint(0, len(tokens) - seq_len, (count,), generator=gen)
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict:
        window = self.tokens[self.starts[i]: self.starts[i] + self.seq_len]
        return {"input_ids": window, "labels": window}


def load_config(path: str, max_steps: int | None, no_qsr: bool) -> dict:
    with open(path, encoding="utf-8") as f:
        ds = json.load(f)
    if no_qsr:
        ds.pop("qsr", None)
    if max_steps is not None:
        ds.get("scheduler", {}).get("params", {}).update(total_num_steps=max_steps)
        if "qsr" in ds:
            ds["qsr"]["total_steps"] = max_steps
    return ds


def training_arguments(ds: dict, cli: argparse.Namespace):
    """TrainingArguments that agree with the DeepSpeed JSON (numbers only: "auto" stays Trainer's)."""
    from transformers import TrainingArguments

    def number(value, default):
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else default

    opt = ds.get("optimizer", {}).get("params", {})
    cpu = not torch.cuda.is_available()
    if cpu and ds.get("optimizer", {}).get("type", "").lower() in ("adam", "adamw"):
        # on CPU DeepSpeed would first compile its fused Adam; Trainer's torch AdamW, same settings, is as good
        del ds["optimizer"]
    betas = opt.get("betas", [0.9, 0.999])
    sched = ds.get("scheduler", {}).get("params", {})
    max_steps = number(ds.get("qsr", {}).get("total_steps"), None) or number(sched.get("total_num_steps"), None)
    max_steps = cli.max_steps or max_steps or 200
    warmup = number(sched.get("warmup_num_steps"), max_steps // 10)
    return TrainingArguments(
        output_dir=cli.output_dir,
        deepspeed=ds,
        use_cpu=cpu,  # accelerate needs it to run DeepSpeed on several CPU processes
        max_steps=max_steps,
        per_device_train_batch_size=number(ds.get("train_micro_batch_size_per_gpu"), 8),
        per_device_eval_batch_size=16,
        gradient_accumulation_steps=number(ds.get("gradient_accumulation_steps"), 1),
        learning_rate=number(opt.get("lr"), 3e-3),
        weight_decay=number(opt.get("weight_decay"), 0.0),
        adam_beta1=number(betas[0], 0.9),
        adam_beta2=number(betas[1], 0.999),
        adam_epsilon=number(opt.get("eps"), 1e-8),
        warmup_steps=warmup,
        max_grad_norm=number(ds.get("gradient_clipping"), 1.0),
        logging_steps=max(1, max_steps // 10),
        save_strategy="steps" if cli.save_steps else "no",
        save_steps=cli.save_steps or 500,
        report_to=[],
        seed=cli.seed,
        disable_tqdm=cli.no_progress,
    )


def params_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for p in module.parameters():
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; options named after TrainingArguments fields also take their underscore spelling."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--deepspeed", required=True, help="DeepSpeed JSON, optionally with a \"qsr\" section")
    parser.add_argument("--max-steps", "--max_steps", dest="max_steps", type=int, default=None,
                        help="default: qsr.total_steps")
    parser.add_argument("--output-dir", "--output_dir", dest="output_dir", default="runs/hf_trainer")
    parser.add_argument("--save-steps", "--save_steps", dest="save_steps", type=int, default=0,
                        help="Trainer checkpoint every N steps (0: none)")
    parser.add_argument("--resume", default=None, help="a checkpoint-N directory, or 'last' (in --output-dir)")
    parser.add_argument("--no-qsr", action="store_true", help="drop the qsr section: plain data-parallel Trainer")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--summary-json", default=None, help="also write the summary here (rank 0)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    cli = parse_args(argv)

    from transformers import GPT2Config, GPT2LMHeadModel, set_seed
    from transformers.trainer_utils import get_last_checkpoint

    from qsr_ds.hf import QSRTrainer

    ds = load_config(cli.deepspeed, cli.max_steps, cli.no_qsr)
    set_seed(cli.seed)  # every replica starts from the same weights
    # built before the TrainingArguments: with ZeRO-3 transformers would otherwise partition it over
    # all ranks (zero.Init), while the engine partitions it inside a replica
    model = GPT2LMHeadModel(GPT2Config(
        vocab_size=256, n_positions=cli.seq_len, n_embd=cli.d_model, n_layer=cli.n_layer,
        n_head=max(1, cli.d_model // 32), bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0))
    args = training_arguments(ds, cli)  # starts torch.distributed
    corpus = ByteCorpus()
    world = args.world_size
    per_step = world * args.per_device_train_batch_size * args.gradient_accumulation_steps
    train = Windows(corpus.train, args.max_steps * per_step, cli.seq_len, seed=cli.seed)
    val = Windows(corpus.val, 4 * world * args.per_device_eval_batch_size, cli.seq_len, seed=cli.seed + 1)
    trainer = QSRTrainer(model=model, args=args, train_dataset=train, eval_dataset=val)

    resume = cli.resume
    if resume == "last":
        resume = get_last_checkpoint(cli.output_dir)
    start = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.time() - start
    metrics = trainer.evaluate()

    digests = [None] * world
    dist.all_gather_object(digests, params_digest(trainer.model))
    hook = trainer.qsr
    summary = {
        "world_size": world,
        "replicas": hook.num_replicas if hook else 1,
        "ranks_per_replica": hook.topology.ranks_per_replica if hook else world,
        "optimizer_steps": trainer.state.global_step,
        "averaging_rounds": hook.rounds if hook else None,
        "last_h": hook.tracker.current_h if hook else None,
        "data_parallel_allreduces": trainer.state.global_step,
        "averaged_mib_per_rank": round(hook.totals.bytes / 2**20, 2) if hook else None,
        "train_loss": round(result.training_loss, 4),
        "eval_loss": round(metrics["eval_loss"], 4),
        # ZeRO-3 modules hold no full weights to compare
        "replicas_identical": len(set(digests)) == 1 if ds.get("zero_optimization", {}).get("stage") != 3 else None,
        "train_seconds": round(seconds, 1),
    }
    if args.process_index == 0:
        print("\nsummary " + json.dumps(summary, indent=1), flush=True)
        if cli.summary_json:
            with open(cli.summary_json, "w") as f:
                json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    main()
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # gloo can abort at interpreter exit

"""QSR for Hugging Face Trainer with a DeepSpeed JSON that has a "qsr" section.

    from qsr_ds.hf import QSRTrainer          # instead of: from transformers import Trainer
    trainer = QSRTrainer(model=model, args=TrainingArguments(..., deepspeed="configs/qsr.json"), ...)
    trainer.train()

QSRTrainer is Trainer with three additions, all inactive without a "qsr" section (it is
then plain Trainer, and deepspeed.initialize is never touched):

- Engine creation. While train() runs, ``deepspeed.initialize`` (the function accelerate
  calls to build the engine) is qsr_ds.initialize: DeepSpeed gets the replica's shard
  group as its data-parallel group, the engine averages replicas at QSR boundaries after
  each engine.step(), and its save_checkpoint / load_checkpoint carry the QSR state, so
  Trainer checkpoints and ``train(resume_from_checkpoint=...)`` continue the schedule.
  Trainer fills "train_batch_size" for all ranks; the engine gets it per replica
  (micro batch x accumulation x ranks_per_replica). Trainer's sampler still shards over
  the whole world, so every rank of every replica reads different data, as under DDP.
- Learning rate. The H of a round comes from the learning rate the next step will use.
  When Trainer makes its own scheduler (no "scheduler" section), it is handed to the
  engine, which steps it inside engine.step() before the QSR hook reads the rate, as
  Trainer does for a DeepSpeed optimizer with a Trainer scheduler.
- Logs. Every training log line gets ``qsr_h`` (H of the current round) and
  ``qsr_rounds`` (averaging rounds done).

Other Trainer subclasses (e.g. TRL's) get the same with ``class MyTrainer(QSRTrainerMixin, SFTTrainer)``.

Checked against transformers 5.24 and accelerate 1.15. Trainer/accelerate internals used:
accelerate builds the engine by calling ``deepspeed.initialize`` (the module attribute, at
call time) with ``config_params``; Trainer calls ``create_scheduler(num_training_steps)``
after the engine exists and saves / resumes through ``model_wrapped.save_checkpoint`` /
``load_checkpoint``; accelerate's DeepSpeedSchedulerWrapper leaves stepping to the engine.

On a machine without GPUs pass ``use_cpu=True`` to TrainingArguments: otherwise accelerate
(1.15) starts DeepSpeed but counts one process, and every rank would read the same data
(QSRTrainer refuses to start then).
"""
from __future__ import annotations

import contextlib
import copy
import os
from typing import Any

import torch.distributed as dist
from transformers import Trainer

from .config import QSRConfig, QSRConfigError, from_dict
from .schedule import SyncTracker


def qsr_section(args) -> tuple[dict, QSRConfig] | None:
    """The "qsr" section of TrainingArguments' DeepSpeed config (a copy) and its validated form, or None."""
    hf_config = getattr(args, "hf_deepspeed_config", None)
    if getattr(args, "deepspeed", None) is None or hf_config is None or "qsr" not in hf_config.config:
        return None
    source = os.fspath(args.deepspeed) if isinstance(args.deepspeed, (str, os.PathLike)) else "<deepspeed config dict>"
    section = copy.deepcopy(hf_config.config["qsr"])
    return section, from_dict(section, source)


def per_replica_batch(ds_config: dict, qsr: QSRConfig, world_size: int) -> dict:
    """A copy of the config whose train_batch_size counts one replica, where Trainer counted the world."""
    micro, gas = ds_config.get("train_micro_batch_size_per_gpu"), ds_config.get("gradient_accumulation_steps", 1)
    total = ds_config.get("train_batch_size")
    if not all(isinstance(v, int) for v in (micro, gas, total)) or total != micro * gas * world_size:
        return ds_config
    return {**ds_config, "train_batch_size": micro * gas * qsr.ranks_per_replica}


def _check_not_zero3_initialized(model, qsr: QSRConfig) -> None:
    """ZeRO-3 parameters already partitioned by transformers' zero.Init are split over the world."""
    first = next(iter(model.parameters()), None)
    group = getattr(first, "ds_process_group", None)
    if group is not None and dist.get_world_size(group) != qsr.ranks_per_replica:
        raise QSRConfigError(
            f"qsr: the model's ZeRO-3 parameters are partitioned over {dist.get_world_size(group)} ranks, "
            f"but a replica has ranks_per_replica={qsr.ranks_per_replica}: from_pretrained / from_config "
            "partition a model over all ranks (zero.Init) once TrainingArguments(deepspeed=<ZeRO-3 config>) "
            "exist; load or build the model before the TrainingArguments, and the engine partitions it "
            "inside the replica"
        )


class QSRTrainerMixin:
    """Adds QSR to a Trainer (sub)class when its DeepSpeed config has a "qsr" section."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._qsr_section, self.qsr_config = None, None
        self._qsr_engine, self._qsr_training = None, False
        super().__init__(*args, **kwargs)
        found = qsr_section(self.args)
        if found is not None:
            self._qsr_section, self.qsr_config = found
        if self.qsr_config is None:
            return
        world = dist.get_world_size() if dist.is_initialized() else 1
        if self.accelerator.num_processes != world:
            raise RuntimeError(
                f"accelerate counts {self.accelerator.num_processes} process(es) but torch.distributed has {world} "
                "ranks, so every rank would read the same data: on a machine without GPUs pass use_cpu=True to "
                "TrainingArguments (accelerate then runs DeepSpeed on all CPU processes)"
            )
        self.qsr_config.num_replicas(world)

    @property
    def qsr(self):
        """The engine's QSR hook (tracker, totals, last round) once train() has built the engine, else None."""
        return getattr(self._qsr_engine, "qsr", None)

    def train(self, *args: Any, **kwargs: Any):
        if self.qsr_config is None:
            return super().train(*args, **kwargs)
        with self._engine_with_qsr():
            return super().train(*args, **kwargs)

    @contextlib.contextmanager
    def _engine_with_qsr(self):
        """deepspeed.initialize is qsr_ds.initialize while train() runs."""
        import deepspeed

        from .deepspeed.hook import initialize as qsr_initialize

        original = deepspeed.initialize
        # accelerate takes every "auto" in the config for its own placeholder ("kernel": "auto" would
        # fail), so the section is out of its sight while train() runs and goes back in for the engine
        plugin_config = self.accelerator.state.deepspeed_plugin.deepspeed_config
        hidden, section = plugin_config.pop("qsr", None), self._qsr_section

        def initialize(*args: Any, **kwargs: Any):
            world = dist.get_world_size()
            for key in ("config_params", "config"):
                if isinstance(kwargs.get(key), dict):
                    kwargs[key] = {**per_replica_batch(kwargs[key], self.qsr_config, world), "qsr": section}
            if kwargs.get("model") is not None:
                _check_not_zero3_initialized(kwargs["model"], self.qsr_config)
            deepspeed.initialize = original  # qsr_ds.initialize calls deepspeed.initialize itself
            try:
                out = qsr_initialize(*args, **kwargs)
            finally:
                deepspeed.initialize = initialize
            self._qsr_engine = out[0]
            return out

        self._qsr_engine, self._qsr_training = None, True
        deepspeed.initialize = initialize
        try:
            yield
        finally:
            deepspeed.initialize = original
            if hidden is not None:
                plugin_config["qsr"] = hidden
            self._qsr_training = False

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """Trainer's scheduler, stepped by the engine before the QSR hook reads the learning rate."""
        if not self._qsr_training:
            return super().create_scheduler(num_training_steps, optimizer)
        engine = self._qsr_engine
        if engine is None or not hasattr(engine, "qsr"):
            raise RuntimeError(
                "qsr: Trainer created its scheduler but accelerate did not build the DeepSpeed engine through "
                "deepspeed.initialize, so the replica topology and the QSR hook are missing; this "
                "transformers/accelerate combination is not supported by qsr_ds.hf"
            )
        total = self.qsr_config.total_steps
        if num_training_steps != total:
            raise QSRConfigError(
                f"{self.qsr_config.source}: qsr.total_steps={total} but Trainer will run {num_training_steps} "
                "optimizer steps (max_steps); make them equal so that training ends on an average"
            )
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if engine.lr_scheduler is None and scheduler is not None:
            from accelerate.utils import DeepSpeedSchedulerWrapper

            engine.lr_scheduler = scheduler  # engine.step() steps it, then the QSR hook reads the next step's lr
            self.lr_scheduler = DeepSpeedSchedulerWrapper(scheduler, self.optimizer)  # Trainer's step(): no-op
            hook = engine.qsr
            if hook.tracker.completed_steps == 0:  # the first H, from the scheduler's step-0 rate
                hook.tracker = SyncTracker(hook.tracker.schedule, hook.current_lr())
        return self.lr_scheduler

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        hook = self.qsr
        if hook is not None and not any(k.startswith(("eval_", "test_")) for k in logs):
            logs["qsr_h"] = hook.tracker.current_h
            logs["qsr_rounds"] = hook.tracker.rounds_done
        super().log(logs, *args, **kwargs)


class QSRTrainer(QSRTrainerMixin, Trainer):
    """transformers.Trainer with QSR local training when the DeepSpeed config has a "qsr" section."""

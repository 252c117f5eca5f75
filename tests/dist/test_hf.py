"""qsr_ds.hf: Hugging Face Trainer + DeepSpeed + QSR on 4 CPU ranks (2 replicas x 2 ranks, ZeRO-2).

One spawned job trains the runs every test here checks (processes are the expensive part):
  plain   a config without the "qsr" section, once with QSRTrainer, once with Trainer
  qsr     12 steps, Trainer's own AdamW and linear schedule, QSR rule with growing H,
          a Trainer checkpoint at step 9 (inside the last round, H = 4)
  resume  a new QSRTrainer resumed from checkpoint-9 to step 12
  errors  qsr.total_steps != max_steps; a CPU run without use_cpu=True
Plus one run of examples/hf_trainer.py under the deepspeed launcher.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from tests.ranks import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS, SAVE_AT, LR, WARMUP = 12, 9, 1e-2, 2
JOB_TIMEOUT = 480  # the first test to ask for the shared job (whichever -k picks) pays for it
QSR = {"rule": "qsr", "h_base": 2, "alpha": 0.008, "warmup_steps": WARMUP, "total_steps": STEPS,
       "ranks_per_replica": 2, "kernel": "auto"}  # "auto" also checks accelerate never sees the section


def _ds_config(qsr: dict | None) -> dict:
    config = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
              "zero_optimization": {"stage": 2}}
    if qsr is not None:
        config["qsr"] = dict(qsr)
    return config


def _job(rank: int, world: int, out_dir: str) -> dict:
    import deepspeed
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments, set_seed

    from qsr_ds.config import QSRConfigError
    from qsr_ds.hf import QSRTrainer

    class Tokens(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.seen: list[int] = []

        def __len__(self) -> int:
            return STEPS * world * 2

        def __getitem__(self, i: int) -> dict:
            self.seen.append(i)
            x = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": x, "labels": x}

    class Rounds(TrainerCallback):
        """(start step, H) of every round, read from the engine's tracker as training goes."""

        def __init__(self, trainer) -> None:
            self.trainer, self.rounds = trainer, []

        def _record(self) -> None:
            tracker = self.trainer.qsr.tracker
            if not tracker.finished and (not self.rounds or self.rounds[-1][0] != tracker.round_start):
                self.rounds.append((tracker.round_start, tracker.current_h))

        def on_train_begin(self, args, state, control, **kwargs):
            self._record()

        def on_step_end(self, args, state, control, **kwargs):
            self._record()

    def digest(model) -> str:
        h = hashlib.sha256()
        for p in model.parameters():
            h.update(p.detach().float().numpy().tobytes())
        return h.hexdigest()

    def trainer(cls, qsr, name, save_steps=0, max_steps=STEPS, use_cpu=True):
        args = TrainingArguments(
            output_dir=os.path.join(out_dir, name), deepspeed=_ds_config(qsr), use_cpu=use_cpu,
            max_steps=max_steps, per_device_train_batch_size=2, learning_rate=LR, warmup_steps=WARMUP,
            lr_scheduler_type="linear", logging_steps=1, save_strategy="steps" if save_steps else "no",
            save_steps=save_steps or 500, report_to=[], disable_tqdm=True, seed=0)
        set_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                           bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                           attn_pdrop=0.0))
        data = Tokens()
        return cls(model=model, args=args, train_dataset=data), data

    out: dict = {}
    original_initialize = deepspeed.initialize

    # plain runs first: DeepSpeed keeps the last engine's mpu in deepspeed.utils.groups for the process
    for cls in (QSRTrainer, Trainer):
        plain, _ = trainer(cls, None, "plain", max_steps=4)
        plain.train()
        out[f"plain_{cls.__name__}"] = dict(
            digest=digest(plain.model), engine=type(plain.model_wrapped).__name__,
            dp_world_size=plain.model_wrapped.dp_world_size, qsr=getattr(plain, "qsr", None),
            qsr_logged=any("qsr_h" in log for log in plain.state.log_history))

    qsr, data = trainer(QSRTrainer, QSR, "qsr", save_steps=SAVE_AT)
    rounds = Rounds(qsr)
    qsr.add_callback(rounds)
    qsr.train()
    engine = qsr.model_wrapped
    out["qsr"] = dict(
        digest=digest(qsr.model), rounds=rounds.rounds, rounds_done=qsr.qsr.rounds,
        tracker=qsr.qsr.tracker.state_dict(), dp_world_size=engine.dp_world_size, seen=sorted(data.seen),
        logs=[{k: v for k, v in log.items() if k in ("step", "qsr_h", "qsr_rounds", "loss")}
              for log in qsr.state.log_history],
        engine_batch=engine.train_batch_size(), total_batch=qsr.args.world_size * 2,
        scheduler_in_engine=engine.lr_scheduler is not None,
        checkpoint=sorted(os.listdir(os.path.join(out_dir, "qsr", f"checkpoint-{SAVE_AT}"))),
    )

    resumed, _ = trainer(QSRTrainer, QSR, "resume")
    resumed_rounds = Rounds(resumed)
    resumed.add_callback(resumed_rounds)
    resumed.train(resume_from_checkpoint=os.path.join(out_dir, "qsr", f"checkpoint-{SAVE_AT}"))
    out["resume"] = dict(digest=digest(resumed.model), rounds=resumed_rounds.rounds, rounds_done=resumed.qsr.rounds,
                         tracker=resumed.qsr.tracker.state_dict(), global_step=resumed.state.global_step)

    out["initialize_restored"] = deepspeed.initialize is original_initialize

    errors = {}
    bad, _ = trainer(QSRTrainer, QSR, "bad", max_steps=STEPS + 1)
    try:
        bad.train()
    except QSRConfigError as err:
        errors["max_steps"] = str(err)
    try:
        trainer(QSRTrainer, QSR, "bad", use_cpu=False)  # last: leaves accelerate counting one process
    except RuntimeError as err:
        errors["use_cpu"] = str(err)
    out["errors"] = errors
    return out


def _planned_rounds() -> list[tuple[int, int]]:
    """The schedule of the job, from the learning rates Trainer's linear schedule gives each step."""
    import torch
    from transformers import get_scheduler

    from qsr_ds.schedule import SyncSchedule

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
    sched = get_scheduler("linear", optimizer=opt, num_warmup_steps=WARMUP, num_training_steps=STEPS)
    lrs = []
    for _ in range(STEPS):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    keys = ("rule", "h_base", "alpha", "warmup_steps", "total_steps")
    return SyncSchedule(**{k: QSR[k] for k in keys}).rounds(lambda s: lrs[s])


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("hf"))
    return run_ranks(_job, 4, out_dir, timeout_s=JOB_TIMEOUT - 60, env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})


@pytest.mark.timeout(JOB_TIMEOUT)
def test_rounds_are_the_planned_schedule(job):
    planned = _planned_rounds()
    assert max(h for _, h in planned) > QSR["h_base"], "the test schedule should grow H"
    for result in job:
        run = result["qsr"]
        assert run["dp_world_size"] == 2  # ZeRO/gradient all-reduce inside the 2-rank replica
        assert run["scheduler_in_engine"]  # Trainer's scheduler is stepped before the hook reads the lr
        assert run["rounds"] == planned
        assert run["rounds_done"] == len(planned)
        assert run["tracker"]["completed_steps"] == STEPS
        assert run["engine_batch"] * 2 == run["total_batch"]  # per replica for the engine, world for Trainer


@pytest.mark.timeout(JOB_TIMEOUT)
def test_h_and_rounds_are_in_trainer_logs(job):
    planned = _planned_rounds()
    ends = [start + h for start, h in planned]
    logs = [log for log in job[0]["qsr"]["logs"] if "loss" in log]
    assert [log["step"] for log in logs] == list(range(1, STEPS + 1))
    for log in logs:
        step = log["step"]
        assert log["qsr_rounds"] == sum(end <= step for end in ends), log
        assert log["qsr_h"] == [h for start, h in planned if start <= step][-1], log  # the round now open


@pytest.mark.timeout(JOB_TIMEOUT)
def test_replicas_identical_after_last_round_and_data_differs(job):
    assert len({r["qsr"]["digest"] for r in job}) == 1
    seen = [set(r["qsr"]["seen"]) for r in job]
    for a in range(4):
        assert seen[a], "every rank reads data"
        for b in range(a + 1, 4):
            assert not seen[a] & seen[b], f"ranks {a} and {b} read the same samples"


@pytest.mark.timeout(JOB_TIMEOUT)
def test_resume_from_trainer_checkpoint_continues_schedule(job):
    files = job[0]["qsr"]["checkpoint"]
    assert f"global_step{SAVE_AT}.qsr.json" in files and {"replica0", "replica1"} <= set(files)
    for result in job:
        run, resumed = result["qsr"], result["resume"]
        assert resumed["global_step"] == STEPS
        assert resumed["tracker"] == run["tracker"]
        assert resumed["rounds_done"] == run["rounds_done"]
        # the round open at the checkpoint (8, 4) goes on; no new round started
        assert resumed["rounds"] == [r for r in run["rounds"] if r[0] <= SAVE_AT][-1:]
        assert resumed["digest"] == run["digest"]  # bitwise the uninterrupted run


@pytest.mark.timeout(JOB_TIMEOUT)
def test_without_qsr_section_is_plain_trainer(job):
    for result in job:
        mine, plain = result["plain_QSRTrainer"], result["plain_Trainer"]
        assert mine["engine"] == plain["engine"] == "DeepSpeedEngine"
        assert mine["dp_world_size"] == plain["dp_world_size"] == 4
        assert mine["qsr"] is None and not mine["qsr_logged"]
        assert mine["digest"] == plain["digest"]
    assert all(r["initialize_restored"] for r in job)


@pytest.mark.timeout(JOB_TIMEOUT)
def test_mistakes_fail_before_training(job):
    for result in job:
        errors = result["errors"]
        assert f"qsr.total_steps={STEPS} but Trainer will run {STEPS + 1}" in errors["max_steps"]
        assert "use_cpu=True" in errors["use_cpu"]


def test_example_takes_the_trainer_spelling_of_its_options():
    """--output_dir as every Hugging Face example spells it, and --output-dir, set the same option."""
    from examples.hf_trainer import parse_args

    for spelling in (["--output-dir", "o", "--max-steps", "6", "--save-steps", "2"],
                     ["--output_dir", "o", "--max_steps", "6", "--save_steps", "2"]):
        cli = parse_args(["--deepspeed", "ds.json", *spelling])
        assert (cli.output_dir, cli.max_steps, cli.save_steps) == ("o", 6, 2), spelling


@pytest.mark.timeout(300)
def test_example_under_deepspeed_launcher(tmp_path):
    """configs/qsr.json as shipped but with 2 replicas of 1 rank: half the processes of the README's run."""
    with open(os.path.join(ROOT, "configs", "qsr.json")) as f:
        config = json.load(f)
    config["qsr"]["ranks_per_replica"] = 1
    (tmp_path / "qsr.json").write_text(json.dumps(config))
    summary = tmp_path / "summary.json"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
           str(_free_port()), "examples/hf_trainer.py", "--deepspeed", str(tmp_path / "qsr.json"), "--max-steps", "6",
           "--n-layer", "1", "--d-model", "32", "--seq-len", "32", "--no-progress",
           "--output_dir", str(tmp_path / "run"), "--summary-json", str(summary)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(summary.read_text())
    assert result["replicas"] == 2 and result["ranks_per_replica"] == 1
    assert result["optimizer_steps"] == 6 and result["averaging_rounds"] == 3  # warm-up: H = h_base = 2
    assert result["replicas_identical"] is True


def _free_port() -> int:
    from tests.ranks import free_port

    return free_port()

"""The run folder under faults: one owner at a time, no stale lock after a kill, resume=never keeps a finished run,
checkpoints that would run code are refused, and a run killed again and again (inside saves too) ends exactly where
an uninterrupted one does. Real one-rank runs of configs/tiny/mntp.yaml, a few steps each."""
import csv
import glob
import os
import random
import shutil
import socket
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from engine.checkpoint import LOCK_FILE, UnsafeCheckpointError, load_state_file

from .helpers import Child, rewind_run, run_cmd, sigterm_when

pytestmark = pytest.mark.slow

BASE = ["eval_every=0", "model.gradient_checkpointing=false", "max_seq_len=32", "batch_size=4", "micro_batch_size=2",
        "max_samples=100", "memory_budget_gb=64"]


def _args(out, *overrides):
    return [sys.executable, "engine/train.py", "--config", "configs/tiny/mntp.yaml", f"output_dir={out}", *BASE,
            *overrides]


def _train(out, *overrides, env=None):
    return run_cmd(_args(out, *overrides), env=env, timeout=600)


def _losses(out):
    with open(os.path.join(out, "metrics.csv")) as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}


def _adapter(path):
    return load_file(os.path.join(path, "adapter_model.safetensors"))


def _same_adapter(a, b):
    x, y = _adapter(a), _adapter(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _ok(r):
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


class Evil:
    """Unpickling this creates the marker file: what a planted checkpoint could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


# --- one owner ------------------------------------------------------------------------------------------------------

def test_a_second_run_into_a_held_folder_exits_2_naming_the_holder_and_a_kill_leaves_no_stale_lock(tmp_path):
    out = str(tmp_path / "run")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "TRITON_INTERPRET"):
        env.pop(k, None)
    first = Child(_args(out, "max_steps=100000", "save_every=0"), env=env)
    try:
        lock = os.path.join(out, LOCK_FILE)
        deadline = time.time() + 300
        while time.time() < deadline:  # the first run holds the folder once its pid is in the lock file
            if os.path.isfile(lock) and open(lock).read().split()[:1] == [str(first.pid)]:
                break
            assert first.poll() is None, "the first run ended early"
            time.sleep(0.5)
        else:
            pytest.fail("the first run never took the lock")
        t0 = time.time()
        r = _train(out, "max_steps=2")
        assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert f"is in use by another run (pid {first.pid} on host {socket.gethostname()}" in lines[0], lines[0]
        assert "trainable parameters" not in r.stdout and time.time() - t0 < 120  # refused before any model loads
        assert first.poll() is None  # the holder runs on, untouched
    finally:
        first.kill()  # SIGKILL: no cleanup code runs
        first.wait()
    # the kernel dropped the dead run's lock: the folder is free. The dead run stopped before its first checkpoint
    # under other settings (max_steps), so resume=auto refuses its log, not its lock; resume=force starts over
    r = _train(out, "max_steps=2")
    assert r.returncode == 2 and "holds the config.yaml and metrics.csv of another run" in r.stderr, r.stderr[-2000:]
    assert "in use by another run" not in r.stderr
    r = _train(out, "max_steps=2", "resume=force")
    _ok(r)
    assert open(os.path.join(out, LOCK_FILE)).read().split()[0] != str(first.pid)


def test_a_sigterm_ends_the_run_through_its_cleanup(tmp_path):
    """DeepSpeed's launcher stops the other ranks with SIGTERM when one fails (Slurm's scancel too): the run exits
    143 through its finally blocks (the lock released, no traceback, no temporary file left), and the folder is
    free for the next run."""
    out = str(tmp_path / "run")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "TRITON_INTERPRET"):
        env.pop(k, None)
    run = Child(_args(out, "max_steps=100000", "save_every=0", "log_every=1", "progress_bar=false"), env=env)

    def training():
        deadline = time.time() + 300
        while time.time() < deadline and not os.path.isfile(os.path.join(out, "metrics.csv")):  # it is training
            assert run.poll() is None, "the run ended early"
            time.sleep(0.5)

    _, err = sigterm_when(run, training)
    assert run.returncode == 143 and "Traceback" not in err, err[-2000:]
    assert not [f for f in os.listdir(out) if ".tmp" in f]
    _ok(_train(out, "max_steps=2", "resume=force"))


# --- resume=never keeps a finished run -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(staged):
    """A finished 4-step run with checkpoints at 2 and 4 (ZeRO stage 0): the staged one, copied before use."""
    return staged(0)


def _sha(path):
    import hashlib

    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_resume_never_refuses_a_finished_run_and_force_continues(finished, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(finished, out)
    shutil.rmtree(os.path.join(out, "checkpoints"))  # e.g. deleted to save space: the adapter and metrics remain
    kept = {p: _sha(os.path.join(out, p)) for p in ("metrics.csv", "adapter/adapter_model.safetensors")}
    r = _train(out, "max_steps=4", "save_every=2", "resume=never")
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "resume=never but" in r.stderr and "adapter/" in r.stderr and "metrics.csv" in r.stderr
    assert "resume=force" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert {p: _sha(os.path.join(out, p)) for p in kept} == kept  # nothing overwritten, nothing deleted
    shutil.copytree(os.path.join(out, "adapter"), os.path.join(out, "best"))  # an earlier run's dev-selected adapter
    r = _train(out, "max_steps=4", "save_every=2", "resume=force")  # explicit intent: start over in it
    _ok(r)
    assert sorted(_losses(out)) == [1, 2, 3, 4]
    # This MNTP run keeps no best/ of its own: the earlier one is gone, not served as this run's model
    assert not os.path.exists(os.path.join(out, "best")) and "removing the earlier run's best/" in r.stdout


# --- checkpoints execute no code -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """Per ZeRO stage: a finished 4-step run with checkpoints at 2 and 4."""
    runs = {}

    def get(stage):
        if stage not in runs:
            out = str(tmp_path_factory.mktemp(f"zero{stage}") / "run")
            r = _train(out, "max_steps=4", "save_every=2", f"zero_stage={stage}")
            _ok(r)
            assert f"ZeRO stage {stage}, " in r.stdout
            runs[stage] = out
        return runs[stage]
    return get


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_every_zero_stage_resumes_exactly_through_the_restricted_loader(staged, tmp_path, stage):
    ref = staged(stage)
    out = rewind_run(ref, str(tmp_path / "run"), 2)
    files = glob.glob(os.path.join(out, "checkpoints", "step_0000002", "*.pt"))
    assert len(files) == (1 if stage == 0 else 2), files  # model states (+ ZeRO optimizer states)
    for path in files:  # every file of the tag loads with weights_only=True and the allowlist
        state = load_state_file(path, map_location="cpu")
        assert isinstance(state, dict)
        if "module" in state and stage < 3:  # the frozen base is not saved (14 GB per checkpoint at 7B): LoRA only
            assert state["module"] and all(".lora_" in k for k in state["module"]), sorted(state["module"])[:3]
    r = _train(out, "max_steps=4", "save_every=2", f"zero_stage={stage}")
    _ok(r)
    assert "resumed from step_0000002: step 2" in r.stdout
    assert _losses(out) == _losses(ref)  # steps 3 and 4 again, bit for bit
    assert _same_adapter(os.path.join(out, "adapter"), os.path.join(ref, "adapter"))


def test_an_fp16_checkpoint_of_stage_0_is_refused_as_unresumable(tmp_path, monkeypatch):
    """fp16 left stage 0 (its updates were 2^16 too small there, engine.config.FP16_STAGE0): a checkpoint an fp16
    run saved at stage 0 meets a run at stage 1, and the refusal must not say to resume with zero_stage=0, which is
    now a config error; an fp32 one still gets the usual advice."""
    import json
    import types

    import torch.distributed as dist

    from engine.checkpoint import RUN_FILE, Checkpointer
    from engine.config import ConfigError, load_config

    os.makedirs(tmp_path / "step_0000002")
    (tmp_path / "step_0000002" / RUN_FILE).write_text(json.dumps({"step": 2, "world": 1, "zero_stage": 0}))
    monkeypatch.setattr(dist, "get_world_size", lambda: 1)
    for dtype, said in (("fp16", "saved by an fp16 run at ZeRO stage 0"), ("fp32", "zero_stage=0")):
        me = types.SimpleNamespace(root=str(tmp_path), rank=0, cfg=load_config("configs/tiny/mntp.yaml", [f"model.dtype={dtype}"]),
                                   engine=types.SimpleNamespace(zero_optimization_stage=lambda: 1))
        with pytest.raises(ConfigError, match=said) as e:
            Checkpointer._check_layout(me, "step_0000002")
        assert dtype == "fp32" or "zero_stage=0" not in str(e.value)


def test_the_rank_count_rule_of_a_resume(tmp_path, monkeypatch):
    """ZeRO stages 1-3 shard the optimizer state per rank: a checkpoint of 8 ranks resumed on 4 (or 16) is refused
    in one line, at its own stage; stage 0 replicates it, so any rank count resumes a stage-0 checkpoint."""
    import json
    import types

    import torch.distributed as dist

    from engine.checkpoint import RUN_FILE, Checkpointer
    from engine.config import ConfigError, load_config

    os.makedirs(tmp_path / "step_0000002")
    cfg = load_config("configs/tiny/mntp.yaml")

    def check(saved_world, saved_stage, world, stage):
        (tmp_path / "step_0000002" / RUN_FILE).write_text(json.dumps({"step": 2, "world": saved_world,
                                                                      "zero_stage": saved_stage}))
        monkeypatch.setattr(dist, "get_world_size", lambda: world)
        me = types.SimpleNamespace(root=str(tmp_path), rank=0, cfg=cfg,
                                   engine=types.SimpleNamespace(zero_optimization_stage=lambda: stage))
        Checkpointer._check_layout(me, "step_0000002")

    for zero in (1, 2, 3):
        check(8, zero, 8, zero)  # the layout that wrote it
        for world in (4, 16, 1):
            with pytest.raises(ConfigError, match=rf"saved by 8 rank\(s\) at ZeRO stage {zero}; this run has {world} "
                                                  rf"rank\(s\) at stage {zero}.*resume with 8 rank\(s\) and "
                                                  rf"zero_stage={zero}"):
                check(8, zero, world, zero)
    for world in (8, 4, 16, 1):
        check(8, 0, world, 0)  # replicated: resumes under any rank count
    with pytest.raises(ConfigError, match="at ZeRO stage 0; this run has 4 rank"):
        check(8, 0, 4, 1)  # but not at another stage
    os.remove(tmp_path / "step_0000002" / RUN_FILE)  # a checkpoint that recorded no layout: not checked
    Checkpointer._check_layout(types.SimpleNamespace(root=str(tmp_path), rank=0, cfg=cfg, engine=None),
                               "step_0000002")


def test_a_checkpoint_of_another_zero_stage_is_refused_in_one_line(staged, tmp_path):
    """DeepSpeed's ZeRO checkpoints hold the optimizer state per rank and stage: another stage (or rank count) failed
    inside its load, and the message said to delete checkpoints that load fine as they were written."""
    out = str(tmp_path / "run")
    shutil.copytree(staged(1), out)
    shutil.rmtree(os.path.join(out, "adapter"))
    r = _train(out, "max_steps=4", "save_every=2", "zero_stage=2")
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    line = [x for x in r.stderr.strip().splitlines() if x.startswith("error:")]
    assert len(line) == 1 and "was saved by 1 rank(s) at ZeRO stage 1; this run has 1 rank(s) at stage 2" in line[0]
    assert "resume with 1 rank(s) and zero_stage=1" in line[0] and "delete" not in line[0]
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_a_file_truncated_on_one_rank_of_a_zero3_run_falls_back_on_every_rank(tmp_path):
    """ZeRO-3: each rank reads its own files. One rank's truncated file sent that rank to the agreement while the
    other went on into the load's parameter gather: a hang until the collective's timeout. Each rank now reads its
    files before DeepSpeed does and the ranks agree, so both fall back to the previous checkpoint."""
    from .helpers import deepspeed_cmd

    out = str(tmp_path / "run")
    common = ["--config", "configs/tiny/mntp.yaml", *BASE, "save_every=2", "keep_checkpoints=3", "zero_stage=3",
              f"output_dir={out}"]
    _ok(run_cmd(deepspeed_cmd(2, *common, "max_steps=6"), timeout=600))
    shutil.rmtree(os.path.join(out, "checkpoints", "step_0000006"))  # killed in step 6: the newest is step 4
    shutil.rmtree(os.path.join(out, "adapter"))
    shard, = glob.glob(os.path.join(out, "checkpoints", "step_0000004", "*zero_pp_rank_1_*optim_states.pt"))
    with open(shard, "r+b") as f:
        f.truncate(64)
    r = run_cmd(deepspeed_cmd(2, *common, "max_steps=6"), timeout=300)
    _ok(r)
    assert "fell back to step_0000002" in r.stdout and "resumed from step_0000002: step 2" in r.stdout
    assert sorted(_losses(out)) == [1, 2, 3, 4, 5, 6]
    # every checkpoint unloadable: one error line for the two ranks (each raised it), exit 2
    for tag in ("step_0000002", "step_0000004", "step_0000006"):
        shard, = glob.glob(os.path.join(out, "checkpoints", tag, "*zero_pp_rank_1_*optim_states.pt"))
        with open(shard, "r+b") as f:
            f.truncate(64)
    shutil.rmtree(os.path.join(out, "adapter"))
    r = run_cmd(deepspeed_cmd(2, *common, "max_steps=6"), timeout=300)
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "no checkpoint in" in errors[0], errors


@pytest.mark.parametrize("stage,kind", [(0, "mp_rank_00_model_states.pt"), (3, "optim_states.pt")])
def test_a_planted_pickle_fails_resume_with_exit_2_and_runs_nothing(staged, tmp_path, stage, kind):
    out = str(tmp_path / "run")
    shutil.copytree(staged(stage), out)
    shutil.rmtree(os.path.join(out, "adapter"))
    marker = str(tmp_path / "PWNED")
    planted, = [p for p in glob.glob(os.path.join(out, "checkpoints", "step_0000004", "*.pt")) if p.endswith(kind)]
    torch.save({"module": Evil(marker)}, planted)
    with pytest.raises(UnsafeCheckpointError, match=r"needs io\.open\)"):  # the loader itself, in-process
        load_state_file(planted)
    assert not os.path.exists(marker)
    r = _train(out, "max_steps=4", "save_every=2", f"zero_stage={stage}")
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    assert not os.path.exists(marker)  # the pickle's code never ran
    assert planted in r.stderr and "could run code" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "fell back" not in r.stdout and "resumed from" not in r.stdout  # no silent fallback to step 2
    assert not os.path.exists(os.path.join(out, "adapter"))


# --- killed again and again ------------------------------------------------------------------------------------------

SAVE_PHASES = ("state", "adapter", "complete", "latest")  # engine.checkpoint._fault_point


def _expected_resume(out):
    """The step a run in ``out`` resumes from: the newest complete checkpoint's (0: none)."""
    steps = [int(t[5:]) for t in os.listdir(os.path.join(out, "checkpoints"))
             if t.startswith("step_") and os.path.isfile(os.path.join(out, "checkpoints", t, "COMPLETE"))] \
        if os.path.isdir(os.path.join(out, "checkpoints")) else []
    return max(steps, default=0)


def test_a_run_killed_five_times_at_random_points_ends_exactly_like_an_uninterrupted_one(tmp_path):
    steps = ["max_steps=10", "save_every=1", "keep_checkpoints=2"]
    ref, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    _ok(_train(ref, *steps))
    rng = random.Random(2138)  # a seed whose five kills hit every save phase and a step start
    kills = []
    while len(kills) < 5:
        start = _expected_resume(out)
        # at most two steps of progress per kill, so five kills fit in the 10 steps
        if rng.random() < 0.6:  # inside the save of a checkpoint this run writes (the final one included)
            point = ("save", rng.randint(start + 1, start + 2), rng.choice(SAVE_PHASES))
            env = {"LLM2VEC_ENGINE_FAIL_IN_SAVE": f"{point[1]}:{point[2]}"}
        else:  # at the start of a step (0-based)
            point = ("step", rng.randint(start, min(start + 1, 9)))
            env = {"LLM2VEC_ENGINE_FAIL_AT_STEP": str(point[1])}
        r = _train(out, *steps, env=env)
        assert r.returncode != 0 and "fault injection" in r.stdout, (point, r.stdout[-2000:] + r.stderr[-2000:])
        if start:
            assert f"resumed from step_{start:07d}: step {start}" in r.stdout, (point, r.stdout[-2000:])
        kills.append(point)
    assert {k[2] for k in kills if k[0] == "save"} == set(SAVE_PHASES) and any(k[0] == "step" for k in kills), kills
    start = _expected_resume(out)
    r = _train(out, *steps)
    _ok(r)
    if start:
        assert f"resumed from step_{start:07d}: step {start}" in r.stdout
    assert _losses(out) == _losses(ref), kills  # every step once, each loss bit for bit
    assert _same_adapter(os.path.join(out, "adapter"), os.path.join(ref, "adapter")), kills

"""engine.distributed on a real two-rank gloo world (tests/launch.py): what one rank does or fails at, every rank
learns, so no rank waits in a collective for a rank that has left (on several nodes, until the timeout)."""
import json
import os

import pytest

from engine.distributed import free_port

from .helpers import light_launch_cmd, run_cmd

pytestmark = pytest.mark.slow

SCRIPT = """
import argparse, json, os, sys
from types import SimpleNamespace
sys.path.insert(0, os.getcwd())
import torch
from engine.config import ConfigError
from engine.distributed import every_rank_knows, from_other_rank, init_distributed, on_rank0, smallest, together
from engine.checkpoint import Checkpointer, check_shared_folder, hold_run_folder

device = init_distributed()
rank = int(os.environ["RANK"])
out = {"value": on_rank0(lambda: {"decided by": rank}), "budget": smallest(10 + 5 * rank, device)}
try:
    together(lambda: (_ for _ in ()).throw(ConfigError("rank 0's file does not read")) if rank == 0 else None)
except ConfigError as e:
    out["together"] = [str(e), from_other_rank(e), every_rank_knows(e)]
try:  # every rank fails
    together(lambda: (_ for _ in ()).throw(ConfigError(f"rank {rank}'s own error")))
except ConfigError as e:
    out["both"] = [str(e), from_other_rank(e), every_rank_knows(e)]
# checkpoints rank 1 cannot load: no state file of its own in step 2, an unsafe one (it pickles a Namespace) in step 1
ckpt = os.path.join(os.environ["WORK"], "run")
if rank == 0:
    for step in (1, 2):
        os.makedirs(os.path.join(ckpt, "checkpoints", f"step_000000{step}"))
        torch.save({"w": torch.zeros(1)}, os.path.join(ckpt, "checkpoints", f"step_000000{step}",
                                                       "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    torch.save({"args": argparse.Namespace(lr=1)}, os.path.join(ckpt, "checkpoints", "step_0000001",
                                                                "zero_pp_rank_1_mp_rank_00_optim_states.pt"))
torch.distributed.barrier()
ck = Checkpointer(SimpleNamespace(output_dir=ckpt), None, None, None, rank)
ck.engine = SimpleNamespace(device=device)  # all the agreement needs of DeepSpeed's engine
for name, tag in (("no state", "step_0000002"), ("unsafe", "step_0000001")):
    try:
        ck.resume([tag])
    except ConfigError as e:
        out[name] = [type(e).__name__, str(e), from_other_rank(e), every_rank_knows(e)]
folder = os.path.join(os.environ["WORK"], "shared" if os.environ["SHARED"] == "1" else f"rank{rank}")
os.makedirs(folder, exist_ok=True)
try:
    check_shared_folder(folder, rank)
    out["shared"] = "ok"
except ConfigError as e:
    out["shared"] = [str(e), from_other_rank(e)]
out["left"] = sorted(os.listdir(folder))
blocker = os.path.join(os.environ["WORK"], "a-file")  # rank 0 cannot make a run folder under a file
if rank == 0:
    open(blocker, "w").close()
torch.distributed.barrier()
try:
    hold_run_folder(os.path.join(blocker, "run"), rank, device)
    out["lock"] = "held"
except ConfigError as e:
    out["lock"] = [str(e), from_other_rank(e)]
with open(os.path.join(os.environ["WORK"], f"result{rank}.json"), "w") as f:
    json.dump(out, f)
torch.distributed.barrier()
torch.distributed.destroy_process_group()
"""


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "node-local"])
def test_what_one_rank_decides_or_fails_at_every_rank_learns(tmp_path, shared):
    script = tmp_path / "ranks.py"
    script.write_text(SCRIPT)
    r = run_cmd(light_launch_cmd(2, free_port(), str(script)), timeout=300,
                env={"WORK": str(tmp_path), "SHARED": "1" if shared else "0"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = {rank: json.loads((tmp_path / f"result{rank}.json").read_text()) for rank in (0, 1)}
    for rank, out in got.items():
        assert out["value"] == {"decided by": 0}  # rank 0's decision, on every rank
        assert out["budget"] == 10  # the smallest rank's budget
        # rank 0 raises its own error (from_rank None), rank 1 a copy of it that says where it came from; rank 0,
        # whose error every rank learned, says it at once (engine.train._said_once)
        assert out["together"] == ["rank 0's file does not read", None if rank == 0 else 0, rank == 0]
        # every rank failed: each raises its own error, and all but the lowest rank leave quietly on it
        assert out["both"] == [f"rank {rank}'s own error", None if rank == 0 else 0, rank == 0]
        # a checkpoint rank 1 alone cannot load: rank 0's line gives rank 1's reason, not "failed on another rank"
        kind, msg, origin, at_once = out["no state"]
        assert kind == "ConfigError" and (origin, at_once) == ((None, True) if rank == 0 else (0, False))
        assert "step_0000002 (rank 1: no state files for rank 1 in it)" in msg, msg
        # a file rank 1 alone refuses as unsafe: rank 1 names it, at once; rank 0 leaves quietly
        kind, msg, origin, at_once = out["unsafe"]
        assert kind == "UnsafeCheckpointError" and "zero_pp_rank_1_mp_rank_00_optim_states.pt" in msg, msg
        assert (origin, at_once) == ((1, False) if rank == 0 else (None, True))
        assert out["left"] == []  # the shared-folder token is removed
        # rank 0's OSError taking the lock (it hung rank 1 in the broadcast): every rank raises the config error
        assert out["lock"][1] == (None if rank == 0 else 0), out["lock"]
        assert "cannot take the run lock" in got[0]["lock"][0]
        if shared:
            assert out["shared"] == "ok"
        else:  # rank 1 does not see rank 0's token: both ranks refuse, rank 0 with rank 1's message
            msg, origin = out["shared"]
            assert "is not the folder rank 0 wrote to (rank 1" in msg and "filesystem every node shares" in msg
            assert origin == (1 if rank == 0 else None)


SRUN_TASK = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "16",
             "SLURM_PROCID": "3", "SLURM_LOCALID": "3"}  # what srun -n 16 gives its 4th task


@pytest.mark.parametrize("many, one", [
    ({"OMPI_COMM_WORLD_SIZE": "16"}, {"OMPI_COMM_WORLD_SIZE": "1"}),
    ({"PMI_SIZE": "16"}, {"PMI_SIZE": "1"}),
    # inside an `salloc -n 16` or `sbatch --ntasks=16` allocation SLURM_NTASKS is 16 for every command: a plain
    # `python engine/train.py` there is one process (it was taken for an MPI launch: mpi4py, traceback, exit 1)
    (SRUN_TASK, {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}),
], ids=["openmpi", "pmi", "srun"])
def test_an_mpi_or_slurm_launch_is_not_taken_for_a_world_of_one(monkeypatch, many, one):
    """DeepSpeed's OpenMPI, MVAPICH and Slurm runners set no RANK and leave the ranks to deepspeed's discovery:
    the engine must not make every process rank 0 of a world of one (each then took the run lock in turn). A single
    process, in a Slurm allocation of several tasks included, is a world of one."""
    import deepspeed
    import torch.distributed as dist

    from engine import distributed

    class Joined(Exception):
        pass

    def join(**kw):
        raise Joined(dict(os.environ))

    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE",
                                                              "MASTER_ADDR", "MASTER_PORT")
            and not k.startswith(("SLURM_", "OMPI_", "PMI_", "MV2_"))}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(deepspeed, "init_distributed", join)
    monkeypatch.setattr(os, "environ", dict(base, **many))  # the world of one writes RANK etc. into a copy
    with pytest.raises(Joined) as seen:
        distributed.init_distributed()
    assert "RANK" not in seen.value.args[0] and "WORLD_SIZE" not in seen.value.args[0]
    monkeypatch.setattr(os, "environ", dict(base, **one))
    with pytest.raises(Joined) as seen:
        distributed.init_distributed()
    assert (seen.value.args[0]["RANK"], seen.value.args[0]["WORLD_SIZE"]) == ("0", "1")


def test_only_rank_0_creates_the_run_folder(tmp_path, monkeypatch):
    """Rank 0 alone removes what it created when a run fails: a folder another rank made first would be left
    behind, so the other ranks only check that it could be made."""
    from engine.train import prepare_output_dir

    out = tmp_path / "a" / "run"
    monkeypatch.setenv("RANK", "1")
    assert prepare_output_dir(str(out)) == [] and not (tmp_path / "a").exists()
    monkeypatch.setenv("RANK", "0")
    assert prepare_output_dir(str(out)) == [str(out), str(tmp_path / "a")] and out.is_dir()


@pytest.mark.parametrize("outcome", ["done", "failed"])
def test_the_training_cli_leaves_the_process_group_before_it_exits(tmp_path, monkeypatch, outcome):
    """engine/train.py destroys the process group on the way out, whatever the run's outcome: left to the
    interpreter's exit, gloo's threads aborted about one two-rank run in four (SIGABRT, exit 250) after training
    had finished, once object collectives were in use (tests/launch.py runs of a script doing what a run does
    measured 2 aborts in 8 without it, 0 in 10 with it)."""
    import engine.distributed
    import engine.train

    calls = []
    monkeypatch.setattr(engine.distributed, "leave", lambda: calls.append("leave"))

    def run(cfg):
        calls.append("train")
        if outcome == "failed":
            raise RuntimeError("a rank failed")
        return 0

    monkeypatch.setattr(engine.train, "_train", run)
    args = ["--config", "configs/tiny/mntp.yaml", f"output_dir={tmp_path / 'run'}"]
    if outcome == "done":
        assert engine.train.main(args) == 0
    else:
        with pytest.raises(RuntimeError, match="a rank failed"):
            engine.train.main(args)
    assert calls == ["train", "leave"]


def test_the_trainer_plans_memory_with_the_ranks_of_this_host(tmp_path, monkeypatch):
    """The memory plan divides a host's RAM by the ranks on that host: the trainer passes
    distributed.local_world_size(world) to setup_model, so torchrun's LOCAL_WORLD_SIZE is read, not only LOCAL_SIZE."""
    import engine.train
    import engine.trainer

    class Stop(Exception):
        pass

    seen = []

    def spy(cfg, stage, model, world, local_world, device, **kw):
        seen.append((world, local_world))
        raise Stop

    from engine.distributed import free_port

    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    # as torchrun sets them for one rank of this host's three (the world of one keeps the run in this process)
    for var, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "3"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port()))):
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(engine.trainer, "setup_model", spy)
    args = ["--config", "configs/tiny/mntp.yaml", f"output_dir={tmp_path / 'run'}", "max_steps=1"]
    try:
        engine.train.main(args)
    except Stop:
        pass
    assert seen == [(1, 3)]

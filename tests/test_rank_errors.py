"""How a multi-rank run reports a failure: one line, not one per rank, without losing the line of an error only one
rank meets; which process is which rank before the process group exists; the process group's timeout."""
import os
import sys
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from .helpers import deepspeed_cmd, run_cmd


@pytest.mark.slow
def test_a_bad_input_every_rank_meets_in_the_run_is_said_once(tmp_path):
    """A check every rank makes alike once the process group exists (here the world size not dividing the batch)
    printed one line per rank: DeepSpeed's launcher, which checks its ranks once a second, let every rank print
    before it stopped them. The real launcher, not tests/launch.py, whose 20 ms poll could hide it."""
    out = tmp_path / "run"
    r = run_cmd(deepspeed_cmd(2, "--config", "configs/tiny/mntp.yaml", f"output_dir={out}", "batch_size=6",
                              launcher="deepspeed"), timeout=300)
    lines = [x for x in r.stderr.splitlines() if x.startswith(("error:", "config error:"))]
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert lines == ["error: batch_size 6 is not divisible by micro_batch_size 2 x world size 2 = 4; to keep "
                     "batch_size 6, micro_batch_size must divide 3 (batch_size / world size): one of 1, 3"], \
        r.stderr[-3000:]
    assert not out.exists()  # rank 0 removed the folder it made


def _fail_in_train(monkeypatch, err):
    import engine.train as T
    import engine.trainer

    monkeypatch.setattr(T, "check_targets_offline", lambda cfg: None)

    def train(cfg):
        raise err

    monkeypatch.setattr(engine.trainer, "train", train)
    return T._train(SimpleNamespace(output_dir="unused"))


def _marked(err, **marks):
    for k, v in marks.items():
        setattr(err, k, v)
    return err


@pytest.mark.parametrize("env, err, said, waited", [
    # local rank 0 says it at once; the host's other ranks wait for the launcher to stop them before saying theirs
    ({"RANK": "0", "LOCAL_RANK": "0"}, "plain", True, False),
    ({"RANK": "1", "LOCAL_RANK": "1"}, "plain", True, True),
    # under mpirun the same, before deepspeed's discovery has set LOCAL_RANK
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}, "plain", True, True),
    # its own error the other ranks learned and leave quietly on: said at once, or the launcher cuts it off
    ({"RANK": "1", "LOCAL_RANK": "1"}, "known", True, False),
    # another rank's error: that rank says it
    ({"RANK": "1", "LOCAL_RANK": "1"}, "copy", False, False),
], ids=["rank0", "rank1", "mpi-rank1", "rank1-known", "copy"])
def test_a_failed_rank_says_its_line_once(monkeypatch, capsys, env, err, said, waited):
    from engine.config import ConfigError
    from engine.train import LOCAL_RANK_VARS, RANK_VARS

    for var in RANK_VARS + LOCAL_RANK_VARS:
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    waits = []
    monkeypatch.setattr("engine.train.time.sleep", waits.append)
    e = {"plain": ConfigError("bad target module"), "known": _marked(ConfigError("bad target module"),
                                                                      every_rank_knows=True),
         "copy": _marked(ConfigError("bad target module"), from_rank=0)}[err]
    assert _fail_in_train(monkeypatch, e) == 2
    assert capsys.readouterr().err == ("error: bad target module\n" if said else "")
    assert waits == ([3] if waited else [])


def test_ranks_that_never_connected_are_one_line(monkeypatch, capsys):
    """A rank that ends in the checks made before the ranks connect (a data path missing on its node) leaves the
    others waiting to connect until DEEPSPEED_TIMEOUT; torch then raises DistStoreError (measured with two ranks
    and DEEPSPEED_TIMEOUT=1: "Timed out after 61 seconds waiting for clients. 1/2 clients joined."), said in one
    line, exit 1, no traceback."""
    import torch.distributed as dist

    from engine.train import LOCAL_RANK_VARS, RANK_VARS

    for var in RANK_VARS + LOCAL_RANK_VARS:
        monkeypatch.delenv(var, raising=False)
    e = dist.DistStoreError("Timed out after 61 seconds waiting for clients. 1/2 clients joined.")
    assert _fail_in_train(monkeypatch, e) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: not every rank connected: Timed out after 61 seconds waiting for clients. 1/2 "
                          "clients joined.") and len(err.strip().splitlines()) == 1, err
    with pytest.raises(dist.DistStoreError):  # another store error is no such case: its traceback stays
        _fail_in_train(monkeypatch, dist.DistStoreError("Connection refused"))


def test_a_rank_whose_peer_left_during_a_collective_is_one_line(monkeypatch, capsys):
    """SIGTERM to one rank (or its crash) leaves the other in its next collective, where gloo raises a RuntimeError
    (text as torch 2.13 raises it with two ranks, one of which exited): one line, exit 1, no traceback."""
    from engine.train import LOCAL_RANK_VARS, RANK_VARS

    for var in RANK_VARS + LOCAL_RANK_VARS:
        monkeypatch.delenv(var, raising=False)
    e = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                     "[127.0.0.1]:35996. This is typically caused by a remote worker crashing.")
    assert _fail_in_train(monkeypatch, e) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: a rank left during a collective, so this rank stops too: [/pytorch/third_party/"
                          "gloo") and len(err.strip().splitlines()) == 1, err
    assert _fail_in_train(monkeypatch, RuntimeError("[pair.cc:589] Read error [127.0.0.1]:5: Connection reset by "
                                                    "peer")) == 1  # the peer gone mid-read
    assert "a rank left during a collective" in capsys.readouterr().err
    with pytest.raises(RuntimeError):  # any other RuntimeError keeps its traceback
        _fail_in_train(monkeypatch, RuntimeError("CUDA error: an illegal memory access was encountered"))


def test_a_copy_of_another_ranks_unexpected_error_leaves_quietly(monkeypatch, capsys):
    """An error that is no bad input and no full disk (a metrics.csv rank 0 may not write, raised on every rank by
    together): its own rank shows the traceback, a copy leaves with exit 1 and nothing said."""
    e = _marked(PermissionError(13, "Permission denied", "out/metrics.csv"), from_rank=0)
    assert _fail_in_train(monkeypatch, e) == 1
    assert capsys.readouterr().err == ""
    with pytest.raises(PermissionError):
        _fail_in_train(monkeypatch, PermissionError(13, "Permission denied", "out/metrics.csv"))


@pytest.mark.parametrize("env, ranks", [
    ({}, (0, 0)),
    ({"RANK": "5", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}, (5, 1)),  # a launcher's own wins
    ({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}, (5, 1)),  # Open MPI
    ({"PMI_RANK": "5", "MPI_LOCALRANKID": "1"}, (5, 1)),  # MPICH / Intel MPI (Hydra)
    ({"MV2_COMM_WORLD_RANK": "5", "MV2_COMM_WORLD_LOCAL_RANK": "1"}, (5, 1)),  # MVAPICH
    ({"SLURM_PROCID": "5", "SLURM_LOCALID": "1"}, (5, 1)),  # srun
])
def test_a_process_knows_its_rank_before_the_process_group_exists(env, ranks):
    from engine.train import launch_ranks

    assert launch_ranks(env) == ranks


def test_only_rank_0_of_an_mpi_launch_creates_the_run_folder(tmp_path, monkeypatch):
    """Under mpirun RANK is unset until deepspeed's discovery: every process made (and a failed run's rank removed)
    the folder as rank 0."""
    from engine.train import LOCAL_RANK_VARS, RANK_VARS, prepare_output_dir

    for var in RANK_VARS + LOCAL_RANK_VARS:
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "a" / "run"
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    assert prepare_output_dir(str(out)) == [] and not (tmp_path / "a").exists()


@pytest.mark.parametrize("env, launched", [
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SLURM_NNODES": "1"}, False),  # an salloc -n 8 shell
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}, False),  # sbatch's script
    ({"SLURM_NTASKS": "8", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}, False),  # srun -n 1
    ({"SLURM_NTASKS": "8", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "3"}, True),  # srun -n 8
    ({"OMPI_COMM_WORLD_SIZE": "8"}, True),
    ({"PMI_SIZE": "8"}, True),
    ({"PMI_SIZE": "1"}, False),
])
def test_only_a_task_srun_or_mpirun_launched_is_one_of_several(env, launched):
    from engine.distributed import launched_by_mpi

    assert launched_by_mpi(env) is launched


def test_the_collective_timeout_is_deepspeeds_variable_30_minutes_unless_set():
    from datetime import timedelta

    from engine.config import ConfigError
    from engine.distributed import collective_timeout

    assert collective_timeout({}) == timedelta(minutes=30)
    assert collective_timeout({"DEEPSPEED_TIMEOUT": "90"}) == timedelta(minutes=90)
    for bad in ("", "abc", "0", "-5", "1.5"):  # DeepSpeed's own int() fails its import on "", "abc" and "1.5"
        with pytest.raises(ConfigError, match="DEEPSPEED_TIMEOUT=.*whole number of minutes"):
            collective_timeout({"DEEPSPEED_TIMEOUT": bad})


def test_the_process_group_gets_the_timeout(monkeypatch):
    import deepspeed
    import torch.distributed as dist

    from engine import distributed

    class Joined(Exception):
        pass

    def join(**kw):
        raise Joined(kw)

    monkeypatch.setattr(os, "environ", dict(os.environ, DEEPSPEED_TIMEOUT="45"))  # the world of one writes here
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(deepspeed, "init_distributed", join)
    with pytest.raises(Joined) as seen:
        distributed.init_distributed()
    assert seen.value.args[0]["timeout"].total_seconds() == 45 * 60


def _data_parallel_group_timeout():
    """(tests.run_check) Join a world of one as a run does; 0 when DeepSpeed's data-parallel group has the world's
    timeout (DEEPSPEED_TIMEOUT)."""
    from deepspeed.utils import groups

    from engine import distributed

    distributed.init_distributed()
    seen = {name: g._get_backend(torch.device("cpu")).options._timeout
            for name, g in (("world", dist.group.WORLD), ("data parallel", groups._get_data_parallel_group()))}
    print(seen)
    distributed.leave()
    if groups._WORLD_GROUP is not None:  # the destroyed world's copy would be a later world's group
        return 2
    return 0 if set(seen.values()) == {timedelta(minutes=int(os.environ["DEEPSPEED_TIMEOUT"]))} else 1


def test_deepspeeds_data_parallel_group_gets_the_timeout_too():
    """DeepSpeed reduces gradients on its own copy of the world, made by ``new_group`` with torch's default
    timeout (10 minutes under NCCL, 30 under gloo) whatever the world's was. 45 minutes tells the two apart on
    gloo: before the engine made that copy itself, the world had 45 and the data-parallel group 30."""
    r = run_cmd([sys.executable, "-m", "tests.run_check", "tests.test_rank_errors:_data_parallel_group_timeout"],
                env={"DEEPSPEED_TIMEOUT": "45"}, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_bad_timeout_is_one_line_before_the_run_starts(tmp_path, monkeypatch, capsys):
    import engine.train

    monkeypatch.setenv("DEEPSPEED_TIMEOUT", "ten")
    monkeypatch.setattr(engine.train, "_train", lambda cfg: pytest.fail("the run started"))
    out = tmp_path / "run"
    assert engine.train.main(["--config", "configs/tiny/mntp.yaml", f"output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: DEEPSPEED_TIMEOUT='ten'") and len(err.splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["other-data", "bad-data", "bad-model"])
def test_ranks_that_read_different_data_under_the_same_paths_are_refused(tmp_path, case):
    """Each rank reads the data itself; nodes with different copies under one path (here each rank's working folder
    holds its own corpus.txt) would each draw its share of a different batch plan. Refused on every rank before the
    model loads: exit 2, one line naming both ranks' item counts. A data file or model folder that one node alone
    cannot read (not UTF-8; a cut weights file): that rank's error reaches the other, which waited in the next
    collective (on NCCL until its timeout, on gloo a traceback when the failed rank left): one line, exit 2 on
    both."""
    from engine.config import ModelConfig
    from engine.distributed import free_port
    from engine.modeling import load_tokenizer

    from .helpers import ROOT, run_ranks
    from .launch import rank_commands
    from .test_encoder import _save_base

    lines = [f"sentence number {i} about something" for i in range(40)]
    for rank in (0, 1):
        (tmp_path / f"node{rank}").mkdir()
        if rank == 1 and case == "other-data":  # as many lines, one of them another: the content hash tells them apart
            lines[7] = "a sentence that the other node's copy does not hold"
        data = b"sentence one\n\xff\xfe\n" if rank == 1 and case == "bad-data" else ("\n".join(lines) + "\n").encode()
        (tmp_path / f"node{rank}" / "corpus.txt").write_bytes(data)
    model_args = []
    if case == "bad-model":  # the same base on both nodes, its weights file cut short on node 1
        tok = load_tokenizer(ModelConfig(name_or_path="smollm2-135m"))
        for rank in (0, 1):
            _save_base(str(tmp_path / f"node{rank}" / "model"), tok)
        weights = tmp_path / "node1" / "model" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:20000])
        model_args = ["model.random_init=null", "model.name_or_path=model", "model.tokenizer=smollm2-135m"]
    out = tmp_path / "run"
    args = ["--config", os.path.join(ROOT, "configs", "tiny", "simcse.yaml"), f"output_dir={out}",
            "data=corpus.txt", "eval_data=[]", "eval_every=0", "max_steps=2", "batch_size=8", "micro_batch_size=4",
            *model_args]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONUNBUFFERED"] = "1"
    results = run_ranks(rank_commands(2, free_port(), os.path.join(ROOT, "engine", "train.py"), args, env),
                        [tmp_path / "node0", tmp_path / "node1"], timeout=300)
    err = "".join(se for _, _, se in results)
    said = [x for x in err.splitlines() if x.startswith("error:")]
    assert [rc for rc, _, _ in results] == [2, 2], err[-3000:]
    assert len(said) == 1, err[-3000:]
    if case == "bad-data":
        assert "corpus.txt:2" in said[0] and "UTF-8" in said[0], said
    elif case == "bad-model":
        assert "could not load the model 'model'" in said[0] and "SafetensorError" in said[0], said
    else:
        assert "the ranks read different data under the same paths" in said[0], said
        assert "rank 0 on " in said[0] and "rank 1 on " in said[0] and said[0].count(": 40 items") == 2, said
    assert "Traceback" not in err

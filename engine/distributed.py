"""The process group: a world of one or DeepSpeed's launcher, CPU thread sharing, and rank-0 logging.

``init_distributed`` joins the world (NCCL on GPU, gloo on CPU) and returns this rank's device. On CPU every rank
gets ``cores / local ranks`` intra-op threads (``engine.multi_device.share_cpu_cores``) and unlinks DeepSpeed's
shm-allreduce segment once every peer mapped it, so no run leaves shared memory behind.
"""
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from .multi_device import share_cpu_cores


def log0(*a):
    """Print on rank 0 (or before the world exists)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print("[engine]", *a, flush=True)


def warn0(rank, msg):
    """A warning line on rank 0."""
    if rank == 0:
        print(f"[engine] warning: {msg}", flush=True)


def _portable(err):
    """``err`` if it pickles (to reach the other ranks), else a RuntimeError with its text."""
    import pickle

    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        return RuntimeError(f"{type(err).__name__}: {err}")


def together(fn):
    """``fn()`` on every rank, with one collective after it: when it raised on any rank it raises on every rank
    (the lowest failed rank its own error, marked :func:`every_rank_knows`; every other rank, failed or not, marked
    ``from_rank`` with that rank: its own error or a copy of the lowest failed rank's), so no
    rank goes on into a collective that a failed rank never reaches (on several nodes that hang lasts until
    the collective's timeout). For the work only rank 0 does (file reads and writes in ``output_dir``):
    ``together(lambda: work() if rank == 0 else None)``. Returns what ``fn`` returned on this rank."""
    result, err = None, None
    try:
        result = fn()
    except Exception as e:
        err = e
    if not dist.is_initialized() or dist.get_world_size() == 1:
        if err is not None:
            raise err
        return result
    errs = [None] * dist.get_world_size()
    dist.all_gather_object(errs, None if err is None else _portable(err))
    failed = next((r for r, e in enumerate(errs) if e is not None), None)
    if failed is None:
        return result
    if err is not None:
        if failed == dist.get_rank():
            err.every_rank_knows = True  # the others leave quietly: this rank says it without delay
        else:  # a lower rank failed too: it says the run's error, this rank leaves quietly
            err.from_rank = failed
        raise err
    other = errs[failed]
    other.from_rank = failed
    raise other


def on_rank0(fn):
    """``fn()`` on rank 0 only, its result given to every rank (one broadcast); its error raised on every rank
    as :func:`together` raises it. For a decision every rank must share (what the run resumes)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fn()
    out = [together(lambda: fn() if dist.get_rank() == 0 else None)]
    dist.broadcast_object_list(out, src=0)
    return out[0]


def gathered(value):
    """Every rank's ``value`` (picklable), in rank order, on every rank: one all-gather (``[value]`` without a
    process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def smallest(value, device):
    """The smallest of every rank's ``value`` (a number), on every rank: one all-reduce."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return type(value)(t.item())


def said_by_rank0(err, rank):
    """``err``, raised alike on every rank (the same input, one decision): rank 0 says it, the others carry
    ``from_rank`` and exit quietly, so a refusal on 8 ranks is one line, not 8."""
    if rank != 0:
        err.from_rank = 0
    else:
        err.every_rank_knows = True
    return err


def from_other_rank(err):
    """The rank an error re-raised by :func:`together` came from (None: this rank's own)."""
    return getattr(err, "from_rank", None)


def every_rank_knows(err):
    """Whether ``err`` is this rank's own error that every other rank learned in a collective (:func:`together`,
    :func:`said_by_rank0`) and leaves quietly on: this rank must say it at once, not after the wait that keeps a
    bad input met on every rank to one line (``engine.train._said_once``), which the launcher cuts short."""
    return getattr(err, "every_rank_knows", False)


def free_port():
    """A TCP port the OS reports free on the loopback interface (for a world of one)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _unlink_shm_allreduce_segment():
    """DeepSpeed's CPU accelerator gives each rank a POSIX shared-memory segment of about 69 MB for its shm
    allreduce (/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>) and never unlinks
    it, so every CPU run left 69 MB per rank in RAM-backed /dev/shm until reboot (hundreds of runs filled a
    24 GiB machine). Each rank maps its peers' segments inside init_distributed; after a barrier all mappings
    exist, so each rank unlinks its own name. The mappings stay valid until the process exits, and nothing is
    left behind even by a killed run."""
    dist.barrier()
    name = "deepspeed_allreduce_buffer_{}_{}_{}_{}".format(
        os.getuid(), os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""), dist.get_rank())
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:  # no shm allreduce (ranks on several hosts, or an op build without it)
        pass


# What MPI launchers set instead of RANK (DeepSpeed's OpenMPI, MVAPICH and Slurm runners leave the ranks to
# deepspeed.init_distributed's discovery)
MPI_WORLD_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_by_mpi(env=None):
    """True when an MPI launcher or srun started more than one process (no RANK: DeepSpeed discovers them).

    Slurm counts by the task srun launched (SLURM_PROCID, SLURM_STEP_NUM_TASKS, which only srun sets), not by
    SLURM_NTASKS: that one is set throughout an ``salloc -n 8`` or ``sbatch --ntasks=8`` allocation, where a plain
    ``python engine/train.py`` is one process (taken for an MPI launch, DeepSpeed imported mpi4py and failed)."""
    env = os.environ if env is None else env

    def more_than_one(var):
        try:
            return int(env.get(var, "1")) > 1
        except ValueError:
            return False

    if any(more_than_one(var) for var in MPI_WORLD_SIZE_VARS):
        return True
    return "SLURM_PROCID" in env and more_than_one("SLURM_STEP_NUM_TASKS")


TIMEOUT_VAR = "DEEPSPEED_TIMEOUT"  # DeepSpeed's own name for it: one setting for both
DEFAULT_TIMEOUT_MIN = 30


def collective_timeout(env=None):
    """How long a collective waits for the slowest rank before the run fails: ``DEEPSPEED_TIMEOUT`` minutes (a whole
    number >= 1), 30 when unset (DeepSpeed's own default is 10). A first run on several nodes can keep one node
    longer than 10 minutes in model setup (a model download or GGUF conversion into a node-local cache) while the
    others wait in a collective; raise it further for a slower first download. Raises ConfigError for a value that
    is not one (DeepSpeed's import would fail on it with a traceback)."""
    from .config import ConfigError

    raw = (os.environ if env is None else env).get(TIMEOUT_VAR)
    if raw is None:
        return timedelta(minutes=DEFAULT_TIMEOUT_MIN)
    try:
        minutes = int(raw)
    except ValueError:
        minutes = 0
    if minutes < 1:
        raise ConfigError(f"{TIMEOUT_VAR}={raw!r}: the collective timeout must be a whole number of minutes, at "
                          f"least 1 (unset: {DEFAULT_TIMEOUT_MIN})")
    return timedelta(minutes=minutes)


def init_distributed():
    """Join (or create) the process group; returns this rank's device. Its collectives time out after
    :func:`collective_timeout` (``DEEPSPEED_TIMEOUT`` minutes, 30 when unset)."""
    timeout = collective_timeout()  # before DeepSpeed's import, which reads DEEPSPEED_TIMEOUT too
    import deepspeed

    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ and not launched_by_mpi():  # plain `python engine/train.py`: a world of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1")
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False, timeout=timeout)
        _deepspeed_world_group(timeout)
        if not cuda:
            _unlink_shm_allreduce_segment()
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    split_cpu_threads()
    return torch.device("cpu")


def _deepspeed_world_group(timeout):
    """DeepSpeed's data-parallel group, which its gradient reduction and ZeRO's collectives use, is a copy of the
    world that it makes with ``torch.distributed.new_group(ranks)``: torch's default timeout, 10 minutes under
    NCCL, whatever the world was given. Made here first, with the world's timeout, so every collective of a run
    waits ``DEEPSPEED_TIMEOUT`` minutes. A DeepSpeed without that copy (``deepspeed.utils.groups._WORLD_GROUP``,
    read by ``_clone_world_group``) is an error here, not a silent 10 minutes."""
    from deepspeed.utils import groups

    if not hasattr(groups, "_clone_world_group") or not hasattr(groups, "_WORLD_GROUP"):
        raise RuntimeError("engine.distributed: this DeepSpeed has no deepspeed.utils.groups._WORLD_GROUP; its "
                           "data-parallel group's timeout cannot be set")
    if groups._WORLD_GROUP is None:
        groups._WORLD_GROUP = dist.new_group(ranks=list(range(dist.get_world_size())), timeout=timeout)


def leave():
    """Destroy the process group, if there is one, before the process exits. Without it, gloo's threads met the
    interpreter's exit: about one run in four ended in "terminate called without an active exception" (SIGABRT,
    exit 250 through the launcher) after training had finished, once the run used object collectives
    (:func:`together`, :func:`on_rank0`)."""
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # leaving anyway; a failed run's error is already reported
            pass
        groups = getattr(sys.modules.get("deepspeed.utils"), "groups", None)
        if groups is not None:  # DeepSpeed's copy of the world went with it; a later world makes its own
            groups._WORLD_GROUP = None


def local_world_size(default=None):
    """The ranks on this host: LOCAL_SIZE (DeepSpeed's launcher) or LOCAL_WORLD_SIZE (torchrun), else ``default``,
    else WORLD_SIZE (one host), else 1."""
    for var in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE"):
        if os.environ.get(var):
            return int(os.environ[var])
    return int(default if default is not None else os.environ.get("WORLD_SIZE") or 1)


def split_cpu_threads():
    """CPU ranks share this host's cores (engine.multi_device.share_cpu_cores): DeepSpeed's launcher, unlike
    torchrun, sets no OMP_NUM_THREADS, so every rank would otherwise run one thread per core."""
    local_ranks = local_world_size()
    shared = share_cpu_cores(local_ranks)
    if shared:
        log0(f"CPU: {local_ranks} ranks on {shared[0]} cores, {shared[1]} intra-op thread(s) per rank "
             "(set OMP_NUM_THREADS to choose)")

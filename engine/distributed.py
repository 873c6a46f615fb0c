"""The process group: a world of one or DeepSpeed's launcher, CPU thread sharing, and rank-0 logging.

``init_distributed`` joins the world (NCCL on GPU, gloo on CPU) and returns this rank's device. On CPU every rank
gets ``cores / local ranks`` intra-op threads (``engine.multi_device.share_cpu_cores``) and unlinks DeepSpeed's
shm-allreduce segment once every peer mapped it, so no run leaves shared memory behind.
"""
import os

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


def init_distributed():
    """Join (or create) the process group; returns this rank's device."""
    import deepspeed

    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:  # plain `python engine/train.py`: a world of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1")
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
        if not cuda:
            _unlink_shm_allreduce_segment()
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    split_cpu_threads()
    return torch.device("cpu")


def split_cpu_threads():
    """CPU ranks share this host's cores (engine.multi_device.share_cpu_cores): DeepSpeed's launcher, unlike
    torchrun, sets no OMP_NUM_THREADS, so every rank would otherwise run one thread per core."""
    local_ranks = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE")
                      or os.environ.get("WORLD_SIZE") or 1)
    shared = share_cpu_cores(local_ranks)
    if shared:
        log0(f"CPU: {local_ranks} ranks on {shared[0]} cores, {shared[1]} intra-op thread(s) per rank "
             "(set OMP_NUM_THREADS to choose)")

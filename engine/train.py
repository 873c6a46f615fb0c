"""Train one LLM2Vec stage.

    deepspeed [--num_gpus N | --hostfile H] engine/train.py --config configs/X.yaml [key=value ...]
    python engine/train.py --config configs/X.yaml [key=value ...]        # one process
    python engine/train.py --config configs/X.yaml --dry-run              # the plan at full size, no weights
    python engine/train.py --config configs/X.yaml --print-config         # the resolved config as YAML

Exit codes: 0 done; 2 bad input (config, data, model, an output_dir that cannot be a run folder or that another
live run holds, a different run in output_dir, a checkpoint file that could run code, a full disk), one line on
stderr; 3 the run diverged (max_nonfinite_steps non-finite steps in a row).
A run that fails leaves no empty output_dir (nor empty parents) that it created behind.
"""
import argparse
import os
import signal
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: make the repo importable without installing it
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.cli import (ArgumentParser, disk_full_message, error_line, fail, missing_folders,  # noqa: E402
                        remove_empty)
from engine.config import ConfigError, check_model_names, load_config  # noqa: E402


def check_targets_offline(cfg):
    """lora.target_modules against the meta-built architecture, before any weight loads. Skipped (the load
    checks it) when the architecture is not available offline."""
    from engine.modeling import ModelLoadError, architecture_config, check_lora_targets, meta_model

    try:
        arch, _ = architecture_config(cfg.model)
    except (ModelLoadError, FileNotFoundError, OSError):
        return
    if cfg.model.bidirectional:
        from engine.bidirectional import check_architecture

        check_architecture(arch)  # an unsupported family is named as such (exit 2), before its modules are
    try:
        model = meta_model(arch)
        check_lora_targets(cfg.lora, model)
        check_base_fits_gpu(cfg, model)
        if cfg.lora.enabled and cfg.model.fused_ops == "triton":  # a group's rank that one tile cannot hold
            from engine.lora import fuse_lora
            from engine.modeling import add_lora

            fuse_lora(add_lora(model, cfg.lora), "triton")
    except ValueError as e:
        raise ConfigError(str(e)) from None



def check_base_fits_gpu(cfg, model, device_bytes=None):
    """ConfigError when the base's weights (``model``: the meta-built architecture) in the run's dtype exceed this
    rank's GPU (``device_bytes``: its total memory; on a machine without CUDA nothing is checked):
    ``engine.memory.base_too_big``, said before any weight loads rather than as an out-of-memory error after."""
    import torch

    from engine.memory import base_too_big
    from engine.modeling import torch_dtype

    if device_bytes is None:
        if not torch.cuda.is_available():
            return
        local = launch_ranks()[1] % max(torch.cuda.device_count(), 1)
        device_bytes = torch.cuda.get_device_properties(local).total_memory
    dtype = torch_dtype(cfg.model.dtype, "cuda")
    weights = sum(p.numel() for p in model.parameters()) * torch.empty((), dtype=dtype).element_size()
    too_big = base_too_big(weights, device_bytes, str(dtype).replace("torch.", ""))
    if too_big:
        raise ConfigError(too_big)


# Where launchers put this process's rank, and its rank on its host, before the process group exists: DeepSpeed's
# launcher and torchrun set RANK and LOCAL_RANK; under mpirun or srun only deepspeed.init_distributed's discovery
# sets those, so before it every process took itself for rank 0 (each one creating output_dir, each saying a line)
RANK_VARS = ("RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID")
LOCAL_RANK_VARS = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID",
                   "SLURM_LOCALID")


def launch_ranks(env=None):
    """(rank, local rank) of this process as its launcher set them; (0, 0) for a process of its own."""
    env = os.environ if env is None else env

    def first(names):
        for name in names:
            try:
                return int(env[name])
            except (KeyError, ValueError):
                pass
        return 0

    return first(RANK_VARS), first(LOCAL_RANK_VARS)


def prepare_output_dir(path):
    """Create the run's folder (and its parents) now, before any data or model loads, and check that it can be
    written (``engine.config.check_output_dir`` has refused '', a file and a dangling link already); returns the
    folders created, for ``remove_empty`` when the run fails. Raises ConfigError.

    Only rank 0 creates it (it alone removes what it created, so a folder another rank made first would outlive a
    failed run); the other ranks check that it could be made (the nearest existing folder is writable), and the
    run checks later that they see the one rank 0 made (``engine.checkpoint.check_shared_folder``)."""
    if launch_ranks()[0] != 0:
        existing = os.path.abspath(path)
        while not os.path.isdir(existing) and os.path.dirname(existing) != existing:
            existing = os.path.dirname(existing)
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"output_dir {path} cannot be written: {existing} is not writable")
        return []
    created = missing_folders(path)
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        remove_empty(created)
        raise ConfigError(f"output_dir {path} cannot be written: {e.strerror or e}") from None
    return created


CONFIG_ERROR = "config error"  # what a line about the config file itself (its keys, values, names) starts with


SAY_ONCE_WAIT_S = 3


def _said_once(line, at_once=False):
    """A bad input is as a rule the same on every rank of a host (one config, one filesystem), before the process
    group exists and after it (a check every rank makes alike): the host's first rank (local rank 0) says it at once,
    and the launcher then stops the other ranks (it stops every rank once one has failed; DeepSpeed's checks once a
    second) while they wait 3 s before saying theirs: 8 GPUs print one line, not 8, and an error only another rank
    meets (rank 0 going on) is still said. ``at_once``: this rank's own error that the other ranks learned in a
    collective and leave quietly on (``engine.distributed.every_rank_knows``): the launcher would stop this rank
    in the wait, and the run's one line with it."""
    if not at_once and launch_ranks()[1] != 0:
        time.sleep(SAY_ONCE_WAIT_S)
    print(line, file=sys.stderr)
    return 2


def main(argv=None):
    ap = ArgumentParser(prog="engine/train.py", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML run config")
    ap.add_argument("--dry-run", action="store_true",
                    help="build the model at full size on the meta device, print the memory plan, ZeRO stage, "
                         "recompute policy and one micro-batch's shapes, and exit (no weights, data or tokenizer)")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config (YAML) and exit")
    ap.add_argument("--world", type=int, default=None,
                    help="--dry-run: ranks to plan for (default: the most of 8, 4, 2, 1 the batch divides into)")
    ap.add_argument("--gpu-memory-gb", type=float, default=None,
                    help="--dry-run: memory per GPU in GiB when the config sets no memory_budget_gb (default 79.65, "
                         "what an 80 GB H100 reports)")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    ap.add_argument("overrides", nargs="*", help="key=value overrides, dotted for sections (lora.r=8)")
    args = ap.parse_intermixed_args(argv)  # overrides before and after flags alike
    planned = [flag for flag, value in (("--world", args.world), ("--gpu-memory-gb", args.gpu_memory_gb))
               if value is not None]
    if planned and not args.dry_run:  # a training run would ignore them: the launcher sets the ranks
        return _said_once(error_line(f"{' and '.join(planned)} {'apply' if len(planned) > 1 else 'applies'} to "
                                     f"--dry-run only (a training run takes its ranks from the launcher and its "
                                     f"memory from the GPU)"))
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        return _said_once(error_line(e, CONFIG_ERROR))
    if args.print_config:
        from engine.config import printable

        print(printable(cfg), end="")
        return 0
    if args.dry_run:
        from engine.bidirectional import UnsupportedArchitectureError
        from engine.dry_run import dry_run
        from engine.modeling import ModelLoadError

        try:
            dry_run(cfg, world=args.world, gpu_memory_gb=args.gpu_memory_gb)
        except (ConfigError, UnsupportedArchitectureError, ModelLoadError, OSError, ValueError) as e:
            return fail(e)  # OSError: a file the plan reads (a config.json, a shipped architecture) cannot be read
        return 0
    if not cfg.lora.enabled:  # the run would train, then fail to save: what it writes and every reader are LoRA's
        return _said_once(error_line("lora.enabled=false (full fine-tuning) is planned by --dry-run only: a run "
                                     "trains and saves LoRA adapters, which the encoder, the export and engine.pick "
                                     "read; set lora.enabled=true", CONFIG_ERROR))
    from engine.data import DataError, check_sources  # no torch: a mistyped path is said before the imports

    try:
        # (a dry run reads no data, so it does not need the files)
        e5 = cfg.stage == "supervised" and cfg.contrastive.loss == "infonce"  # the one reader of E5 folders
        check_sources(cfg.data + cfg.eval_data, e5_folders=e5)
    except DataError as e:
        return _said_once(error_line(e))
    try:
        from engine.metrics import check_logger

        check_model_names(cfg)
        check_logger(cfg)  # TensorBoard asked for and not installed: here, not after the model has loaded
    except ConfigError as e:
        return _said_once(error_line(e, CONFIG_ERROR))
    from engine.distributed import collective_timeout  # imports torch, as the run does next

    try:
        collective_timeout()  # a bad DEEPSPEED_TIMEOUT: one line here, not DeepSpeed's traceback at its import
    except ConfigError as e:
        return _said_once(error_line(e))
    try:
        created = prepare_output_dir(cfg.output_dir)
    except ConfigError as e:
        return _said_once(error_line(e, CONFIG_ERROR))
    # DeepSpeed's launcher stops the other ranks with SIGTERM when one fails, as Slurm's scancel does: run the
    # finally blocks (the run lock, an empty folder, temporary files), exit 128 + 15 as the default action would
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return _train(cfg)
    finally:
        from engine.distributed import leave

        leave()  # the process group goes before the interpreter does (engine.distributed.leave says why)
        if launch_ranks()[0] == 0:
            remove_empty(created)  # nothing written (a failed run): no empty folder left behind


# gloo's words for a collective whose peer process is gone
PEER_LOST = ("Connection closed by peer", "Connection reset by peer")


def _train(cfg):
    from engine.bidirectional import UnsupportedArchitectureError
    from engine.data import DataError
    from engine.modeling import ModelLoadError
    from engine.trainer import NonFiniteError, train

    try:
        check_targets_offline(cfg)
        train(cfg)
    except (DataError, ConfigError, UnsupportedArchitectureError, ModelLoadError, FileNotFoundError) as e:
        return _report(e, error_line(e), 2)
    except NonFiniteError as e:  # a diverged run: exit 3, distinct from bad input
        return _report(e, error_line(e), 3)
    except Exception as e:  # a full disk during a checkpoint, the resume or the adapter write (safetensors' own error)
        msg = disk_full_message(e, cfg.output_dir)
        if msg is None:
            from engine.distributed import from_other_rank

            if from_other_rank(e) is not None:  # another rank's error (together): its traceback is that rank's
                return 1
            if isinstance(e, RuntimeError) and any(m in str(e) for m in PEER_LOST):
                # a collective whose peer left (another rank ended: its own line says why, or it was killed)
                return _report(e, error_line(f"a rank left during a collective, so this rank stops too: "
                                             f"{str(e).strip().splitlines()[0]}"), 1)
            if type(e).__name__ == "DistStoreError" and "waiting for clients" in str(e):
                # ranks that never connected: one ended in the checks before (its own line says why)
                return _report(e, error_line(f"not every rank connected: {str(e).strip()} (DEEPSPEED_TIMEOUT "
                                             f"minutes); a rank that ended before connecting says why"), 1)
            raise
        return _report(e, msg, 2)
    return 0


def _report(err, line, code):
    """Say ``line`` for a run that failed on ``err`` once, not once per rank, and return ``code``. A copy of another
    rank's error (``engine.distributed.together``) is that rank's to say; this rank's own error that the other ranks
    learned is said at once; any other error may be met alike by every rank (a mistyped lora.target_modules, a batch
    the world size does not divide, a bad file every rank reads): ``_said_once`` (one line per host)."""
    from engine.distributed import every_rank_knows, from_other_rank

    if from_other_rank(err) is None:
        _said_once(line, at_once=every_rank_knows(err))
    return code


def exit_with(code):
    """End the process with ``code``. A rank of a multi-rank run leaves through ``os._exit`` once ``main`` has
    returned (its files written and closed, the process group destroyed, stdout and stderr flushed here): the
    interpreter's own exit ran the C++ destructors of communication threads still alive (gloo, DeepSpeed's CPU ops),
    and a rare run aborted there after training had finished ("terminate called without an active exception",
    exit 250), once in this CI's ~40 multi-rank runs even after engine.distributed.leave."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_with(main())

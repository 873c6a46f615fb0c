"""Checkpoints, adapters and the run's identity: what a run writes to ``output_dir`` and how it resumes.

``<output_dir>/checkpoints/step_NNNNNNN/`` holds DeepSpeed's state (for resume), ``adapter/`` (the LoRA adapter in
PEFT format, safetensors) and ``run.json`` (the run's fingerprint and step). After every rank finished writing,
rank 0 marks it ``COMPLETE`` and then replaces ``checkpoints/latest`` atomically, so a run killed mid-save resumes
from the previous checkpoint. Only complete checkpoints are resumed, only one of the same run (same fingerprint)
unless ``resume=force``, and a missing, dangling or unloadable ``latest`` falls back to the newest complete
checkpoint with a warning, never to step 0. ``best/`` keeps the adapter with the highest dev STS Spearman; each
checkpoint keeps best/ as of its step (``best/``, hard links, recorded in run.json), which a resume puts back. A file
write that fails inside DeepSpeed's save on one rank ends every rank after its closing barrier (``_writes_kept``).

The run folder has one owner: rank 0 holds an exclusive ``flock`` on ``<output_dir>/run.lock`` (holder's pid and host
written inside) for the whole run; the kernel drops it when the process ends, however it ends. Checkpoint files are
read with ``torch.load(weights_only=True)`` and an explicit allowlist of the types DeepSpeed stores
(``checkpoint_globals``), DeepSpeed's own loads included: a file that needs anything else is refused, never unpickled.
"""
import contextlib
import fcntl
import json
import math
import os
import pickle
import re
import shutil
import signal
import socket

import torch
import torch.distributed as dist

from . import refs
from .config import ConfigError, load_config, to_dict
from .data import EVAL_STS_ORDER, sts_eval_pairs, sts_eval_pairs_are_the_first
from .distributed import log0, on_rank0, said_by_rank0, together, warn0
from .encoding import TEXT_FORMAT, training_wrap
from .files import share_safetensors, sync_file, sync_folder, sync_tree, write_json, write_text
from .modeling import resolve_model_path, save_encoder_meta
from .stages.base import EVAL_LOSS_RULE


# What defines a run: a checkpoint resumes only under a config with the same values for these keys.
FINGERPRINT_KEYS = (
    "stage", "model.name_or_path", "model.gguf_file", "model.tokenizer", "model.random_init", "model.dtype",
    "model.bidirectional", "model.attention_dropout", "model.adapters", "lora", "mntp", "contrastive",
    "data", "max_samples", "max_seq_len", "seed", "batch_size", "micro_batch_size", "learning_rate",
    "weight_decay", "adam_betas", "warmup_steps", "lr_schedule", "max_steps", "max_grad_norm",
)
_PATH_KEYS = ("model.adapters", "data")


def _abs_source(s):
    return s if s.startswith("hf:") else os.path.realpath(s)


def fingerprint(cfg) -> dict:
    """The run's identity as a flat JSON-able dict (local data and adapter paths made absolute)."""
    d = to_dict(cfg)
    out = {}
    for key in FINGERPRINT_KEYS:
        v = d
        for part in key.split("."):
            v = v[part]
        if key in _PATH_KEYS:
            v = [_abs_source(x) for x in v]
        if isinstance(v, dict) and key in ("lora", "mntp", "contrastive"):
            out.update({f"{key}.{k}": x for k, x in v.items()})
        else:
            out[key] = v
    if cfg.lr_decay_steps:  # only when set: runs from before the key keep their fingerprint
        out["lr_decay_steps"] = cfg.lr_decay_steps
    if cfg.lr_decay_epochs:
        out["lr_decay_epochs"] = cfg.lr_decay_epochs
    if out.get("mntp.pack") is True:  # only when off: runs from before the key (all packed) keep their fingerprint
        del out["mntp.pack"]
    if out.get("contrastive.mask_false_negatives") is False:  # only when on: runs from before the key (none masked)
        del out["contrastive.mask_false_negatives"]  # keep their fingerprint
    if cfg.stage == "mntp":  # the contrastive section does not act on an MNTP run, nor mntp on a contrastive one
        out = {k: v for k, v in out.items() if not k.startswith("contrastive.")}
    else:
        out = {k: v for k, v in out.items() if not k.startswith("mntp.")}
    return _acting(out)


def _acting(fp):
    """``fp`` less the keys that do not act on its stage: max_seq_len is MNTP's alone (a contrastive stage cuts
    texts at contrastive.max_len). Checkpoints saved before it was left out still carry it: dropped here too, so
    they resume."""
    if fp.get("stage", "mntp") != "mntp" and "max_seq_len" in fp:
        fp = {k: v for k, v in fp.items() if k != "max_seq_len"}
    return fp


def _compared(key, value):
    """A fingerprint value as runs are compared: ``lora.target_modules`` as the projections it adapts
    (:func:`engine.bidirectional.lora_target_parts`: order aside, a fused module as its parts: ``[qkv_proj, ...]``
    and ``[q_proj, k_proj, v_proj, ...]`` are one Phi3 adapter), the rest as JSON reads it."""
    from .bidirectional import lora_target_parts

    if key == "lora.target_modules" and isinstance(value, list) and all(isinstance(t, str) for t in value):
        return lora_target_parts(value)
    return json_normal(value)


def fingerprint_diff(saved: dict, current: dict) -> list:
    """[(key, saved value, current value)] for every key that differs (keys that do not act on the stage aside)."""
    saved, current = _acting(saved), _acting(current)
    keys = sorted(set(saved) | set(current))
    return [(k, saved.get(k, "<unset>"), current.get(k, "<unset>")) for k in keys
            if _compared(k, saved.get(k, "<unset>")) != _compared(k, current.get(k, "<unset>"))]


def diff_listing(diff, then, now, most=None):
    """``key: saved THEN, current NOW; ...`` of a :func:`fingerprint_diff`, its first ``most`` keys (all: None)."""
    shown = diff if most is None else diff[:most]
    more = " ..." if len(shown) < len(diff) else ""
    return "; ".join(f"{k}: {a!r} {then}, {b!r} {now}" for k, a, b in shown) + more


def json_normal(v):
    """Compare values as they round-trip through JSON (tuples become lists)."""
    return json.loads(json.dumps(v))


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def adapter_state_dict(model):
    """LoRA weights on CPU, gathered from ZeRO-3 partitions (a collective: every rank calls it)."""
    import deepspeed
    from peft import get_peft_model_state_dict

    params = _trainable(model)
    # LoRA weights only: MNTP's added <mask> row resizes the embeddings, and PEFT would then save the whole
    # embedding table and LM head into the adapter, which no merge takes (and the encoder never reads <mask>)
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        sd = {k: v.detach().to("cpu", torch.float32).clone()
              for k, v in get_peft_model_state_dict(model, save_embedding_layers=False).items()}
    return sd


def _replace_dir(tmp, dst):
    old = dst + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(dst):
        os.replace(dst, old)
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)


def write_adapter(model, sd, dst, cfg, tokenizer, step=None):
    """Atomically write a PEFT adapter folder plus the encoder metadata (rank 0 only). ``step``: the optimizer step
    whose weights these are, recorded with the run's fingerprint, so that a reader of a run folder (engine.pick)
    can tell an ``adapter/`` left by an earlier run in the same folder from this run's."""
    tmp = dst + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=sd, safe_serialization=True, save_embedding_layers=False)
    base_path, gguf = resolve_model_path(cfg.model.name_or_path, cfg.model.gguf_file) if cfg.model.name_or_path \
        else (None, None)
    acfg_path = os.path.join(tmp, "adapter_config.json")
    with open(acfg_path) as f:
        acfg = json.load(f)
    # Like published LLM2Vec checkpoints: an adapter trained on top of merged ones names the last of them.
    def ref(a):  # a local adapter by absolute path; a hub id (llm2vec's published adapters) as is
        return refs.local_path(a) if refs.kind(a) == "local" else a

    acfg["base_model_name_or_path"] = ref(cfg.model.adapters[-1]) if cfg.model.adapters else base_path
    with open(acfg_path, "w") as f:
        json.dump(acfg, f, indent=2)
    tokenizer.save_pretrained(tmp)
    c = cfg.contrastive
    save_encoder_meta(tmp, {
        "format": "llm2vec-engine/1",
        "stage": cfg.stage,
        "base_model": base_path,
        "base_model_name": cfg.model.name_or_path,  # as the config gave it: an alias, a hub id or a path
        "gguf_file": gguf,
        "random_init": cfg.model.random_init,
        "model_type": getattr(model.config, "model_type", None),  # the family it adapts: merge_loras checks it
        "prior_adapters": [ref(a) for a in cfg.model.adapters],
        "bidirectional": cfg.model.bidirectional,
        "pooling": c.pooling,
        "max_length": c.max_len if cfg.stage != "mntp" else cfg.max_seq_len,
        "instruction": c.instruction,
        "chat": training_wrap(cfg), "text_format": TEXT_FORMAT,  # the wrap and text rule it trained with
        **({"step": step, "fingerprint": fingerprint(cfg), "eval_loss_rule": EVAL_LOSS_RULE,
            "eval_sts_order": EVAL_STS_ORDER} if step is not None else {}),
    })
    share_safetensors(tmp)  # safetensors writes 0600: readable as any other file the run writes
    sync_tree(tmp)  # on disk before the rename publishes it
    _replace_dir(tmp, dst)
    sync_folder(os.path.dirname(os.path.abspath(dst)))


COMPLETE = "COMPLETE"  # marker rank 0 writes into a checkpoint folder after every rank finished writing it
RUN_FILE = "run.json"  # the run's fingerprint and the step, beside DeepSpeed's files
LOCK_FILE = "run.lock"  # output_dir's owner: flock'ed by rank 0 for the whole run, holding "pid host"


class RunFolderBusy(ConfigError):
    """Another live run holds output_dir (exit 2)."""


class UnsafeCheckpointError(ConfigError):
    """A checkpoint file needs a type outside checkpoint_globals() to be unpickled, so it could run code (exit 2)."""


def _lock_file(output_dir):
    """Take the exclusive lock on output_dir's lock file without waiting; returns its descriptor (the lock lives as
    long as it is open) or raises RunFolderBusy naming the holder."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_FILE)
    while True:
        existed = os.path.lexists(path)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by exec'ed children (PEP 446)
        except OSError as e:  # another user's lock file, a folder by that name
            raise ConfigError(f"cannot open the run lock {path}: {e.strerror}; use another output_dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 256).decode(errors="replace").split()
            os.close(fd)
            who = f"pid {holder[0]} on host {holder[1]}" if len(holder) >= 2 else "a process that is starting"
            raise RunFolderBusy(f"{output_dir} is in use by another run ({who} holds {path}); wait for it to end or "
                                f"use another output_dir") from None
        except OSError as e:  # a filesystem without flock (Lustre without -o flock, NFS without lockd, FUSE)
            os.close(fd)
            if not existed:
                os.unlink(path)
            raise ConfigError(f"cannot lock {path}: {e.strerror}; a run needs output_dir on a filesystem with "
                              f"flock (one owner per run folder)") from None
        try:  # the file may have been unlinked by its last holder (release_run_folder) after we opened it
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    except OSError:  # a full disk: the lock is not kept
        os.close(fd)
        raise
    return fd


def hold_run_folder(output_dir, rank, device):
    """Make this run output_dir's only owner: rank 0 takes the lock, every rank learns the outcome (a collective),
    and all raise RunFolderBusy together when another run holds it. Returns the descriptor to close at the end
    (None on other ranks)."""
    fd, busy = None, None
    if rank == 0:
        try:
            fd = _lock_file(output_dir)
        except ConfigError as e:  # busy, or no lock to be had: every rank raises it
            busy = e
        except OSError as e:  # the folder cannot be made, a full disk: the other ranks wait in the broadcast below
            busy = ConfigError(f"cannot take the run lock in {output_dir}: {e.strerror or e}; use another output_dir")
    flag = torch.tensor([1.0 if busy else 0.0], device=device)
    dist.broadcast(flag, 0)
    if flag.item():
        raise busy or said_by_rank0(RunFolderBusy(f"rank 0 could not take the run lock on {output_dir}"), rank)
    return fd


SHARED_CHECK = ".shared-check"


def check_shared_folder(output_dir, rank):
    """Every rank sees the folder rank 0 locked: rank 0 writes a token there and every rank reads it back (four
    collectives, once per run). Rank 0 alone writes ``latest``, ``COMPLETE``, the adapters and ``metrics.csv``, and
    every rank resumes from what they say, so a node-local ``output_dir`` (several nodes, no shared filesystem)
    would train on and resume from different states: refused in one line instead."""
    path = os.path.join(output_dir, SHARED_CHECK)

    def publish():
        token = f"{os.getpid()} {socket.gethostname()} {os.urandom(8).hex()}"
        write_text(path, token)
        return token

    written = on_rank0(publish)  # rank 0's token, on every rank

    def read():
        try:
            with open(path, encoding="utf-8") as f:
                seen = f.read()
        except OSError:
            seen = None
        if seen != written:
            raise ConfigError(f"output_dir {output_dir} is not the folder rank 0 wrote to (rank {rank} on "
                              f"{socket.gethostname()} does not see its files): a run on several nodes needs "
                              f"output_dir on a filesystem every node shares")

    try:
        together(read)
    finally:  # every rank has read (together is a collective): rank 0 removes the token, the others wait for it
        if rank == 0:
            try:
                os.unlink(path)
            except OSError:
                pass
        dist.barrier()


def release_run_folder(fd, output_dir):
    """Drop the lock. A run that wrote nothing else (it failed early) also removes the lock file, still holding the
    lock, so that the folder is empty again for engine/train.py to remove (a later run rechecks the inode it
    locked, so it never holds an unlinked file)."""
    if fd is None:
        return
    if os.listdir(output_dir) == [LOCK_FILE]:
        os.unlink(os.path.join(output_dir, LOCK_FILE))
    os.close(fd)  # closing the last descriptor drops the flock


_UNSET = object()


@contextlib.contextmanager
def _writes_kept(engine, failed):
    """Inside the block, DeepSpeed's checkpoint writes on ``engine`` (its checkpoint engine's ``save`` and
    ``makedirs``, the recovery scripts rank 0 copies) keep their first error in ``failed`` and return, and every
    later one is skipped, so that DeepSpeed's ``save_checkpoint`` still reaches its closing barrier on this rank."""
    def kept(fn):
        def call(*args, **kwargs):
            if failed:
                return None
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                failed.append(e)
                return None
        return call

    patched = []
    for obj, name in ((engine.checkpoint_engine, "save"), (engine.checkpoint_engine, "makedirs"),
                      (engine, "_copy_recovery_script")):
        fn = getattr(obj, name, None)
        if fn is not None:
            patched.append((obj, name, obj.__dict__.get(name, _UNSET)))
            setattr(obj, name, kept(fn))
    try:
        yield
    finally:
        for obj, name, before in patched:
            if before is _UNSET:
                delattr(obj, name)
            else:
                setattr(obj, name, before)


def checkpoint_globals():
    """The non-tensor types DeepSpeed 0.19 pickles into its checkpoint files, found by listing the globals of real
    tiny checkpoints (``torch.serialization.get_unsafe_globals_in_checkpoint``) of ZeRO stages 0 to 3 in fp32 and
    bf16: the ZeRO stage enum, the static loss scaler and the optimizer's fragment addresses; plus the dynamic loss
    scaler, which fp16 runs (GPU only, not seen here) store in the static one's place. Each is rebuilt from plain
    data (an enum value, an object's fields), never by calling code."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def load_state_file(path, map_location=None):
    """``torch.load(path, weights_only=True)`` allowing only tensors, containers, numbers, strings and
    ``checkpoint_globals()``. A file that needs any other global (which unpickling would import and call) raises
    UnsafeCheckpointError naming the file; nothing of it runs."""
    with torch.serialization.safe_globals(checkpoint_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            if "Weights only load failed" not in str(e):
                raise
            need = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            what = f" (it needs {need.group(1)})" if need else ""
            raise UnsafeCheckpointError(
                f"refusing to resume: checkpoint file {path} holds more than training state{what}, and unpickling it "
                f"could run code; delete that checkpoint if you did not write it") from None


def _fault_point(step, phase):
    """LLM2VEC_ENGINE_FAIL_IN_SAVE=STEP:PHASE SIGKILLs rank 0 inside the save of checkpoint STEP, after PHASE
    (state: DeepSpeed's files; adapter: adapter and run.json; complete: the COMPLETE marker; latest: the latest
    pointer, before cleanup). For fault-injection tests."""
    if os.environ.get("LLM2VEC_ENGINE_FAIL_IN_SAVE") == f"{step}:{phase}" and dist.get_rank() == 0:
        log0(f"fault injection: killing rank 0 in the save of step {step}, after {phase}")
        os.kill(os.getpid(), signal.SIGKILL)


def _step_of(tag):
    m = re.fullmatch(r"step_(\d+)", tag)
    return int(m.group(1)) if m else None


def checkpoint_tags(root):
    """[(step, tag, complete)] for every step_N folder under root, oldest first (by step number)."""
    if not os.path.isdir(root):
        return []
    out = []
    for t in os.listdir(root):
        step = _step_of(t)
        if step is not None and os.path.isdir(os.path.join(root, t)):
            complete = all(os.path.isfile(os.path.join(root, t, f)) for f in (COMPLETE, RUN_FILE))
            out.append((step, t, complete))
    return sorted(out)


def _read_latest(root):
    p = os.path.join(root, "latest")
    if not os.path.isfile(p):
        return None
    with open(p) as f:
        return f.read().strip()


def last_good(root):
    """The checkpoint ``latest`` names (for error messages), or 'none'."""
    tag = _read_latest(root)
    return os.path.join(root, tag) if tag else "none"


def _previous_run(output_dir, tags, latest):
    """What a finished or interrupted run left in output_dir (empty: nothing)."""
    held = [f"checkpoints {', '.join(t for _, t, _ in tags) or '(latest only)'}"] if tags or latest is not None else []
    return held + [name for name in ("adapter/", "best/", "metrics.csv")
                   if os.path.exists(os.path.join(output_dir, name))]


def _saved_run(root, tag):
    """A checkpoint's run.json (step, fingerprint, data identity), or {} when it cannot be read."""
    try:
        with open(os.path.join(root, tag, RUN_FILE)) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


def _saved_fingerprint(root, tag):
    """A complete checkpoint's run fingerprint, or None when its run.json cannot be read."""
    return _saved_run(root, tag).get("fingerprint")


def _other_run_config(cfg):
    """Why output_dir's config.yaml is another run's (how its fingerprint differs, or that it does not read), or
    None: no config.yaml, or this run's (a restart of the same run over its own log)."""
    path = os.path.join(cfg.output_dir, "config.yaml")
    if not os.path.isfile(path):
        return None
    try:
        saved = fingerprint(load_config(path))
    except (ConfigError, OSError, ValueError) as e:
        return f"its config.yaml does not read: {' '.join(str(e).split())[:160]}"
    diff = fingerprint_diff(saved, fingerprint(cfg))
    if not diff:
        return None
    return diff_listing(diff, "there", "here", most=4)


def plan_resume(cfg, rank=0):
    """Decide, before any model loads, what this run resumes: (tags to try, newest first; fingerprint diff).

    Raises ConfigError (exit 2) for a different run in output_dir (unless resume=force), for resume=never over a
    previous run (checkpoints, adapter/, best/ or metrics.csv), for resume=must without a checkpoint, and when
    ``latest`` exists but no complete checkpoint does (never a silent restart at step 0).
    """
    root = os.path.join(cfg.output_dir, "checkpoints")
    tags = checkpoint_tags(root)
    complete = [t for _, t, ok in reversed(tags) if ok]
    incomplete = [t for _, t, ok in tags if not ok]
    latest = _read_latest(root)
    if cfg.resume == "never":
        held = _previous_run(cfg.output_dir, tags, latest)
        if held:
            raise ConfigError(
                f"resume=never but {cfg.output_dir} holds a previous run ({'; '.join(held)}); use another output_dir, "
                f"delete it, or resume=force to continue in it (its newest checkpoint, else a fresh start over it)")
        return [], []
    if incomplete:
        warn0(rank, f"ignoring incomplete checkpoint folders in {root} (a save that did not finish): "
                     f"{', '.join(incomplete)}")
    if not complete:
        if latest is not None:
            raise ConfigError(
                f"{root}/latest names {latest!r} but there is no complete checkpoint to resume; refusing to restart "
                f"at step 0 over it: delete {root} to start over, or use another output_dir")
        if cfg.resume == "must":
            raise ConfigError(f"resume=must but there is no checkpoint in {root}")
        # A final adapter, or the best/ adapter a run killed without a checkpoint keeps: its only result, which a
        # fresh start would replace (or, with no dev eval, leave to be served as the new run's model).
        kept = [n for n in ("adapter", "best") if os.path.isdir(os.path.join(cfg.output_dir, n))]
        if kept and cfg.resume != "force":
            what = "a final adapter" if "adapter" in kept else "a best/ adapter"
            raise ConfigError(
                f"{cfg.output_dir} holds {what} but no checkpoint to resume; use another output_dir, delete "
                f"it, or resume=force to start over in it")
        other = _other_run_config(cfg) if cfg.resume == "auto" else None
        if other:  # a run that stopped before its first checkpoint: its log is all it left
            raise ConfigError(
                f"{cfg.output_dir} holds the config.yaml and metrics.csv of another run, which stopped before its "
                f"first checkpoint ({other}); use another output_dir, delete them, or resume=force to start over "
                f"in it (the same run is restarted over them)")
        return [], []
    if latest != complete[0]:
        why = "is missing" if latest is None else f"names {latest!r}, which is not the newest complete checkpoint"
        warn0(rank, f"{root}/latest {why}; resuming from the newest complete checkpoint, {complete[0]}")
    saved = _saved_fingerprint(root, complete[0])
    if saved is None:
        raise ConfigError(f"{root}/{complete[0]}/{RUN_FILE} cannot be read: the run it belongs to is unknown; delete "
                          f"that checkpoint or use another output_dir")
    # Fall back (an unloadable newest checkpoint) only to checkpoints of the same run: after a resume=force over
    # another run, its older checkpoints are kept until cleanup, and resuming one would skip this check.
    same_run = [t for t in complete if t == complete[0] or _saved_fingerprint(root, t) == saved]
    if len(same_run) < len(complete):
        warn0(rank, f"not falling back to {', '.join(t for t in complete if t not in same_run)} in {root}: "
                    f"checkpoints of another run than {complete[0]}")
    complete = same_run
    diff = fingerprint_diff(saved, fingerprint(cfg))
    if diff:
        listing = diff_listing(diff, "in the checkpoint", "now")
        if cfg.resume != "force":
            raise ConfigError(
                f"{cfg.output_dir} holds a different run ({complete[0]}); differing keys: {listing}. Use another "
                f"output_dir, or resume=force to resume it with the new values")
        newest = {t: step for step, t, _ in tags}[complete[0]]
        if newest > cfg.max_steps:  # the loop would not run, and adapter/ would hold that step's weights as max_steps'
            raise ConfigError(
                f"resume=force: the newest checkpoint, {complete[0]}, is past max_steps {cfg.max_steps}; a run does "
                f"not go back: set max_steps >= {newest}, or use another output_dir")
        if newest == cfg.max_steps:  # no step would train under the new values, yet adapter/ and config.yaml would
            # be written with them: engine.pick would take the trained run's weights for a run of other settings
            raise ConfigError(
                f"resume=force: the newest checkpoint, {complete[0]}, is at max_steps {cfg.max_steps}: no step would "
                f"run under the new values ({diff_listing(diff, 'in the checkpoint', 'now', most=4)}), and the "
                f"final adapter would be labelled with settings it did not train under; set max_steps > {newest} "
                f"to train on under them, resume with the checkpoint's settings to finish that run, or take its "
                f"adapter from {root}/{complete[0]}/adapter")
        warn0(rank, f"resume=force: resuming {complete[0]} of a different run; new values applied: {listing}")
    return complete, diff


class Checkpointer:
    """Saves and resumes ``checkpoints/step_NNNNNNN``; DeepSpeed reads checkpoint files only through
    ``load_state_file``."""

    def __init__(self, cfg, engine, module, tokenizer, rank, data=None):
        """``data``: the run's data identity (``engine.token_cache.data_identity``), recorded in every checkpoint
        and compared on resume."""
        self.cfg, self.engine, self.module, self.tok, self.rank = cfg, engine, module, tokenizer, rank
        self.data = data
        self.root = os.path.join(cfg.output_dir, "checkpoints")
        self.resumed_tag, self.resumed_state = None, {}  # what resume() loaded: its tag and DeepSpeed client state
        if engine is not None:  # every file DeepSpeed's load_checkpoint reads goes through its checkpoint engine
            engine.checkpoint_engine.load = load_state_file

    def save(self, step, plan, state=None):
        """Checkpoint ``step``. ``state``: the loop's counters to carry over a resume (in DeepSpeed's client state,
        beside the step and the data position)."""
        tag = f"step_{step:07d}"
        path = os.path.join(self.root, tag)
        def unmark():  # rewriting a folder: it is incomplete until marked again
            if self.rank == 0 and os.path.exists(os.path.join(path, COMPLETE)):
                os.remove(os.path.join(path, COMPLETE))

        together(unmark)  # the barrier before the ranks write, which a failed removal on rank 0 ends on every rank
        # The frozen base is left out (it is rebuilt from the base model and prior adapters, as at the start): at 7B a
        # checkpoint is then the LoRA weights and their optimizer state, not 14 GB more of bf16 base per save. Not
        # when MNTP added a mask token: its embedding row is drawn at random, and a resume must read it back
        frozen_rebuilt = not getattr(getattr(self.module, "stage", None), "added_token", False)
        # A file write that fails on one rank (a full disk, EIO) is kept, not raised inside DeepSpeed's save: that
        # rank would leave it before the barrier at its end, where the other ranks then waited until the collective
        # timeout (NCCL: 30 minutes). Every rank reaches the barrier, and the error ends every rank just after it.
        failed = []
        with _writes_kept(self.engine, failed):
            self.engine.save_checkpoint(self.root, tag=tag, save_latest=False,
                                        exclude_frozen_parameters=frozen_rebuilt,
                                        client_state={**(state or {}), "step": step,
                                                      "data_position": list(plan.position(step))})

        def synced():
            if failed:
                raise failed[0]
            # this rank's DeepSpeed files on disk before the ranks agree and rank 0 writes COMPLETE (a power cut
            # after COMPLETE must not leave an empty state file behind a checkpoint cleanup then trusts)
            sync_tree(path, only=lambda name: _rank_state_file(name, self.rank, shared=self.rank == 0))

        together(synced)
        _fault_point(step, "state")  # (a failed fsync, EIO or a full disk, ends every rank, not only its own)
        sd = adapter_state_dict(self.module.model)
        check_finite_state(sd, f"checkpoint {tag}", self.rank)
        def adapter_and_record():
            write_adapter(self.module.model, sd, os.path.join(path, "adapter"), self.cfg, self.tok, step)
            write_json(os.path.join(path, RUN_FILE), {"step": step, "fingerprint": fingerprint(self.cfg),
                                                      "world": dist.get_world_size(),
                                                      "zero_stage": self.engine.zero_optimization_stage(),
                                                      **({"data": self.data} if self.data else {}),
                                                      **keep_best(self.cfg.output_dir, path)})
            _fault_point(step, "adapter")

        def mark_complete():
            # the rows logged up to this step are on disk before the checkpoint that a resume keeps them for (a
            # resume logs only the steps after it: a row lost to a power cut would be a silent gap)
            sync_file(os.path.join(self.cfg.output_dir, "metrics.csv"))
            write_json(os.path.join(path, COMPLETE), {"step": step})
            _fault_point(step, "complete")
            write_text(os.path.join(self.root, "latest"), tag)
            _fault_point(step, "latest")
            self.cleanup(step)

        # rank 0's writes, each followed by a collective that every rank leaves together, a failed write (a full
        # disk) included: every rank finished writing before the checkpoint is marked complete
        together(lambda: adapter_and_record() if self.rank == 0 else None)
        together(lambda: mark_complete() if self.rank == 0 else None)
        return tag

    def cleanup(self, step):
        """Keep the newest keep_checkpoints complete checkpoints up to this step; remove only older ones (by step
        number, never the one just saved nor any newer folder), and incomplete folders older than it."""
        if self.cfg.keep_checkpoints <= 0:
            return
        tags = checkpoint_tags(self.root)
        keep = {t for s, t, ok in tags if ok and s <= step}
        keep = set(sorted(keep, key=_step_of)[-self.cfg.keep_checkpoints:])
        for s, t, ok in tags:
            if s < step and t not in keep:
                try:  # unmarked first: a removal cut short leaves an incomplete folder, never a "complete" torso
                    os.remove(os.path.join(self.root, t, COMPLETE))
                except OSError:
                    pass
                shutil.rmtree(os.path.join(self.root, t), ignore_errors=True)

    def resume(self, tags):
        """Load the first loadable of ``tags`` (newest first); an unloadable one (a truncated or corrupt file) falls
        back to the next, with a warning, but a file refused as unsafe stops the run (UnsafeCheckpointError): no
        fallback past it. A checkpoint of another rank count or ZeRO stage is refused (ConfigError) before any file
        loads. Returns the step to start from (0 when tags is empty)."""
        failed = []
        for tag in tags:
            self._check_layout(tag)
            # Each rank reads its own files once before DeepSpeed does, and the ranks agree: a file truncated on some
            # ranks only would otherwise send those ranks to the agreement while the others went on into the load's
            # own collectives (ZeRO-3 gathers parameters after loading), a hang instead of a fallback
            err, unsafe = self._check_own_files(tag)
            ok, why = self._agree(err, unsafe)
            client = None
            if ok:
                try:
                    _, client = self.engine.load_checkpoint(self.root, tag=tag, load_module_strict=False)
                    if client is None or "step" not in client:
                        err = "DeepSpeed found no state in it"
                except UnsafeCheckpointError as e:
                    unsafe = e
                except Exception as e:  # read, but does not load: try the previous checkpoint
                    err = f"{type(e).__name__}: {e}"
                ok, why = self._agree(err, unsafe)
            if ok:
                if failed:
                    warn0(self.rank, f"fell back to {tag}: could not load {'; '.join(failed)}")
                self.resumed_tag, self.resumed_state = tag, client
                _check_data_of(self.cfg, self.rank, self.root, tag, self.data)
                log0(f"resumed from {tag}: step {client['step']}, data position (epoch, batch) "
                     f"{client['data_position']}")
                return int(client["step"])
            failed.append(f"{tag} ({why})")
            warn0(self.rank, f"could not load checkpoint {self.root}/{tag}: {why}")
        if failed:
            raise said_by_rank0(ConfigError(f"no checkpoint in {self.root} could be loaded: {'; '.join(failed)}; "
                                            f"delete {self.root} to start over"), self.rank)
        return 0

    def _agree(self, err, unsafe):
        """Every rank's outcome of reading a checkpoint (one object all-gather): (True, None) when no rank failed,
        else (False, the lowest failed rank's reason, which rank 0 reports: a line saying only that another rank
        failed left the user nothing to act on). An unsafe file on any rank raises on every rank: the lowest such
        rank its own error (it names the file), the others a copy marked ``from_rank``, which they leave quietly on."""
        world = dist.get_world_size()
        if world == 1:
            if unsafe is not None:
                raise unsafe
            return err is None, err
        seen = [None] * world
        dist.all_gather_object(seen, (err, None if unsafe is None else str(unsafe)))
        refused = next((r for r, (_, u) in enumerate(seen) if u is not None), None)
        if refused is not None:
            if refused == self.rank:
                unsafe.every_rank_knows = True  # the others leave quietly: say it at once
                raise unsafe
            quiet = UnsafeCheckpointError(seen[refused][1])
            quiet.from_rank = refused
            raise quiet
        failed = next((r for r, (e, _) in enumerate(seen) if e is not None), None)
        if failed is None:
            return True, None
        return False, f"rank {failed}: {seen[failed][0]}"

    def _own_files(self, tag):
        """The files of ``tag`` DeepSpeed's load reads on this rank (:func:`_rank_state_file`)."""
        folder = os.path.join(self.root, tag)
        return [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if _rank_state_file(f, self.rank)]

    def _check_own_files(self, tag):
        """(error, unsafe error) of reading this rank's files of ``tag`` through the restricted loader."""
        try:
            files = self._own_files(tag)
            if not files:
                return f"no state files for rank {self.rank} in it", None
            for path in files:
                load_state_file(path, map_location="cpu")
        except UnsafeCheckpointError as e:
            return None, e
        except Exception as e:  # a truncated or corrupt file
            return f"{type(e).__name__}: {e}", None
        return None, None

    def _check_layout(self, tag):
        """Refuse (ConfigError, every rank alike) a checkpoint saved by another rank count or ZeRO stage where the
        optimizer state is sharded (stages 1-3): DeepSpeed would fail inside its load, and the old message said to
        delete checkpoints that load fine with the rank count that wrote them. Stage 0 on both sides replicates
        the state: any rank count resumes it. Checkpoints that recorded no layout are not checked."""
        saved = _saved_run(self.root, tag)
        if "world" not in saved or "zero_stage" not in saved:
            return
        world, stage = dist.get_world_size(), self.engine.zero_optimization_stage()
        if (saved["world"], saved["zero_stage"]) == (world, stage) or saved["zero_stage"] == stage == 0:
            return
        if saved["zero_stage"] == 0 and self.cfg.model.dtype == "fp16":
            raise said_by_rank0(ConfigError(
                f"{self.root}/{tag} was saved by an fp16 run at ZeRO stage 0, where DeepSpeed's fp16 optimizer made "
                f"every update 2^16 times too small (engine.config.FP16_STAGE0), and fp16 now runs at stage "
                f"{stage}: it cannot be resumed; start the run again in another output_dir"), self.rank)
        raise said_by_rank0(ConfigError(
            f"{self.root}/{tag} was saved by {saved['world']} rank(s) at ZeRO stage {saved['zero_stage']}; this run "
            f"has {world} rank(s) at stage {stage}, and DeepSpeed's ZeRO checkpoints hold the optimizer state per rank and "
            f"stage: resume with {saved['world']} rank(s) and zero_stage={saved['zero_stage']}, or use another "
            f"output_dir"), self.rank)


SHARED_STATE_FILE = "mp_rank_00_model_states.pt"  # DeepSpeed's module states at ZeRO stages 0-2 (rank 0 writes it)


def _rank_state_file(name, rank, shared=True):
    """Whether DeepSpeed's checkpoint file ``name`` is one of ``rank``'s: its partition's (``zero_pp_rank_R_...``),
    and with ``shared`` the module states every rank reads at stages 0-2 (which rank 0 alone writes)."""
    return name.endswith(".pt") and (f"zero_pp_rank_{rank}_" in name or (shared and name == SHARED_STATE_FILE))


def _check_data_of(cfg, rank, root, tag, now):
    """Refuse (ConfigError) to resume ``tag`` when the data under the run's paths is not what it trained on:
    another item count or other content, so other batches at the same position, or the same files read by other
    rules (an engine whose readers changed, ``engine.data.READ_RULES``). resume=force goes on, warned. Checkpoints
    that recorded no data identity (older ones) are not checked, nor the rules of those that recorded none."""
    saved = _saved_run(root, tag).get("data")
    if not saved or not now or saved == now:
        return
    if saved.get("items") != now.get("items"):
        what = f"{saved['items']} items then, {now['items']} now"
    elif saved.get("sha256") != now.get("sha256"):
        what = f"the same {now['items']} items but other content"
    elif "read_rules" not in saved:
        return
    else:
        what = (f"the same files, but this engine reads them by rules {now.get('read_rules')} and {tag} was read by "
                f"rules {saved['read_rules']}, engine.data.READ_RULES")
    msg = f"the data under {cfg.data} changed since {tag} ({what}): resuming would train on other batches"
    if cfg.resume != "force":
        raise said_by_rank0(ConfigError(f"{msg}; use another output_dir, or resume=force to go on with the new data"),
                            rank)
    warn0(rank, f"resume=force: {msg}")


def check_finite_state(sd, what, rank=0):
    """Refuse to write a non-finite adapter (every rank holds the gathered weights, so all raise together)."""
    from .trainer import NonFiniteError  # the trainer's error (exit 3); imported here to avoid an import cycle

    bad = [k for k, v in sd.items() if not torch.isfinite(v).all()]
    if bad:
        raise said_by_rank0(NonFiniteError(f"not saving {what}: non-finite values in {len(bad)} adapter tensors (e.g. "
                                           f"{bad[0]})"), rank)


def drop_stale_best(output_dir, after=None):
    """Remove an earlier run's ``best/`` when a run starts over at step 0 in its folder (rank 0): it would otherwise
    be replaced only if this run evaluates on dev, and be served as this run's model (the encoder, evaluate and the
    export prefer best/) if it does not.

    ``after``: a resume=force run under other settings, resumed at step ``after``. A best/ recorded at a later step
    came from the steps this run replaces (another learning rate, temperature, ...), so it goes too; one from the
    checkpoint's own past (step <= after) stays, the start of this run's trajectory."""
    if after is not None:
        try:
            with open(os.path.join(output_dir, "best", BestAdapter.META), encoding="utf-8") as f:
                step = int(json.load(f)["step"])
        except (OSError, ValueError, TypeError, KeyError):
            return  # no record to judge by (BestAdapter's resume says so if it does not read)
        if step <= after:
            return
    stale = [d for d in ("best", "best.new", "best.old") if os.path.isdir(os.path.join(output_dir, d))]
    if stale:
        why = ("starting over" if after is None else
               f"resumed at step {after} under other settings (resume=force), past a best adapter of step {step}")
        warn0(0, f"{why} in {output_dir}: removing the earlier run's {', '.join(d + '/' for d in stale)}")
        for d in stale:
            shutil.rmtree(os.path.join(output_dir, d))


def _read_best_record(folder):
    """A best adapter folder's record (``engine_best.json``: step, spearman, eval set) as a dict; OSError without
    the file, ValueError, TypeError or KeyError when it does not read as a record with a score and a step."""
    with open(os.path.join(folder, BestAdapter.META), encoding="utf-8") as f:
        rec = json.load(f)
    float(rec["spearman"]), int(rec["step"])
    return rec


def _best_record(folder):
    """:func:`_read_best_record`, or None when the record is missing or does not read."""
    try:
        return _read_best_record(folder)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _link_tree(src, dst):
    """``src``'s files under the new folder ``dst`` (absent), hard-linked where the filesystem allows, copied where
    it does not, synced, and renamed into place at once. The adapters' files are never written in place (a new
    folder replaces the old one), so a link shares bytes that do not change."""
    tmp = dst + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for root, _, files in os.walk(src):
        into = os.path.join(tmp, os.path.relpath(root, src))
        os.makedirs(into, exist_ok=True)
        for name in files:
            try:
                os.link(os.path.join(root, name), os.path.join(into, name))
            except OSError:  # no hard links (another device, some network and FUSE filesystems)
                shutil.copy2(os.path.join(root, name), os.path.join(into, name))
    sync_tree(tmp)
    os.replace(tmp, dst)
    sync_folder(os.path.dirname(os.path.abspath(dst)))


def keep_best(output_dir, path):
    """Keep ``output_dir/best/`` as it is at this checkpoint in the checkpoint folder ``path`` (``path/best/``, hard
    links: no second copy of the bytes) for :func:`restore_best` (rank 0). Returns the fields for run.json:
    ``{"best": record}`` (None: no best adapter yet), or ``{}`` when best/ holds no record that reads (nothing kept,
    no record: a resume leaves best/ as it finds it)."""
    src, dst = os.path.join(output_dir, "best"), os.path.join(path, "best")
    shutil.rmtree(dst, ignore_errors=True)  # a folder written again
    if not os.path.isdir(src):
        return {"best": None}
    rec = _best_record(src)
    if rec is None:
        return {}
    _link_tree(src, dst)
    return {"best": rec}


def restore_best(output_dir, root, tag, forced=False, rank=0):
    """Make ``output_dir/best/`` the one checkpoint ``tag`` recorded (rank 0, before the resumed run's first eval).

    A run that evaluated past its last checkpoint and was killed before the next one left a best/ of a step this run
    trains again: kept, the rerun's identical score there tied it (its row said best_saved 0 where the uninterrupted
    run said 1), and a lower one left that dead run's weights in best/, the best up to the checkpoint gone. So the
    checkpoint's own best/ (:func:`keep_best`) is put back, or best/ removed when it had none; the rerun writes the
    later one again when it scores it, as the uninterrupted run did. A checkpoint from before best/ was kept with it
    leaves best/ as it is (``forced``: resume=force under other settings drops one from past the checkpoint,
    :func:`drop_stale_best`)."""
    saved = _saved_run(root, tag)
    after = int(saved.get("step", _step_of(tag) or 0))
    if "best" not in saved:
        if forced:
            drop_stale_best(output_dir, after=after)
        return
    rec, best = saved["best"], os.path.join(output_dir, "best")
    _recover_best(best)
    present = os.path.isdir(best)
    now = _best_record(best) if present else None
    if (rec is None and not present) or (rec is not None and now is not None and json_normal(now) == json_normal(rec)):
        return
    copy = os.path.join(root, tag, "best")
    if rec is not None and json_normal(_best_record(copy)) != json_normal(rec):
        warn0(rank, f"{copy} is missing or not the best adapter {tag} recorded (step {rec['step']}): best/ is left "
                    f"as it is")
        return
    if forced and now is not None and int(now["step"]) > after:
        drop_stale_best(output_dir, after=after)  # says so, as for a checkpoint without the record
        if rec is not None:
            warn0(rank, f"putting back the best adapter as of {tag} (step {rec['step']})")
    else:
        held = "is missing" if not present else (f"holds step {now['step']}'s adapter" if now is not None
                                                 else "holds no record that reads")
        past = " (a run that did not reach its next checkpoint evaluated past it)" \
            if now is not None and int(now["step"]) > after else ""
        then = f"putting back that one (step {rec['step']})" if rec is not None else "it had none yet: removing best/"
        warn0(rank, f"best/ {held}, not the best adapter as of {tag}, which this run resumes{past}; {then}; this "
                    f"run writes a later one where its own dev scores improve")
    for d in (best, best + ".new", best + ".old"):
        shutil.rmtree(d, ignore_errors=True)
    if rec is not None:
        _link_tree(copy, best)


def _recover_best(folder):
    """A replacement of best/ killed between its two renames (``_replace_dir``) left no best/: take the complete
    new one, else put the old one back."""
    new, old = folder + ".new", folder + ".old"
    if os.path.isdir(folder):
        return
    if os.path.isfile(os.path.join(new, BestAdapter.META)):
        os.replace(new, folder)
    elif os.path.isdir(old):
        os.replace(old, folder)


def _first_pairs_are_the_eval_pairs(cfg):
    """Whether a best/ record from before ``eval_sts_order`` (scored on the file's first ``eval_sts_pairs`` pairs)
    scored the pairs this run scores: yes where the file holds one genre, or no more pairs than that."""
    try:
        return sts_eval_pairs_are_the_first(cfg.eval_data[0], cfg.eval_sts_pairs)
    except (OSError, ValueError):  # (a DataError: the run's own eval says it) not comparable
        return False


class BestAdapter:
    """``output_dir/best/``: the adapter with the highest dev STS Spearman seen so far, beside the last one.

    Active when ``eval_every`` is set and ``eval_data`` is one STS file. ``best/engine_best.json`` records the
    step and score; a resumed run reads it back, so it only replaces a better adapter (a fresh run, start 0,
    ignores a stale one and replaces it at its first eval). Each checkpoint keeps best/ as of its step
    (:func:`keep_best`), which a resume puts back first (:func:`restore_best`). Rank 0 decides and
    broadcasts (ranks could differ in the last float bit); the adapter gather is collective, the write atomic.
    """

    META = "engine_best.json"

    def __init__(self, cfg, rank, resumed):
        self.dir = os.path.join(cfg.output_dir, "best")
        self.score, self.step = -math.inf, None  # rank 0's record: the best score and its step (None: none kept)
        meta = os.path.join(self.dir, self.META)
        if resumed and rank == 0:
            _recover_best(self.dir)
        if resumed and rank == 0 and os.path.isfile(meta):  # (after the recovery, which may put best/ back)
            try:
                kept = _read_best_record(self.dir)
            except (ValueError, TypeError, KeyError) as e:  # torn by a power cut: refused in one line
                raise ConfigError(f"{meta} does not read ({type(e).__name__}: {e}): move best/ aside to resume, or "
                                  f"resume=force to start over") from None
            pairs = kept.get("eval_sts_pairs", cfg.eval_sts_pairs)  # records before it was kept: as now
            same = (kept.get("eval_data"), pairs) == (cfg.eval_data[0], cfg.eval_sts_pairs) and (
                kept.get("eval_sts_order") == EVAL_STS_ORDER or _first_pairs_are_the_eval_pairs(cfg))
            if same:
                self.score, self.step = float(kept["spearman"]), int(kept["step"])
            else:  # eval settings may change on resume: a score on other pairs does not compare
                order = kept.get("eval_sts_order", "the file's first")
                warn0(rank, f"best/ (step {kept['step']}) was selected on {kept.get('eval_data')} ({pairs} pairs, "
                            f"{order}); this run scores {cfg.eval_data[0]} ({cfg.eval_sts_pairs} pairs, "
                            f"{EVAL_STS_ORDER}), so its next dev score replaces it")

    def update(self, step, spearman, module, cfg, tok, rank, device):
        flag = torch.tensor([1.0 if (rank == 0 and spearman > self.score) else 0.0], device=device)
        dist.broadcast(flag, 0)
        if not flag.item():
            return False
        sd = adapter_state_dict(module.model)
        check_finite_state(sd, "the best adapter", rank)
        def write():
            self.score, self.step = spearman, step
            new = self.dir + ".new"
            write_adapter(module.model, sd, new, cfg, tok, step)
            write_json(os.path.join(new, self.META), {"step": step, "spearman": spearman,
                                                      "eval_data": cfg.eval_data[0],
                                                      "eval_sts_pairs": cfg.eval_sts_pairs,
                                                      "eval_sts_order": EVAL_STS_ORDER})
            _replace_dir(new, self.dir)

        together(lambda: write() if rank == 0 else None)
        return True

    def summary(self):
        """For the run's last log line (rank 0): where the best adapter is, its step and dev score; None when no
        best adapter was kept."""
        if self.step is None:
            return None
        return f"best adapter at {self.dir} (step {self.step}, dev STS Spearman {self.score:.4f})"


def sts_spearman(module, stage, path, max_pairs=500):
    """Spearman correlation of the model's cosine similarities with the gold scores of ``max_pairs`` pairs of an STS
    file, taken genre by genre in turn (:func:`engine.data.sts_eval_pairs`): the dev score ``BestAdapter`` keeps the
    best adapter by."""
    from .encoder import DEFAULT_MAX_LENGTH, Encoder
    from .evaluate import sts_scores

    c = stage.cfg.contrastive
    # the instruction the saved adapter records and its encoder applies by default (evaluate, export), and the max
    # length that encoder reads (not the training max_len, which cut texts past it): the dev score that picks
    # best/ reads the tokens the test score will
    enc = Encoder(module.model, stage.tok, pooling=c.pooling, max_length=DEFAULT_MAX_LENGTH, instruction=c.instruction,
                  chat=getattr(stage, "chat", None))
    return sts_scores(enc, sts_eval_pairs(path, max_pairs), batch_size=stage.cfg.micro_batch_size * 4)["spearman"]

"""The DeepSpeed ZeRO-3 training loop shared by every stage.

Data position is a pure function of the optimizer step (see ``BatchPlan``), masking and dropout RNGs
are re-seeded from (seed, step, micro-step, rank), so a run resumed from a checkpoint continues with
exactly the batches, masks and dropout an uninterrupted run would have used.

Checkpoints: ``<output_dir>/checkpoints/step_NNNNNNN/`` holds DeepSpeed's state (for resume) and
``adapter/`` (the LoRA adapter in PEFT format, safetensors) and ``run.json`` (the run's fingerprint).
After every rank finished writing, rank 0 marks it ``COMPLETE`` and then replaces ``checkpoints/latest``
atomically, so a run killed mid-save resumes from the previous checkpoint. Only complete checkpoints are
resumed, only one of the same run (same fingerprint) unless ``resume=force``, and a missing, dangling or
unloadable ``latest`` falls back to the newest complete checkpoint with a warning, never to step 0.
The final adapter goes to ``<output_dir>/adapter/``. Non-finite steps are counted; a non-finite state is
never saved, and ``max_nonfinite_steps`` of them in a row stop the run (``NonFiniteError``, exit code 3).
"""
import csv
import json
import math
import os
import re
import shutil
import signal
import time

import torch
import torch.distributed as dist

import kernels

from . import config as config_mod
from .bidirectional import set_deterministic_attention
from .data import BatchPlan, is_sts_file, read_sts
from .lora import fuse_lora
from .memory import choose_recompute, choose_zero_stage, enable_recompute, plan_memory
from .modeling import add_lora, load_model, load_tokenizer, resolve_model_path, save_encoder_meta
from .multi_device import share_cpu_cores
from .stages import build_stage
from .stages.base import to_device


class NonFiniteError(RuntimeError):
    """The run produced non-finite losses or gradient norms (train.py exits with code 3)."""


class EngineModule(torch.nn.Module):
    """What DeepSpeed wraps: the (PEFT) model plus the stage's loss."""

    def __init__(self, model, stage):
        super().__init__()
        self.model = model
        self.stage = stage

    def forward(self, batch):
        return self.stage.loss(self, batch)


def log0(*a):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print("[engine]", *a, flush=True)


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


def lr_lambda(cfg):
    def f(step):  # step = optimizer steps taken so far
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule in ("constant", "constant_with_warmup"):  # the peak LR after the warmup
            return 1.0
        span = max((cfg.lr_decay_steps or cfg.max_steps) - cfg.warmup_steps, 1)  # lr_decay_steps: 0 = max_steps
        t = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
        return 1.0 - t if cfg.lr_schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * t))
    return f


class MetricsLogger:
    """metrics.csv (rank 0): one row per logged step. A column that appears later (eval metrics) rewrites the
    file with the wider header, so every row stays aligned; a resumed run (``start``: the step it resumes from)
    drops rows past that step, then appends."""

    def __init__(self, cfg, rank, start=None):
        self.rank, self.kind = rank, cfg.logger
        self.path = os.path.join(cfg.output_dir, "metrics.csv")
        self.rows, self.fields = [], []
        if rank == 0 and os.path.exists(self.path):
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                self.fields = list(reader.fieldnames or [])
                self.rows = list(reader)
        if rank == 0 and start is not None and self.rows:
            # Rows past the step this run starts from were logged by a run that did not reach its next
            # checkpoint: they are logged again, so drop them now (no step appears twice).
            kept = [r for r in self.rows if _int_or_none(r.get("step")) is not None and int(r["step"]) <= start]
            if len(kept) != len(self.rows):
                self.rows = kept
                self._rewrite()
        self.tb = None
        if rank == 0 and cfg.logger in ("tensorboard", "both"):
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(cfg.output_dir, "tensorboard"))

    def log(self, step, row):
        if self.rank != 0:
            return
        row = {"step": step, **row}
        if self.kind in ("csv", "both"):
            new = [k for k in row if k not in self.fields]
            self.fields += new
            self.rows.append(row)
            if new or not os.path.exists(self.path):
                self._rewrite()
            else:
                with open(self.path, "a", newline="") as f:
                    csv.DictWriter(f, fieldnames=self.fields).writerow(row)
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()


    def _rewrite(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields)
            w.writeheader()
            w.writerows(self.rows)
        os.replace(tmp, self.path)


def _int_or_none(v):
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def adapter_state_dict(model):
    """LoRA weights on CPU, gathered from ZeRO-3 partitions (a collective: every rank calls it)."""
    import deepspeed
    from peft import get_peft_model_state_dict

    params = _trainable(model)
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        sd = {k: v.detach().to("cpu", torch.float32).clone() for k, v in get_peft_model_state_dict(model).items()}
    return sd


def _replace_dir(tmp, dst):
    old = dst + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(dst):
        os.replace(dst, old)
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)


def write_adapter(model, sd, dst, cfg, tokenizer):
    """Atomically write a PEFT adapter folder plus the encoder metadata (rank 0 only)."""
    tmp = dst + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
    base_path, gguf = resolve_model_path(cfg.model.name_or_path, cfg.model.gguf_file) if cfg.model.name_or_path \
        else (None, None)
    acfg_path = os.path.join(tmp, "adapter_config.json")
    with open(acfg_path) as f:
        acfg = json.load(f)
    # Like published LLM2Vec checkpoints: an adapter trained on top of merged ones names the last of them.
    def ref(a):  # a local adapter by absolute path; a hub id (llm2vec's published adapters) as is
        return os.path.abspath(a) if os.path.exists(os.path.expanduser(a)) else a

    acfg["base_model_name_or_path"] = ref(cfg.model.adapters[-1]) if cfg.model.adapters else base_path
    with open(acfg_path, "w") as f:
        json.dump(acfg, f, indent=2)
    tokenizer.save_pretrained(tmp)
    c = cfg.contrastive
    save_encoder_meta(tmp, {
        "format": "llm2vec-engine/1",
        "stage": cfg.stage,
        "base_model": base_path,
        "gguf_file": gguf,
        "random_init": cfg.model.random_init,
        "prior_adapters": [ref(a) for a in cfg.model.adapters],
        "bidirectional": cfg.model.bidirectional,
        "pooling": c.pooling,
        "max_length": c.max_len if cfg.stage != "mntp" else cfg.max_seq_len,
        "instruction": c.instruction,
    })
    _replace_dir(tmp, dst)


COMPLETE = "COMPLETE"  # marker rank 0 writes into a checkpoint folder after every rank finished writing it
RUN_FILE = "run.json"  # the run's fingerprint and the step, beside DeepSpeed's files


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


def _last_good(root):
    tag = _read_latest(root)
    return os.path.join(root, tag) if tag else "none"


def _warn0(rank, msg):
    if rank == 0:
        print(f"[engine] warning: {msg}", flush=True)


def plan_resume(cfg, rank=0):
    """Decide, before any model loads, what this run resumes: (tags to try, newest first; fingerprint diff).

    Raises ConfigError (exit 2) for a different run in output_dir (unless resume=force), for resume=never
    with checkpoints present, for resume=must without one, and when ``latest`` exists but no complete
    checkpoint does (never a silent restart at step 0).
    """
    root = os.path.join(cfg.output_dir, "checkpoints")
    tags = checkpoint_tags(root)
    complete = [t for _, t, ok in reversed(tags) if ok]
    incomplete = [t for _, t, ok in tags if not ok]
    latest = _read_latest(root)
    if cfg.resume == "never":
        if tags or latest is not None:
            raise config_mod.ConfigError(
                f"resume=never but {root} holds checkpoints ({', '.join(t for _, t, _ in tags) or 'latest'}); "
                f"use another output_dir or delete it")
        return [], []
    if incomplete:
        _warn0(rank, f"ignoring incomplete checkpoint folders in {root} (a save that did not finish): "
                     f"{', '.join(incomplete)}")
    if not complete:
        if latest is not None:
            raise config_mod.ConfigError(
                f"{root}/latest names {latest!r} but there is no complete checkpoint to resume; refusing to restart "
                f"at step 0 over it: delete {root} to start over, or use another output_dir")
        if cfg.resume == "must":
            raise config_mod.ConfigError(f"resume=must but there is no checkpoint in {root}")
        if os.path.isdir(os.path.join(cfg.output_dir, "adapter")) and cfg.resume != "force":
            raise config_mod.ConfigError(
                f"{cfg.output_dir} holds a final adapter but no checkpoint to resume; use another output_dir, delete "
                f"it, or resume=force to start over in it")
        return [], []
    if latest != complete[0]:
        why = "is missing" if latest is None else f"names {latest!r}, which is not the newest complete checkpoint"
        _warn0(rank, f"{root}/latest {why}; resuming from the newest complete checkpoint, {complete[0]}")
    with open(os.path.join(root, complete[0], RUN_FILE)) as f:
        saved = json.load(f)["fingerprint"]
    diff = config_mod.fingerprint_diff(saved, config_mod.fingerprint(cfg))
    if diff:
        listing = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, a, b in diff)
        if cfg.resume != "force":
            raise config_mod.ConfigError(
                f"{cfg.output_dir} holds a different run ({complete[0]}); differing keys: {listing}. Use another "
                f"output_dir, or resume=force to resume it with the new values")
        _warn0(rank, f"resume=force: resuming {complete[0]} of a different run; new values applied: {listing}")
    return complete, diff


class Checkpointer:
    def __init__(self, cfg, engine, module, tokenizer, rank):
        self.cfg, self.engine, self.module, self.tok, self.rank = cfg, engine, module, tokenizer, rank
        self.root = os.path.join(cfg.output_dir, "checkpoints")

    def save(self, step, plan):
        tag = f"step_{step:07d}"
        path = os.path.join(self.root, tag)
        if self.rank == 0 and os.path.exists(os.path.join(path, COMPLETE)):
            os.remove(os.path.join(path, COMPLETE))  # rewriting a folder: it is incomplete until marked again
        dist.barrier()
        self.engine.save_checkpoint(self.root, tag=tag, save_latest=False,
                                    client_state={"step": step, "data_position": list(plan.position(step))})
        sd = adapter_state_dict(self.module.model)
        check_finite_state(sd, f"checkpoint {tag}")
        if self.rank == 0:
            write_adapter(self.module.model, sd, os.path.join(path, "adapter"), self.cfg, self.tok)
            _write_json(os.path.join(path, RUN_FILE), {"step": step, "fingerprint": config_mod.fingerprint(self.cfg)})
        dist.barrier()  # every rank finished writing: only now is the checkpoint complete
        if self.rank == 0:
            _write_json(os.path.join(path, COMPLETE), {"step": step})
            tmp = os.path.join(self.root, "latest.tmp")
            with open(tmp, "w") as f:
                f.write(tag)
            os.replace(tmp, os.path.join(self.root, "latest"))
            self.cleanup(step)
        dist.barrier()
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
                shutil.rmtree(os.path.join(self.root, t), ignore_errors=True)

    def resume(self, tags):
        """Load the first loadable of ``tags`` (newest first); an unloadable one falls back to the next, with a
        warning. Returns the step to start from (0 when tags is empty)."""
        failed = []
        for tag in tags:
            err = None
            try:
                _, client = self.engine.load_checkpoint(self.root, tag=tag, load_module_strict=False)
                if client is None or "step" not in client:
                    err = "DeepSpeed found no state in it"
            except Exception as e:  # a truncated or corrupt file: try the previous checkpoint
                err = f"{type(e).__name__}: {e}"
            bad = torch.tensor([1.0 if err else 0.0])
            dist.all_reduce(bad)  # every rank takes the same decision
            if bad.item() == 0:
                if failed:
                    _warn0(self.rank, f"fell back to {tag}: could not load {'; '.join(failed)}")
                log0(f"resumed from {tag}: step {client['step']}, data position (epoch, batch) "
                     f"{client['data_position']}")
                return int(client["step"])
            failed.append(f"{tag} ({err or 'failed on another rank'})")
            _warn0(self.rank, f"could not load checkpoint {self.root}/{tag}: {err or 'failed on another rank'}")
        if failed:
            raise config_mod.ConfigError(f"no checkpoint in {self.root} could be loaded: {'; '.join(failed)}; delete "
                                         f"{self.root} to start over")
        return 0


def _write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def check_finite_state(sd, what):
    """Refuse to write a non-finite adapter (every rank holds the gathered weights, so all raise together)."""
    bad = [k for k, v in sd.items() if not torch.isfinite(v).all()]
    if bad:
        raise NonFiniteError(f"not saving {what}: non-finite values in {len(bad)} adapter tensors (e.g. {bad[0]})")


def apply_schedule(cfg, sched):
    """After resume=force: the new learning_rate / schedule apply from the resumed step on (the saved scheduler
    state only keeps the step count)."""
    sched.base_lrs = [cfg.learning_rate for _ in sched.base_lrs]
    for group, base, fn in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base * fn(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]


def is_nonfinite_step(loss, grad_norm, fp16=False):
    """A step is non-finite when its loss is, or its gradient norm is (None: not reported). Under fp16 an
    overflowing gradient with a finite loss is DeepSpeed's loss scaler at work (it skips the step and lowers the
    scale; counted in skipped_steps), not divergence."""
    if not math.isfinite(loss):
        return True
    return grad_norm is not None and not math.isfinite(float(grad_norm)) and not fp16


def _micro_seed(seed, step, slot):
    # slot = micro * world + rank: the micro-batch's place in the global batch (BatchPlan's layout), so masks
    # and dropout belong to the data, not to the world size (2 ranks x micro m draw what 1 rank x micro m does)
    return (seed * 1_000_003 + step * 10_007 + slot * 101) % (2**63 - 1)


def _dump_grads(module, root, step, rank):
    """LLM2VEC_ENGINE_DUMP_GRADS=DIR: the full (ZeRO-3 gathered, rank-averaged) gradient of every trainable
    parameter at the end of step `step`'s backward, before the optimizer step, saved by rank 0 to
    DIR/grads_step{step}.pt. A collective; for tests that compare runs (e.g. 2 ranks against 1)."""
    from deepspeed.utils import safe_get_full_grad

    grads = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            g = safe_get_full_grad(p)
            grads[name] = None if g is None else g.detach().to("cpu", torch.float32).clone()
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        torch.save(grads, os.path.join(root, f"grads_step{step}.pt"))


def _record_grad_norm(engine):
    """Stage 0 with a plain fp32 optimizer: DeepSpeed clips the gradients but keeps no norm; record it for the log."""
    if engine.zero_optimization_stage() != 0 or hasattr(engine.optimizer, "_global_grad_norm"):
        return
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip():
        engine._global_grad_norm = clip_grad_norm_(parameters=engine.module.parameters(),
                                                   max_norm=engine.gradient_clipping(), mpu=engine.mpu)

    engine.clip_fp32_gradients = clip
    # ZeRO skips an optimizer step whose gradients are not finite; a plain optimizer under stage 0 would apply them
    # and leave NaN weights behind. Skip it here too and count it in skipped_steps, as DeepSpeed does.
    opt_step = engine.optimizer.step

    def step(*args, **kwargs):
        gn = getattr(engine, "_global_grad_norm", None)
        if gn is not None and not math.isfinite(float(gn)):
            engine.skipped_steps += 1
            return None
        return opt_step(*args, **kwargs)

    engine.optimizer.step = step


def _flat_bf16_grad_norm(engine):
    """DeepSpeed's BF16_Optimizer (stage 1 in bf16, engine/memory.py) takes the gradient norm and clips one
    trainable tensor at a time: a norm and a multiply per LoRA tensor, 896 launches per step for a 7B model,
    although the fp32 gradients already sit in one flat buffer per param group. Hand it those buffers (without
    their alignment padding) instead: the same norm and the same clipping in one launch each per group. This is
    exact here: there is no pipeline, tensor or expert parallelism (the cases where DeepSpeed leaves tensors out
    of the norm), every rank holds the full reduced gradient, and a tensor without a gradient is zeros in the
    buffer. Checked against deepspeed 0.19 (tests/test_step_structure.py compares both norms); anything else
    keeps DeepSpeed's own path. Returns whether the flat path is in use."""
    opt = engine.optimizer
    flat = getattr(opt, "fp32_groups_actual_gradients_flat", None)
    if (type(opt).__name__ != "BF16_Optimizer" or not flat or not callable(getattr(opt, "get_grads_for_norm", None))
            or getattr(opt, "has_moe_layers", True) or getattr(opt, "mpu", None) is not None):
        return False

    def grads_for_norm(for_clipping=False):
        return list(flat) if for_clipping else (list(flat), {})

    opt.get_grads_for_norm = grads_for_norm
    return True


def tune_optimizer_step(engine):
    """The engine's adjustments to DeepSpeed's optimizer step (shared with benchmarks/bench_step_ops); returns a
    line for the log."""
    _record_grad_norm(engine)
    flat = _flat_bf16_grad_norm(engine)
    wrapped = not isinstance(engine.optimizer, torch.optim.Optimizer)
    how = f"DeepSpeed {type(engine.optimizer).__name__} over torch AdamW" if wrapped else \
        "torch AdamW (no DeepSpeed wrapper)"
    dtype = next(engine.module.parameters()).dtype
    return (f"optimizer: {how}, ZeRO stage {engine.zero_optimization_stage()}, "
            f"{str(dtype).replace('torch.', '')} parameters" + ("; gradient norm and clipping on the flat fp32 "
                                                                "gradient buffer" if flat else ""))


class BestAdapter:
    """``output_dir/best/``: the adapter with the highest dev STS Spearman seen so far, beside the last one.

    Active when ``eval_every`` is set and ``eval_data`` is one STS file. ``best/engine_best.json`` records the
    step and score; a resumed run reads it back, so it only replaces a better adapter (a fresh run, start 0,
    ignores a stale one and replaces it at its first eval). Rank 0 decides and
    broadcasts (ranks could differ in the last float bit); the adapter gather is collective, the write atomic.
    """

    META = "engine_best.json"

    def __init__(self, cfg, rank, resumed):
        self.dir = os.path.join(cfg.output_dir, "best")
        self.score = -math.inf
        meta = os.path.join(self.dir, self.META)
        if resumed and rank == 0 and os.path.isfile(meta):
            with open(meta) as f:
                self.score = float(json.load(f)["spearman"])

    def update(self, step, spearman, module, cfg, tok, rank, device):
        flag = torch.tensor([1.0 if (rank == 0 and spearman > self.score) else 0.0], device=device)
        dist.broadcast(flag, 0)
        if not flag.item():
            return False
        sd = adapter_state_dict(module.model)
        check_finite_state(sd, "the best adapter")
        if rank == 0:
            self.score = spearman
            new = self.dir + ".new"
            write_adapter(module.model, sd, new, cfg, tok)
            with open(os.path.join(new, self.META), "w") as f:
                json.dump({"step": step, "spearman": spearman, "eval_data": cfg.eval_data[0]}, f)
            _replace_dir(new, self.dir)
        dist.barrier()
        return True




def _sts_spearman(module, stage, path, max_pairs=500):
    from .encoder import Encoder
    from .evaluate import sts_scores

    c = stage.cfg.contrastive
    enc = Encoder(module.model, stage.tok, pooling=c.pooling, max_length=c.max_len, instruction="")
    return sts_scores(enc, read_sts(path)[:max_pairs], batch_size=stage.cfg.micro_batch_size * 4)["spearman"]


def setup_model(cfg, stage, model, world, local_world, device, log=log0):
    """The stage's model changes, LoRA (fused per ``model.fused_ops``), then the memory plan, the ZeRO stage and the
    recompute policy it implies, applied. Returns (model, plan, zero_stage). Shared with benchmarks/bench_step_ops."""
    model = stage.prepare_model(model)
    if cfg.lora.enabled:
        model = add_lora(model, cfg.lora)
        fused = fuse_lora(model, cfg.model.fused_ops)
        log(f"fused LoRA ({cfg.model.fused_ops}): {fused['layers']} projections in {fused['groups']} groups")
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    mem = plan_memory(cfg, model, world, local_world, device)
    zero_stage, why = choose_zero_stage(cfg, mem)
    log(f"zero stage {zero_stage}: {why}")
    recompute, why = choose_recompute(cfg, mem, zero_stage)
    log(f"recompute {recompute}: {why}")
    enable_recompute(model, recompute)
    return model, mem, zero_stage


def train(cfg):
    import deepspeed

    device = init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    accum = config_mod.grad_accum_steps(cfg, world)  # a clear error before any heavy work
    if config_mod.negatives_warning(cfg, world):  # fewer in-batch negatives than the global batch
        _warn0(rank, config_mod.negatives_warning(cfg, world))
    resume_tags, resume_diff = plan_resume(cfg, rank)  # a different run in output_dir: an error before any load
    os.makedirs(cfg.output_dir, exist_ok=True)
    torch.manual_seed(cfg.seed)
    kernels.set_default_impl("attention", cfg.model.attention)
    set_deterministic_attention(cfg.model.deterministic_attention)
    kernels.set_default_impl("masked_ce", cfg.model.loss)
    kernels.set_default_impl("contrastive", cfg.model.loss)

    tok = load_tokenizer(cfg.model)
    stage = build_stage(cfg, tok)
    items, stats, groups = stage.load(cfg.data, cfg.max_samples)
    log0(f"stage {cfg.stage}: data {stats.summary()}; {len(items)} training items")
    eval_items, sts_eval = None, None
    if cfg.eval_data and cfg.eval_every:
        if len(cfg.eval_data) == 1 and is_sts_file(cfg.eval_data[0]):
            sts_eval = cfg.eval_data[0]  # dev Spearman, and output_dir/best/ (MNTP logs its eval loss too)
        if sts_eval is None or stage.name == "mntp":
            eval_items, _, _ = stage.load(cfg.eval_data)
    plan = BatchPlan(len(items), cfg.batch_size, cfg.micro_batch_size, world, rank, cfg.seed, groups)

    model, _ = load_model(cfg.model, device.type, tok)
    model, mem, zero_stage = setup_model(cfg, stage, model, world, int(os.environ.get("LOCAL_SIZE", world)), device)
    model.to(device)
    module = EngineModule(model, stage)
    params = _trainable(module)
    n_train = sum(p.numel() for p in params)
    n_all = sum(p.numel() for p in module.parameters())
    log0(f"trainable parameters {n_train:,} of {n_all:,} ({100 * n_train / n_all:.2f}%), world {world}, "
         f"micro {cfg.micro_batch_size} x accum {accum} x world = batch {cfg.batch_size}, device {device}")
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    dtype = next(model.parameters()).dtype
    ds_cfg = config_mod.deepspeed_config(cfg, world, use_bf16=dtype == torch.bfloat16, use_fp16=dtype == torch.float16,
                                         stage=zero_stage, lora_max_numel=mem.lora_max_numel,
                                         layer_numel=mem.layer_numel)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, lr_scheduler=sched, config=ds_cfg)
    log0(tune_optimizer_step(engine))
    ckpt = Checkpointer(cfg, engine, module, tok, rank)
    start = ckpt.resume(resume_tags)
    if start and resume_diff:
        apply_schedule(cfg, sched)
    if rank == 0:  # only now, after validation, the data, the model and the resume decision
        import yaml

        tmp = os.path.join(cfg.output_dir, "config.yaml.tmp")
        with open(tmp, "w") as f:
            yaml.safe_dump(config_mod.to_dict(cfg), f, sort_keys=False)
        os.replace(tmp, os.path.join(cfg.output_dir, "config.yaml"))
    logger = MetricsLogger(cfg, rank, start)
    best = BestAdapter(cfg, rank, resumed=start > 0) if sts_eval is not None else None
    fail_at = int(os.environ.get("LLM2VEC_ENGINE_FAIL_AT_STEP", "-1"))
    dump_grads = os.environ.get("LLM2VEC_ENGINE_DUMP_GRADS")

    bar = None
    if rank == 0 and cfg.progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=start, desc=cfg.stage, dynamic_ncols=True)
    engine.train()
    t_run = time.time()
    step = start
    bad_streak = 0  # non-finite steps in a row
    fp16 = dtype == torch.float16
    for step in range(start, cfg.max_steps):
        if step == fail_at and rank == 0:
            log0(f"fault injection: killing rank 0 at step {step}")
            os.kill(os.getpid(), signal.SIGKILL)
        t0 = time.time()
        # losses and token counts stay on the device: one read per optimizer step (the all-reduce below)
        red = torch.zeros(4, dtype=torch.float64, device=device)  # loss, tokens, truncated, non-finite grad norm
        truncated = 0
        for a, idx in enumerate(plan.micro_batches(step)):
            seed = _micro_seed(cfg.seed, step, a * world + rank)
            torch.manual_seed(seed)
            batch = stage.collate([items[i] for i in idx], torch.Generator().manual_seed(seed))
            truncated += int(batch.pop("truncated", 0))
            batch = to_device(batch, device)
            loss, metrics = stage.train_micro_step(engine, batch)
            if dump_grads and a == accum - 1:
                _dump_grads(module, dump_grads, step + 1, rank)
            engine.step()
            red[0] += loss.detach().to(torch.float64)
            red[1] += metrics.get("tokens", 0)
        red[0] /= accum
        red[2] = truncated
        gn_raw = engine.get_global_grad_norm()
        gn = float("nan") if gn_raw is None else float(gn_raw)
        red[3] = float(is_nonfinite_step(0.0, gn_raw, fp16))  # the loss itself is checked after the all-reduce
        dist.all_reduce(red)
        dt = time.time() - t0
        done = step + 1
        bad = red[3].item() > 0 or is_nonfinite_step(red[0].item(), None, fp16)  # a NaN on any rank survives the sum
        bad_streak = bad_streak + 1 if bad else 0
        row = {"loss": red[0].item() / world, "lr": sched.get_last_lr()[0], "grad_norm": gn,
               "tokens_per_s": red[1].item() / dt, "step_s": dt, "truncated": int(red[2].item()),
               "epoch": plan.position(step)[0], "nonfinite": int(bad), "skipped_steps": int(engine.skipped_steps)}
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}",
                            nonfinite=bad_streak, skipped=row["skipped_steps"])
        if bad:
            _warn0(rank, f"step {done}: non-finite loss {row['loss']} / grad norm {gn} ({bad_streak} in a row, "
                         f"DeepSpeed skipped {row['skipped_steps']} steps so far)")
        if cfg.eval_every and done % cfg.eval_every == 0:
            engine.eval()
            if eval_items is not None:
                row.update(stage.evaluate(engine, eval_items, world, rank, cfg.eval_batches))
            if sts_eval is not None:
                row["eval_sts_spearman"] = _sts_spearman(module, stage, sts_eval, cfg.eval_sts_pairs)
                row["best_saved"] = int(not bad and best.update(done, row["eval_sts_spearman"], module, cfg, tok, rank, device))
            engine.train()
        if done % cfg.log_every == 0 or done == cfg.max_steps or bad:
            logger.log(done, row)
            if bar is None:
                log0(f"step {done}/{cfg.max_steps} " + " ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        if bad_streak >= cfg.max_nonfinite_steps:
            raise NonFiniteError(
                f"{bad_streak} non-finite steps in a row (loss {row['loss']}, grad norm {gn}; max_nonfinite_steps="
                f"{cfg.max_nonfinite_steps}); stopped at step {done}, saving nothing from a non-finite state. Last good "
                f"checkpoint: {_last_good(ckpt.root)}")
        if cfg.save_every and done % cfg.save_every == 0 and done < cfg.max_steps:
            if bad:
                _warn0(rank, f"step {done}: not saving a checkpoint from a non-finite step")
            else:
                ckpt.save(done, plan)
    if bar is not None:
        bar.close()
    if bad_streak:
        raise NonFiniteError(f"the run ended with {bad_streak} non-finite steps in a row; no final checkpoint or "
                             f"adapter written (last good checkpoint: {_last_good(ckpt.root)})")
    if start < cfg.max_steps:
        ckpt.save(cfg.max_steps, plan)
    sd = adapter_state_dict(module.model)
    check_finite_state(sd, "the final adapter")
    if rank == 0:
        write_adapter(module.model, sd, os.path.join(cfg.output_dir, "adapter"), cfg, tok)
        log0(f"done: {cfg.max_steps} steps in {time.time() - t_run:.1f}s; adapter at "
             f"{os.path.join(cfg.output_dir, 'adapter')}")
    dist.barrier()
    return os.path.join(cfg.output_dir, "adapter")

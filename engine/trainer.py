"""The DeepSpeed ZeRO-3 training loop shared by every stage.

Data position is a pure function of the optimizer step (see ``BatchPlan``), masking and dropout RNGs
are re-seeded from (seed, step, micro-step, rank), so a run resumed from a checkpoint continues with
exactly the batches, masks and dropout an uninterrupted run would have used.

Checkpoints: ``<output_dir>/checkpoints/step_NNNNNNN/`` holds DeepSpeed's state (for resume) and
``adapter/`` (the LoRA adapter in PEFT format, safetensors). ``checkpoints/latest`` names the newest
complete one and is replaced atomically only after every rank finished writing, so a run killed
mid-save resumes from the previous checkpoint. The final adapter goes to ``<output_dir>/adapter/``.
"""
import csv
import json
import math
import os
import shutil
import signal
import time

import torch
import torch.distributed as dist

import kernels

from . import config as config_mod
from .bidirectional import set_deterministic_attention
from .data import BatchPlan, is_sts_file, read_sts
from .modeling import add_lora, load_model, load_tokenizer, resolve_model_path, save_encoder_meta
from .stages import build_stage
from .stages.base import to_device


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
    return torch.device("cpu")


def lr_lambda(cfg):
    def f(step):  # step = optimizer steps taken so far
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule in ("constant", "constant_with_warmup"):  # the peak LR after the warmup
            return 1.0
        span = max(cfg.max_steps - cfg.warmup_steps, 1)
        t = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
        return 1.0 - t if cfg.lr_schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * t))
    return f


class MetricsLogger:
    """metrics.csv (rank 0): one row per logged step. A column that appears later (eval metrics) rewrites the
    file with the wider header, so every row stays aligned; a resumed run appends to what is there."""

    def __init__(self, cfg, rank):
        self.rank, self.kind = rank, cfg.logger
        self.path = os.path.join(cfg.output_dir, "metrics.csv")
        self.rows, self.fields = [], []
        if rank == 0 and os.path.exists(self.path):
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                self.fields = list(reader.fieldnames or [])
                self.rows = list(reader)
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
                tmp = self.path + ".tmp"
                with open(tmp, "w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=self.fields)
                    w.writeheader()
                    w.writerows(self.rows)
                os.replace(tmp, self.path)
            else:
                with open(self.path, "a", newline="") as f:
                    csv.DictWriter(f, fieldnames=self.fields).writerow(row)
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()


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
    acfg["base_model_name_or_path"] = os.path.abspath(cfg.model.adapters[-1]) if cfg.model.adapters else base_path
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
        "prior_adapters": [os.path.abspath(a) for a in cfg.model.adapters],
        "bidirectional": cfg.model.bidirectional,
        "pooling": c.pooling,
        "max_length": c.max_len if cfg.stage != "mntp" else cfg.max_seq_len,
        "instruction": c.instruction,
    })
    _replace_dir(tmp, dst)


class Checkpointer:
    def __init__(self, cfg, engine, module, tokenizer, rank):
        self.cfg, self.engine, self.module, self.tok, self.rank = cfg, engine, module, tokenizer, rank
        self.root = os.path.join(cfg.output_dir, "checkpoints")

    def latest(self):
        p = os.path.join(self.root, "latest")
        if not os.path.isfile(p):
            return None
        with open(p) as f:
            tag = f.read().strip()
        return tag if os.path.isdir(os.path.join(self.root, tag)) else None

    def save(self, step, plan):
        tag = f"step_{step:07d}"
        self.engine.save_checkpoint(self.root, tag=tag, save_latest=False,
                                    client_state={"step": step, "data_position": list(plan.position(step))})
        sd = adapter_state_dict(self.module.model)
        if self.rank == 0:
            write_adapter(self.module.model, sd, os.path.join(self.root, tag, "adapter"), self.cfg, self.tok)
        dist.barrier()
        if self.rank == 0:
            tmp = os.path.join(self.root, "latest.tmp")
            with open(tmp, "w") as f:
                f.write(tag)
            os.replace(tmp, os.path.join(self.root, "latest"))
            tags = sorted(t for t in os.listdir(self.root) if t.startswith("step_") and os.path.isdir(
                os.path.join(self.root, t)))
            for old in tags[:-self.cfg.keep_checkpoints] if self.cfg.keep_checkpoints > 0 else []:
                shutil.rmtree(os.path.join(self.root, old), ignore_errors=True)
        dist.barrier()
        return tag

    def resume(self):
        tag = self.latest()
        if tag is None:
            return 0
        _, client = self.engine.load_checkpoint(self.root, tag=tag, load_module_strict=False)
        if client is None:
            raise RuntimeError(f"could not load checkpoint {self.root}/{tag}")
        log0(f"resumed from {tag}: step {client['step']}, data position (epoch, batch) {client['data_position']}")
        return int(client["step"])


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
        if rank == 0:
            self.score = spearman
            new = self.dir + ".new"
            write_adapter(module.model, sd, new, cfg, tok)
            with open(os.path.join(new, self.META), "w") as f:
                json.dump({"step": step, "spearman": spearman, "eval_data": cfg.eval_data[0]}, f)
            _replace_dir(new, self.dir)
        dist.barrier()
        return True


def _micro_seed(seed, step, micro, rank):
    return (seed * 1_000_003 + step * 10_007 + micro * 101 + rank) % (2**63 - 1)


def _sts_spearman(module, stage, path, max_pairs=500):
    from .encoder import Encoder
    from .evaluate import sts_scores

    c = stage.cfg.contrastive
    enc = Encoder(module.model, stage.tok, pooling=c.pooling, max_length=c.max_len, instruction="")
    return sts_scores(enc, read_sts(path)[:max_pairs], batch_size=stage.cfg.micro_batch_size * 4)["spearman"]


def train(cfg):
    import deepspeed

    device = init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    accum = config_mod.grad_accum_steps(cfg, world)  # a clear error before any heavy work
    os.makedirs(cfg.output_dir, exist_ok=True)
    if rank == 0:
        import yaml

        with open(os.path.join(cfg.output_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(config_mod.to_dict(cfg), f, sort_keys=False)
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
    model = stage.prepare_model(model)
    if cfg.model.gradient_checkpointing:
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.enabled:
        model = add_lora(model, cfg.lora)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
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
    ds_cfg = config_mod.deepspeed_config(cfg, world, use_bf16=dtype == torch.bfloat16, use_fp16=dtype == torch.float16)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, lr_scheduler=sched, config=ds_cfg)
    ckpt = Checkpointer(cfg, engine, module, tok, rank)
    start = ckpt.resume()
    logger = MetricsLogger(cfg, rank)
    best = BestAdapter(cfg, rank, resumed=start > 0) if sts_eval is not None else None
    fail_at = int(os.environ.get("LLM2VEC_ENGINE_FAIL_AT_STEP", "-1"))

    bar = None
    if rank == 0 and cfg.progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=start, desc=cfg.stage, dynamic_ncols=True)
    engine.train()
    t_run = time.time()
    step = start
    for step in range(start, cfg.max_steps):
        if step == fail_at and rank == 0:
            log0(f"fault injection: killing rank 0 at step {step}")
            os.kill(os.getpid(), signal.SIGKILL)
        t0 = time.time()
        loss_sum, tokens, truncated = 0.0, 0, 0
        for a, idx in enumerate(plan.micro_batches(step)):
            seed = _micro_seed(cfg.seed, step, a, rank)
            torch.manual_seed(seed)
            batch = stage.collate([items[i] for i in idx], torch.Generator().manual_seed(seed))
            truncated += int(batch.pop("truncated", 0))
            batch = to_device(batch, device)
            loss, metrics = stage.train_micro_step(engine, batch)
            engine.step()
            loss_sum += float(loss)
            tokens += int(metrics.get("tokens", 0))
        red = torch.tensor([loss_sum / accum, tokens, truncated], dtype=torch.float64, device=device)
        dist.all_reduce(red)
        dt = time.time() - t0
        done = step + 1
        row = {"loss": red[0].item() / world, "lr": sched.get_last_lr()[0],
               "grad_norm": float(engine.get_global_grad_norm() or float("nan")),
               "tokens_per_s": red[1].item() / dt, "step_s": dt, "truncated": int(red[2].item()),
               "epoch": plan.position(step)[0]}
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
        if cfg.eval_every and done % cfg.eval_every == 0:
            engine.eval()
            if eval_items is not None:
                row.update(stage.evaluate(engine, eval_items, world, rank, cfg.eval_batches))
            if sts_eval is not None:
                row["eval_sts_spearman"] = _sts_spearman(module, stage, sts_eval, cfg.eval_sts_pairs)
                row["best_saved"] = int(best.update(done, row["eval_sts_spearman"], module, cfg, tok, rank, device))
            engine.train()
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            logger.log(done, row)
            if bar is None:
                log0(f"step {done}/{cfg.max_steps} " + " ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        if cfg.save_every and done % cfg.save_every == 0 and done < cfg.max_steps:
            ckpt.save(done, plan)
    if bar is not None:
        bar.close()
    if start < cfg.max_steps:
        ckpt.save(cfg.max_steps, plan)
    sd = adapter_state_dict(module.model)
    if rank == 0:
        write_adapter(module.model, sd, os.path.join(cfg.output_dir, "adapter"), cfg, tok)
        log0(f"done: {cfg.max_steps} steps in {time.time() - t_run:.1f}s; adapter at "
             f"{os.path.join(cfg.output_dir, 'adapter')}")
    dist.barrier()
    return os.path.join(cfg.output_dir, "adapter")

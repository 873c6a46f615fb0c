"""The DeepSpeed training loop shared by every stage: set up, then per optimizer step the step and what follows it.

``train(cfg)`` reads as its three parts: ``Trainer.setup`` (world, resume plan, data, model, optimizer, resume),
``Trainer.train_step`` (the micro-batches of one optimizer step, their losses all-reduced once) and
``Trainer.after_step`` (eval, log, the non-finite guard, save). Data position is a pure function of the optimizer
step (see ``BatchPlan``), masking and dropout RNGs are re-seeded from (seed, step, micro-step slot), so a run resumed
from a checkpoint (engine/checkpoint.py) continues with exactly the batches, masks and dropout an uninterrupted run
would have used. Non-finite steps are counted; a non-finite state is never saved, and ``max_nonfinite_steps`` of them
in a row stop the run (``NonFiniteError``, exit code 3). The final adapter goes to ``<output_dir>/adapter/``.
"""
import csv
import os
import signal
import time

import torch
import torch.distributed as dist

import llm2vec_kernels

from . import config as config_mod
from .config import ConfigError
from .bidirectional import set_deterministic_attention
from .checkpoint import (BestAdapter, Checkpointer, adapter_state_dict, check_finite_state, check_shared_folder,
                         drop_stale_best, hold_run_folder, last_good, plan_resume, release_run_folder, restore_best,
                         sts_spearman, write_adapter)
from .data import BatchPlan, DataError, is_sts_file
from .distributed import (gathered, init_distributed, local_world_size, log0, on_rank0, said_by_rank0, smallest,
                          together, warn0)
from .encoding import NoRoomError
from .files import write_text
from .lora import fuse_lora
from .memory import (base_too_big, choose_recompute, choose_zero_stage, context_warning, enable_recompute, fit_warning,
                     kernel_arch_error, plan_memory, selective_recompute_error)
from .metrics import MetricsLogger
from .modeling import add_lora, describe_lora_targets, load_model, load_tokenizer
from .optim import (apply_optimizer_settings, apply_schedule, decay_horizon, is_nonfinite_step, lr_lambda, param_groups,
                    schedule_warnings, tune_optimizer_step)
from .stages import build_stage
from .stages.base import EVAL_SEED, to_device
from .token_cache import data_identity


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


def setup_model(cfg, stage, model, world, local_world, device, log=log0):
    """The stage's model changes, LoRA (fused per ``model.fused_ops``), then the memory plan, the ZeRO stage and the
    recompute policy it implies, applied. Returns (model, plan, zero_stage). Shared with the CPU proxy (benchmarks/step_paths.py)."""
    model = stage.prepare_model(model)
    if cfg.lora.enabled:
        model = add_lora(model, cfg.lora)
        fused = fuse_lora(model, cfg.model.fused_ops)
        log(f"fused LoRA ({cfg.model.fused_ops}): {fused['layers']} projections in {fused['groups']} groups; targets "
            f"{describe_lora_targets(cfg.lora.target_modules, model.config.model_type)}")
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    mem = plan_memory(cfg, model, world, local_world, device)
    mem.budget_bytes = smallest(mem.budget_bytes, device)  # one plan for every rank (nodes may differ in memory)
    zero_stage, why = choose_zero_stage(cfg, mem)
    log(f"zero stage {zero_stage}: {why}")
    offload = config_mod.offload_warning(cfg, zero_stage)
    if offload:
        log("warning: " + offload)
    recompute, why = choose_recompute(cfg, mem, zero_stage)
    log(f"recompute {recompute}: {why}")
    too_big = fit_warning(mem, recompute, zero_stage)
    if too_big and device.type == "cuda":  # on CPU the plan is for a GPU, not for host RAM
        log("warning: " + too_big)
    enable_recompute(model, recompute)
    return model, mem, zero_stage


class Trainer:
    """One training run: what ``setup`` builds, then one ``train_step`` and one ``after_step`` per optimizer step."""

    log_error = None  # rank 0's failed metrics write, raised on every rank at the next all-reduce (log)
    truncated_unlogged = 0  # texts cut in steps whose rows log_every left out: carried into the next logged row
    # (and over a resume: loop_state)
    false_negatives_unlogged = 0  # the same for the pairs contrastive.mask_false_negatives left out

    def __init__(self, cfg):
        self.cfg = cfg
        self.lock = None  # rank 0's hold on output_dir (engine/checkpoint.py), released by close()

    # -- setup ---------------------------------------------------------------------------------------------------

    def setup(self):
        """Everything before the first step; returns the step to start from. Every check that can refuse the run
        (batch divisibility, a different run in output_dir) comes before any heavy work."""
        cfg = self.cfg
        self.device = init_distributed()
        refused = kernel_arch_error(cfg, self.device) or selective_recompute_error(cfg)  # before the model loads
        if refused:  # (minutes at 7B)
            raise config_mod.ConfigError(refused)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.accum = config_mod.grad_accum_steps(cfg, self.world)
        self.lock = hold_run_folder(cfg.output_dir, self.rank, self.device)  # a second run into it exits here
        few_negatives = config_mod.negatives_warning(cfg, self.world)  # fewer in-batch negatives than the batch
        if few_negatives:
            warn0(self.rank, few_negatives)
        for warning in (config_mod.dropout_warning(cfg), config_mod.eval_warning(cfg)):
            if warning:
                warn0(self.rank, warning)
        check_shared_folder(cfg.output_dir, self.rank)  # every rank sees the files rank 0 writes and resumes from
        # rank 0 decides what the run resumes and tells every rank (each reading the folder itself could differ)
        resume_tags, resume_diff = on_rank0(lambda: plan_resume(cfg, self.rank))
        torch.manual_seed(cfg.seed)
        llm2vec_kernels.set_default_impl("attention", cfg.model.attention)
        set_deterministic_attention(cfg.model.deterministic_attention)
        llm2vec_kernels.set_default_impl("masked_ce", cfg.model.loss)
        llm2vec_kernels.set_default_impl("contrastive", cfg.model.loss)
        self._setup_data()
        self._setup_model()
        self._setup_optimizer()
        self.ckpt = Checkpointer(cfg, self.engine, self.module, self.tok, self.rank, data=self.data_id)
        self.start = self.ckpt.resume(resume_tags)
        self.resumed_another_run = bool(self.start and resume_diff)  # resume=force over a checkpoint of other settings
        if self.start and resume_diff:
            apply_schedule(cfg, self.sched)
            log0(apply_optimizer_settings(cfg, self.engine, self.sched))
        self._setup_loop()
        return self.start

    def _setup_data(self):
        cfg = self.cfg
        self.tok = load_tokenizer(cfg.model)
        self.stage = build_stage(cfg, self.tok)
        # together: a rank that fails alone (a file missing on its node) tells the others, which would otherwise wait
        # in the next collective until its timeout
        self.items, stats, groups = together(lambda: self.stage.load(cfg.data, cfg.max_samples))
        log0(f"stage {cfg.stage}: data {stats.summary()}; {len(self.items)} training items")
        self.data_id = data_identity(cfg.data, len(self.items))
        self._check_same_data()
        self.eval_items, self.sts_eval = None, None
        if cfg.eval_data and cfg.eval_every:
            if len(cfg.eval_data) == 1 and is_sts_file(cfg.eval_data[0]):
                self.sts_eval = cfg.eval_data[0]  # dev Spearman, and output_dir/best/ (MNTP logs its eval loss too)
            if self.sts_eval is None or self.stage.name == "mntp":
                self.eval_items, eval_stats, _ = together(  # same text, any seed
                    lambda: self.stage.load(cfg.eval_data, seed=EVAL_SEED))
                log0(f"eval data: {eval_stats.summary()}; {len(self.eval_items)} items")
        self.plan = BatchPlan(len(self.items), cfg.batch_size, cfg.micro_batch_size, self.world, self.rank, cfg.seed,
                              groups)
        log0(f"batches: {self.plan.summary()}")
        if self.plan.starved:
            warn0(self.rank, f"{len(self.plan.starved)} data source(s) have fewer items than one global batch "
                             f"({cfg.batch_size}) and are never trained on (every batch is drawn from one source, "
                             f"contrastive.source_homogeneous_batches): "
                             f"{', '.join(f'{g} ({n})' for g, n in self.plan.starved.items())}")

    def _check_same_data(self):
        """Every rank reads the data itself, and the batch plan assumes they all read the same items: nodes holding
        different copies under the same paths (a stale file, an interrupted unpack) would each draw their share of
        a different plan, training some items twice and others never. Refused before the model loads (one
        all-gather of the item count and the sources' content hash)."""
        import socket

        seen = gathered((socket.gethostname(), self.data_id))
        odd = [(r, host, d) for r, (host, d) in enumerate(seen) if d != seen[0][1]]
        if odd:
            what = lambda r, host, d: f"rank {r} on {host}: {d['items']} items, sha256 {d['sha256'][:12]}"  # noqa
            raise said_by_rank0(DataError(
                f"the ranks read different data under the same paths ({what(0, *seen[0])}; "
                f"{'; '.join(what(*o) for o in odd[:3])}{'; ...' if len(odd) > 3 else ''}): every node must hold "
                f"the same files"), self.rank)

    def _setup_model(self):
        cfg, world = self.cfg, self.world
        model, _ = together(lambda: load_model(cfg.model, self.device.type, self.tok))  # as the data (_setup_data)
        beyond = context_warning(cfg, model.config)  # texts longer than the positions the model was trained on
        if beyond:
            warn0(self.rank, beyond)
        model, self.mem, self.zero_stage = setup_model(cfg, self.stage, model, world,
                                                       local_world_size(world), self.device)
        if self.device.type == "cuda":  # (train.py checks it on the meta model when the architecture is offline)
            too_big = base_too_big(self.mem.weights_bytes, torch.cuda.get_device_properties(self.device).total_memory,
                                   self.mem.dtype)
            if too_big:
                raise ConfigError(too_big)
        model.to(self.device)
        self.module = EngineModule(model, self.stage)
        self.dtype = next(model.parameters()).dtype
        n_train = sum(p.numel() for p in self.module.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in self.module.parameters())
        log0(f"trainable parameters {n_train:,} of {n_all:,} ({100 * n_train / n_all:.2f}%), world {world}, "
             f"micro {cfg.micro_batch_size} x accum {self.accum} x world = batch {cfg.batch_size}, "
             f"device {self.device}")

    def _setup_optimizer(self):
        import deepspeed

        cfg, dtype = self.cfg, self.dtype
        opt = torch.optim.AdamW(param_groups(self.module, cfg.weight_decay), lr=cfg.learning_rate,
                                betas=tuple(cfg.adam_betas))
        self.sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, self.plan.steps_per_epoch))
        for warning in schedule_warnings(cfg, self.plan.steps_per_epoch):
            warn0(self.rank, warning)
        if cfg.lr_decay_epochs and cfg.lr_schedule in ("linear", "cosine"):
            log0(f"schedule: {cfg.lr_schedule} decay reaches 0 at step {decay_horizon(cfg, self.plan.steps_per_epoch)} "
                 f"= {cfg.lr_decay_epochs:g} epochs of {self.plan.steps_per_epoch} steps; the run stops at step "
                 f"{cfg.max_steps}")
        ds_cfg = config_mod.deepspeed_config(cfg, self.world, use_bf16=dtype == torch.bfloat16,
                                             use_fp16=dtype == torch.float16, stage=self.zero_stage,
                                             **self.mem.deepspeed_sizes())
        self.engine, _, _, _ = deepspeed.initialize(model=self.module, optimizer=opt, lr_scheduler=self.sched,
                                                    config=ds_cfg)
        log0(tune_optimizer_step(self.engine))

    def _setup_loop(self):
        """config.yaml, the metrics log, best/, the progress bar and the loop's counters."""
        cfg, rank = self.cfg, self.rank

        def files():  # rank 0's reads and writes in output_dir; every rank learns if one failed (together)
            if rank == 0:  # only now, after validation, the data, the model and the resume decision
                _write_config(cfg)
                if self.start == 0:  # starting over (resume=force; auto refuses a best/ without a checkpoint)
                    drop_stale_best(cfg.output_dir)
                else:  # best/ as of the checkpoint: one written past it is of steps this run trains again
                    restore_best(cfg.output_dir, self.ckpt.root, self.ckpt.resumed_tag,
                                 forced=self.resumed_another_run)
            try:
                logger = MetricsLogger(cfg, rank, self.start)
            except (UnicodeDecodeError, csv.Error) as e:
                raise ConfigError(f"{cfg.output_dir}/metrics.csv does not read as the engine's CSV ({e}): move it "
                                  f"aside to resume") from None
            return logger, BestAdapter(cfg, rank, resumed=self.start > 0) if self.sts_eval is not None else None

        self.logger, self.best = together(files)
        self.fail_at = int(os.environ.get("LLM2VEC_ENGINE_FAIL_AT_STEP", "-1"))
        self.dump_grads = os.environ.get("LLM2VEC_ENGINE_DUMP_GRADS")
        self.bar = None
        if rank == 0 and cfg.progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=cfg.max_steps, initial=self.start, desc=cfg.stage, dynamic_ncols=True)
        self.bad_streak = 0  # non-finite steps in a row
        # the counters a checkpoint carries (loop_state): a resumed run's rows and warnings count as the uninterrupted
        # run's; a checkpoint from before they were kept resumes them at 0
        carried = self.ckpt.resumed_state
        self.empty_steps = int(carried.get("empty_steps", 0))  # steps with no loss unit in the batch (empty_step)
        self.truncated_unlogged = int(carried.get("truncated_unlogged", 0))  # (log)
        self.false_negatives_unlogged = int(carried.get("false_negatives_unlogged", 0))
        self.engine.train()
        self.t_run = time.time()

    # -- step ----------------------------------------------------------------------------------------------------

    def train_step(self, step):
        """Optimizer step ``step`` (0-based): its micro-batches, then one all-reduce of (loss, tokens, truncated,
        non-finite grad norm, rank 0's failed metrics write: :meth:`log`, false negatives masked). Returns (the log row,
        whether the step was non-finite on any rank)."""
        if step == self.fail_at and self.rank == 0:
            log0(f"fault injection: killing rank 0 at step {step}")
            os.kill(os.getpid(), signal.SIGKILL)
        engine, world, fp16 = self.engine, self.world, self.dtype == torch.float16
        lr = self.sched.get_last_lr()[0]  # the LR this step's update applies (the scheduler steps with it)
        t0 = time.time()
        # losses and token counts stay on the device: one read per optimizer step (the all-reduce below)
        red = torch.zeros(6, dtype=torch.float64, device=self.device)
        truncated, batches = 0, []
        for a, idx in enumerate(self.plan.micro_batches(step)):  # collated first: their loss units weigh them
            seed = _micro_seed(self.cfg.seed, step, a * world + self.rank)
            try:
                batch = self.stage.collate([self.items[i] for i in idx], torch.Generator().manual_seed(seed))
            except NoRoomError as e:  # a row's own instruction (load checked the config's and E5's): one line, exit 2
                raise DataError(f"step {step + 1}, a training row: {e}") from None
            truncated += int(batch.pop("truncated", 0))
            batches.append((seed, batch))
        weights = self.unit_weights([self.stage.loss_units(b) for _, b in batches])
        if weights is None:
            return self.empty_step(step, lr, truncated, t0), False
        for a, (seed, batch) in enumerate(batches):
            torch.manual_seed(seed)  # dropout: the micro-batch's slot draws it, whatever the world size
            batch = to_device(batch, self.device)
            loss, metrics = self.stage.train_micro_step(engine, batch, weights[a])
            if self.dump_grads and a == self.accum - 1:
                _dump_grads(self.module, self.dump_grads, step + 1, self.rank)
            engine.step()
            red[0] += loss.detach().to(torch.float64) * weights[a]
            red[1] += metrics.get("tokens", 0)
            if "false_negatives" in metrics:  # contrastive.mask_false_negatives: pairs left out (no op when off)
                red[5] += metrics["false_negatives"]
        red[0] /= self.accum
        red[2] = truncated
        gn_raw = engine.get_global_grad_norm()
        gn = float("nan") if gn_raw is None else float(gn_raw)
        red[3] = float(is_nonfinite_step(0.0, gn_raw, fp16))  # the loss itself is checked after the all-reduce
        red[4] = float(self.log_error is not None)
        dist.all_reduce(red)
        red = red.tolist()  # the step's one read of the device
        dt = time.time() - t0
        if red[4] > 0:
            self.raise_log_error()
        bad = red[3] > 0 or is_nonfinite_step(red[0], None, fp16)  # a NaN on any rank survives the sum
        row = {"loss": red[0] / world, "lr": lr, "grad_norm": gn,
               "tokens_per_s": red[1] / dt, "step_s": dt, "truncated": int(red[2]),
               "epoch": self.plan.position(step)[0], "nonfinite": int(bad), "skipped_steps": int(engine.skipped_steps)}
        if self.cfg.stage != "mntp" and self.cfg.contrastive.mask_false_negatives:
            row["false_negatives"] = int(red[5])  # (query, candidate) pairs of the global batch left out of the loss
        return row, bad

    def unit_weights(self, units):
        """Each micro-batch's loss weight (:func:`unit_weights`), the units counted over every micro-batch of every
        rank by one all-reduce; all 1 for a stage without loss units; None when the global batch holds no unit
        (every rank sees the same total, so every rank skips the step together)."""
        if any(u is None for u in units):
            return [1.0] * len(units)
        total = torch.tensor([float(sum(units))], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        total = total.item()  # one read of the device
        return unit_weights(units, self.accum, self.world, total) if total > 0 else None

    def empty_step(self, step, lr, truncated, t0):
        """The row of a step whose global batch holds no loss unit (no masked token on any rank: short rows under
        a low mask rate). Its loss is undefined and its gradient 0; DeepSpeed's step would still move the weights
        (Adam's momentum, weight decay) and advance the schedule, so nothing runs: no forward, no update, the LR
        where it was. The row's loss and grad_norm stay empty and the run says so, counting such steps."""
        self.empty_steps += 1
        warn0(self.rank, f"step {step + 1}: no masked token in the whole global batch: no update, the schedule stays "
                         f"({self.empty_steps} such step(s) so far; raise mntp.mask_prob or the batch size)")
        red = torch.tensor([float(truncated), float(self.log_error is not None)], dtype=torch.float64,
                           device=self.device)
        dist.all_reduce(red)
        red = red.tolist()
        if red[1] > 0:
            self.raise_log_error()
        return {"loss": None, "lr": lr, "grad_norm": None, "tokens_per_s": 0.0, "step_s": time.time() - t0,
                "truncated": int(red[0]), "epoch": self.plan.position(step)[0], "nonfinite": 0,
                "skipped_steps": int(self.engine.skipped_steps)}

    # -- after the step: eval, log, save ---------------------------------------------------------------------------

    def after_step(self, done, row, bad):
        """What follows optimizer step number ``done`` (1-based): progress, eval, log, the non-finite guard, save."""
        self.bad_streak = self.bad_streak + 1 if bad else 0
        if self.bar is not None:
            self.bar.update(1)
            loss = "-" if row["loss"] is None else f"{row['loss']:.4f}"
            self.bar.set_postfix(loss=loss, lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}",
                                 nonfinite=self.bad_streak, skipped=row["skipped_steps"])
        if bad:
            warn0(self.rank, f"step {done}: non-finite loss {row['loss']} / grad norm {row['grad_norm']} "
                             f"({self.bad_streak} in a row, DeepSpeed skipped {row['skipped_steps']} steps so far)")
        evaluated = bool(self.cfg.eval_every and done % self.cfg.eval_every == 0)
        if evaluated:
            self.evaluate(done, row, bad)
        self.log(done, row, always=bad or evaluated)  # an eval's row is logged whatever log_every says
        if self.bad_streak >= self.cfg.max_nonfinite_steps:
            raise said_by_rank0(NonFiniteError(
                f"{self.bad_streak} non-finite steps in a row (loss {row['loss']}, grad norm {row['grad_norm']}; "
                f"max_nonfinite_steps={self.cfg.max_nonfinite_steps}); stopped at step {done}, saving nothing from a "
                f"non-finite state. Last good checkpoint: {last_good(self.ckpt.root)}"), self.rank)
        self.save(done, bad)

    def evaluate(self, done, row, bad):
        """The stage's eval metrics and/or the dev STS Spearman into ``row``; a better dev score replaces best/."""
        engine = self.engine
        engine.eval()
        if self.eval_items is not None:
            row.update(self.stage.evaluate(engine, self.eval_items, self.world, self.rank, self.cfg.eval_batches))
        if self.sts_eval is not None:
            row["eval_sts_spearman"] = sts_spearman(self.module, self.stage, self.sts_eval, self.cfg.eval_sts_pairs)
            row["best_saved"] = int(not bad and self.best.update(done, row["eval_sts_spearman"], self.module, self.cfg,
                                                                 self.tok, self.rank, self.device))
        engine.train()

    def log(self, done, row, always=False):
        """Rank 0 appends ``row`` to metrics.csv (and TensorBoard); its ``truncated`` counts the texts cut since the
        last logged row (every step's, whatever ``log_every`` leaves out), and so does ``false_negatives`` (the
        (query, candidate) pairs ``contrastive.mask_false_negatives`` left out of the loss) where the row has it. A
        failed write (a full disk) is kept, not raised: the other ranks are already on their way into the next step's
        collectives, which rank 0 would never join. The next step's all-reduce carries a flag for it, and every rank
        raises it together (:meth:`raise_log_error`; after the last step, :meth:`finish`): one step later, at no cost
        to a step that logs fine."""
        cfg = self.cfg
        self.truncated_unlogged += row.get("truncated", 0)
        self.false_negatives_unlogged += row.get("false_negatives", 0)
        if done % cfg.log_every == 0 or done == cfg.max_steps or always:
            row = {**row, "truncated": self.truncated_unlogged}  # every text cut since the last logged row
            if "false_negatives" in row:
                row["false_negatives"] = self.false_negatives_unlogged
            self.truncated_unlogged = self.false_negatives_unlogged = 0
            if self.rank == 0 and self.log_error is None:
                try:
                    self.logger.log(done, row)
                except Exception as e:
                    self.log_error = e
            if self.bar is None:
                log0(f"step {done}/{cfg.max_steps} " + " ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))

    def raise_log_error(self):
        """Rank 0's failed metrics write (:meth:`log`), raised on every rank: rank 0 its own error, the others a copy
        marked ``from_rank`` (``engine.distributed.together``), so the run ends with one line and one exit code."""
        def rank0_error():
            if self.log_error is not None:
                raise self.log_error

        together(rank0_error)

    def save(self, done, bad):
        """A periodic checkpoint (the last step's is written by ``finish``), never from a non-finite step."""
        cfg = self.cfg
        if cfg.save_every and done % cfg.save_every == 0 and done < cfg.max_steps:
            if bad:
                warn0(self.rank, f"step {done}: not saving a checkpoint from a non-finite step")
            else:
                # A checkpoint marks metrics.csv complete up to its step: this step's failed row (log) must end the
                # run before it is marked, or a resume from here would never write that row (one collective).
                self.raise_log_error()
                self.ckpt.save(done, self.plan, self.loop_state())

    def loop_state(self):
        """The counters a checkpoint carries into a resumed run: the texts cut and the false negatives left out since
        the last logged row (a row log_every leaves out counts into the next one) and the steps with no loss unit so
        far."""
        return {"truncated_unlogged": int(self.truncated_unlogged), "empty_steps": int(self.empty_steps),
                "false_negatives_unlogged": int(self.false_negatives_unlogged)}

    # -- the end -------------------------------------------------------------------------------------------------

    def finish(self):
        """The last checkpoint and the final adapter; returns the adapter's path."""
        cfg = self.cfg
        if self.bar is not None:
            self.bar.close()
        self.raise_log_error()  # the last step's row: no all-reduce follows it to carry the flag (one collective)
        if self.bad_streak:
            raise said_by_rank0(NonFiniteError(
                f"the run ended with {self.bad_streak} non-finite steps in a row; no final checkpoint or adapter "
                f"written (last good checkpoint: {last_good(self.ckpt.root)})"), self.rank)
        if self.start < cfg.max_steps:
            self.ckpt.save(cfg.max_steps, self.plan, self.loop_state())
        sd = adapter_state_dict(self.module.model)
        check_finite_state(sd, "the final adapter", self.rank)
        adapter = os.path.join(cfg.output_dir, "adapter")
        together(lambda: write_adapter(self.module.model, sd, adapter, cfg, self.tok, cfg.max_steps)
                 if self.rank == 0 else None)
        best = self.best.summary() if self.best is not None else None
        log0(f"done: {cfg.max_steps} steps in {time.time() - self.t_run:.1f}s; adapter at {adapter}"
             + (f"; {best}" if best else ""))
        return adapter

    def close(self):
        release_run_folder(self.lock, self.cfg.output_dir)
        self.lock = None


def train(cfg):
    """Train one stage as ``cfg`` says; returns the final adapter's path."""
    run = Trainer(cfg)
    try:
        start = run.setup()
        for step in range(start, cfg.max_steps):
            row, bad = run.train_step(step)
            run.after_step(step + 1, row, bad)
        return run.finish()
    finally:
        run.close()


def _write_config(cfg):
    import yaml

    write_text(os.path.join(cfg.output_dir, "config.yaml"), yaml.safe_dump(config_mod.to_dict(cfg), sort_keys=False))


def unit_weights(units, accum, world, total):
    """The loss weights w_a = units[a] * accum * world / total of a rank's micro-batches, for a stage whose
    micro-batch loss is a mean over ``units[a]`` terms (``Stage.loss_units``: MNTP's masked tokens); ``total``
    counts them over every micro-batch of every rank.

    DeepSpeed averages the backward over the accum micro-batches and the world's ranks, so the step's gradient
    is that of sum_a w_a loss_a / (accum world) = (the sum of every term's loss) / total: the mean over the global
    batch, as one micro-batch holding it all would give. Unweighted, a micro-batch of 1 masked token weighed as
    much as one of 500, and the objective changed with micro_batch_size. With no unit in the step every weight
    is 0 (its loss and gradient are 0)."""
    scale = accum * world / total if total > 0 else 0.0
    return [u * scale for u in units]


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

"""The optimizer side of a step: the learning-rate schedule and the engine's adjustments to DeepSpeed's step.

Schedule, with ``s`` the optimizer steps taken, ``w`` = warmup_steps, ``T`` = max_steps and ``t = (s - w) / (T - w)``
clipped to [0, 1]: the LR factor is ``(s + 1) / w`` during the warmup, then ``1`` (constant), ``1 - t`` (linear) or
``(1 + cos(pi t)) / 2`` (cosine).

A step is non-finite when its loss or its gradient norm is (``is_nonfinite_step``); under stage 0 the engine skips
such a step itself, as ZeRO does.
"""
import math

import torch


def decay_horizon(cfg, steps_per_epoch=None):
    """The step at which linear or cosine decay reaches 0: ``lr_decay_steps``; or ``lr_decay_epochs`` epochs of the
    data, ceil(epochs x steps_per_epoch) (llm2vec's HF Trainer decays over ``num_train_epochs`` epochs of its
    dataloader); else ``max_steps``."""
    if cfg.lr_decay_epochs:
        if not steps_per_epoch:
            raise ValueError("lr_decay_epochs needs the data's steps per epoch")
        return max(math.ceil(cfg.lr_decay_epochs * steps_per_epoch), 1)
    return cfg.lr_decay_steps or cfg.max_steps


def schedule_warnings(cfg, steps_per_epoch=None):
    """What in the schedule defeats itself: a warmup the run never finishes (the LR never reaches learning_rate),
    or a linear / cosine decay that ends inside the warmup (the LR falls to 0 right after it). Warnings, not
    errors: a short smoke run of a recipe config does the first on purpose."""
    out, w = [], cfg.warmup_steps
    if w and w >= cfg.max_steps:
        out.append(f"warmup_steps {w} >= max_steps {cfg.max_steps}: the run ends inside the warmup, at "
                   f"{cfg.max_steps / w:.0%} of learning_rate {cfg.learning_rate:g}")
    ignored = ignored_horizon(cfg)
    if ignored:
        out.append(ignored)
    if cfg.lr_schedule in ("linear", "cosine") and (steps_per_epoch or not cfg.lr_decay_epochs):
        # (a horizon in epochs needs the data's size: a dry run, which reads no data, leaves it out)
        horizon = decay_horizon(cfg, steps_per_epoch)
        if w and horizon <= w < cfg.max_steps:
            out.append(f"the {cfg.lr_schedule} decay reaches 0 at step {horizon}, not after the warmup of {w} steps: "
                       f"the LR is 0 from step {w + 2} to max_steps {cfg.max_steps}")
        elif w < horizon < cfg.max_steps:  # e.g. lr_decay_epochs of a data set smaller than the run
            out.append(f"the {cfg.lr_schedule} decay reaches 0 at step {horizon}, before max_steps {cfg.max_steps}: "
                       f"the LR is 0 from step {horizon + 1} on, and those steps train nothing")
    return out


def ignored_horizon(cfg):
    """A warning (or None) when a decay horizon is set under a schedule that does not decay: a shipped config's
    ``lr_decay_epochs`` with ``lr_schedule=constant`` would otherwise be printed and logged as if it applied."""
    if cfg.lr_schedule in ("linear", "cosine") or not (cfg.lr_decay_steps or cfg.lr_decay_epochs):
        return None
    what = f"lr_decay_steps {cfg.lr_decay_steps}" if cfg.lr_decay_steps else f"lr_decay_epochs {cfg.lr_decay_epochs:g}"
    return (f"{what} is ignored: lr_schedule {cfg.lr_schedule} does not decay (the LR stays at learning_rate after "
            f"the warmup); use linear or cosine to decay")


def lr_lambda(cfg, steps_per_epoch=None):
    """The LR factor of the schedule above, as a function of the optimizer steps taken (for LambdaLR);
    ``steps_per_epoch``: the data's global batches per epoch, which ``lr_decay_epochs`` needs."""
    horizon = decay_horizon(cfg, steps_per_epoch)

    def f(step):  # step = optimizer steps taken so far
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule in ("constant", "constant_with_warmup"):  # the peak LR after the warmup
            return 1.0
        span = max(horizon - cfg.warmup_steps, 1)
        t = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
        return 1.0 - t if cfg.lr_schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * t))
    return f


def param_groups(module, weight_decay):
    """AdamW's parameter groups: the trainable matrices (LoRA's A and B, or a full fine-tune's weights) decayed by
    ``weight_decay``; the 1-D ones (norm weights, biases) never, as in Hugging Face's Trainer, since pulling a norm's
    gain towards 0 shrinks its layer's output. Each group is tagged ``decay``; an empty group is left out (a LoRA run
    has no 1-D trainable parameter, so it keeps one group)."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay, "decay": True},
              {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0, "decay": False}]
    return [g for g in groups if g["params"]]


def apply_schedule(cfg, sched):
    """After resume=force: the new learning_rate / schedule apply from the resumed step on (the saved scheduler
    state only keeps the step count)."""
    sched.base_lrs = [cfg.learning_rate for _ in sched.base_lrs]
    for group, base, fn in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base * fn(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]


def apply_optimizer_settings(cfg, engine, sched):
    """After resume=force: the new ``adam_betas``, ``weight_decay`` and ``max_grad_norm`` apply from the resumed
    step on. Loading a checkpoint restores the saved ones (torch's ``load_state_dict`` replaces the param groups,
    and DeepSpeed's bf16 / ZeRO optimizers restore their ``clip_grad``), which would silently keep the old values.
    Returns one line reading the values back from the optimizer."""
    for group in sched.optimizer.param_groups:
        group["betas"] = tuple(cfg.adam_betas)
        group["weight_decay"] = cfg.weight_decay if group.get("decay", True) else 0.0
    wrapper = getattr(engine, "optimizer", None)
    if wrapper is not None and hasattr(wrapper, "clip_grad"):
        wrapper.clip_grad = cfg.max_grad_norm
    g = next((g for g in sched.optimizer.param_groups if g.get("decay", True)), sched.optimizer.param_groups[0])
    clip = getattr(wrapper, "clip_grad", None)
    clip = clip if clip is not None else engine.gradient_clipping()
    return (f"resume=force: optimizer now betas {tuple(float(b) for b in g['betas'])}, weight_decay "
            f"{float(g['weight_decay']):g}, lr {float(g['lr']):g}, gradient clipping {float(clip):g}")


def is_nonfinite_step(loss, grad_norm, fp16=False):
    """A step is non-finite when its loss is, or its gradient norm is (None: not reported). Under fp16 an
    overflowing gradient with a finite loss is DeepSpeed's loss scaler at work (it skips the step and lowers the
    scale; counted in skipped_steps), not divergence."""
    if not math.isfinite(loss):
        return True
    return grad_norm is not None and not math.isfinite(float(grad_norm)) and not fp16


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
    # and leave NaN weights behind. Skip it here too, and say so through the optimizer's ``overflow`` flag, which
    # DeepSpeed reads after the step (engine._take_model_step): it then counts the step in skipped_steps and leaves
    # the LR schedule where it was, as for its own skips (stepping it would shift warmup and decay by a step).
    opt = engine.optimizer
    opt_step = opt.step
    opt.overflow = False

    def step(*args, **kwargs):
        gn = getattr(engine, "_global_grad_norm", None)
        opt.overflow = gn is not None and not math.isfinite(float(gn))
        if opt.overflow:
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
    """The engine's adjustments to DeepSpeed's optimizer step (shared with the CPU proxy,
    benchmarks/step_paths.py); returns a line for the log."""
    _record_grad_norm(engine)
    flat = _flat_bf16_grad_norm(engine)
    wrapped = not isinstance(engine.optimizer, torch.optim.Optimizer)
    how = f"DeepSpeed {type(engine.optimizer).__name__} over torch AdamW" if wrapped else \
        "torch AdamW (no DeepSpeed wrapper)"
    dtype = next(engine.module.parameters()).dtype
    return (f"optimizer: {how}, ZeRO stage {engine.zero_optimization_stage()}, "
            f"{str(dtype).replace('torch.', '')} parameters" + ("; gradient norm and clipping on the flat fp32 "
                                                                "gradient buffer" if flat else ""))

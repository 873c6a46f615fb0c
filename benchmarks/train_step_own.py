"""MNTP rows whose model is built in this process for that row alone (benchmarks/gpu_run.sh runs each in its own
process), all on the same batch for the same --seed: llm2vec's one-GPU recipe (reference, reference-fa2: no
DeepSpeed, no engine code) and engine-auto, what `deepspeed engine/train.py` sets up for this model on this device
(benchmarks.step_paths.Path "engine")."""
import gc
import importlib.util
import statistics
import time
import traceback
import types

import torch

from benchmarks.harness import (GPU_MODEL, LORA, TINY_LORA, TINY_MODEL, SyntheticTokenizer, _rand_ids, batch_stats,
                                build_hf_reference, count_params, hf_reference_forward, hf_reference_step,
                                make_stages, make_train_config, sync, unshift_labels)
from benchmarks.step_paths import ARCHS, eager_bidirectional_mask, hf_attention
from benchmarks.step_paths import Path as StepPath
from benchmarks.train_step_measure import (FLOPS_DEF, GPU_SHAPES, MASK, TINY_SHAPES, Terminated, log, out_of_time,
                                           peak_tflops, shape_name, stage_flops, step_stats, term_cut)
from benchmarks.train_step_profile import profile_step
from engine.stages.base import to_device

# llm2vec's own one-GPU recipe, measured without the DeepSpeed engine (MNTP only): attention implementation
HF_REFERENCES = {"reference": "sdpa", "reference-fa2": "flash_attention_2"}
# rows with a model of their own, MNTP only (measure_own_model): llm2vec's recipe and the trainer's own setup
OWN_MODEL = list(HF_REFERENCES) + ["engine-auto"]


def own_model_spec(arch, tiny):
    """The model of the own-model rows: --arch's structure (benchmarks.step_paths.ARCHS; the harness's
    Mistral-7B by default), or at --tiny the harness's tiny Llama, or for another structure the same tiny sizes
    with that structure's family and features (Gemma2: soft-caps, four norms a layer)."""
    if arch == "mistral-7b":
        return TINY_MODEL if tiny else GPU_MODEL
    if not tiny:
        return ARCHS[arch]
    small = {k: TINY_MODEL[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                       "num_attention_heads", "num_key_value_heads", "head_dim",
                                       "max_position_embeddings")}
    return dict(ARCHS[arch], **small)


def row_shape(arch, shapes):
    """The MNTP row's shape name; another structure than Mistral-7B's is named in front ("gemma2-9b:mntp ..."),
    so that the summary keeps those rows apart from issue 7's targets."""
    name = shape_name("mntp", shapes)
    return name if arch == "mistral-7b" else f"{arch}:{name}"


class _OwnModel:
    """A row's model, batch and step, built in this process for this row alone (see measure_own_model)."""

    def __init__(self, step, eval_loss, model, mcfg, n_frozen, n_lora, head_rows, recompute, extra, title):
        self.step, self.eval_loss, self.model, self.mcfg = step, eval_loss, model, mcfg
        self.n_frozen, self.n_lora, self.head_rows, self.recompute = n_frozen, n_lora, head_rows, recompute
        self.extra, self.title = extra, title


def _mntp_batch(args, lora, mask, vocab, device):
    """The MNTP batch every own-model row trains on: the same ids, masks and labels for the same --seed."""
    B, S = (TINY_SHAPES if args.tiny else GPU_SHAPES)["mntp"]
    stage = make_stages(make_train_config(args.tiny, lora, mask), SyntheticTokenizer(vocab))[("mntp", "engine")]
    g = torch.Generator().manual_seed(args.seed)
    coll = stage.collate([_rand_ids(g, S, vocab) for _ in range(B)], torch.Generator().manual_seed(args.seed + 1))
    return coll, batch_stats("mntp", to_device(coll, device))  # collate's host-side layout is a nested dict


def _hf_attention(impl, spec):
    """flash-attn 2 for reference-fa2; else SDPA, or transformers' eager attention where it refuses SDPA."""
    return HF_REFERENCES[impl] if impl != "reference" else hf_attention(spec)


def _build_hf_reference(args, impl, device, dtype, spec, lora, mask):
    attn = _hf_attention(impl, spec)
    model = build_hf_reference(spec, dtype, device, lora, attn=attn, seed=args.seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    coll, st = _mntp_batch(args, lora, mask, spec["vocab_size"], device)
    batch = {"input_ids": coll["input_ids"].to(device), "hf_labels": unshift_labels(coll["labels"]).to(device)}
    if attn == "eager":  # bidirectional: eager attention adds the masks it is handed (all zeros, no padding)
        batch["hf_mask"] = eager_bidirectional_mask(model, batch["input_ids"], dtype)
    n_frozen, n_lora = count_params(model)
    return st, _OwnModel(step=lambda: hf_reference_step(model, opt, params, batch),
                         eval_loss=lambda: hf_reference_forward(model, batch), model=model, mcfg=model.config,
                         n_frozen=n_frozen, n_lora=n_lora, head_rows=st["padded_tokens"], recompute="full",
                         extra={"zero": "none", "attn": attn}, title="no DeepSpeed")


def _build_engine_auto(args, impl, device, dtype, spec, lora, mask):
    """The trainer's own setup (benchmarks.step_paths.Path "engine": engine.trainer.setup_model with its fused
    LoRA groups and Triton decoder ops, the memory plan's ZeRO stage and recompute policy, DeepSpeed from
    engine.config.deepspeed_config and engine.optim.tune_optimizer_step) on the batch of the reference row. The
    plan is for the card's own memory (an H200's on the CPU rehearsal: step_paths.memory_budget_set); the row
    says which (budget_gib). The parameters are counted before DeepSpeed starts: ZeRO-3 partitions them, and a
    partitioned weight's numel() is 0 (the MFU would count no frozen weights)."""
    B = (TINY_SHAPES if args.tiny else GPU_SHAPES)["mntp"][0]
    sets = [f"lora.r={lora['r']}", f"lora.alpha={lora['alpha']}", f"lora.dropout={lora['dropout']}",
            f"mntp.mask_prob={mask[0]}", f"mntp.scheme={mask[1]}"]
    if device.type != "cuda":  # the CPU rehearsal: fp32 and the kernels' torch paths (the plan stays an H200's)
        sets += ["model.dtype=fp32", "model.attention=auto", "model.loss=auto", "model.fused_ops=auto"]
    path = StepPath("engine", spec, device.type, sets, B)
    n_frozen, n_lora = count_params(path.module.model)
    path.init_deepspeed()
    coll, st = _mntp_batch(args, lora, mask, spec["vocab_size"], device)
    batch = types.SimpleNamespace(engine=to_device(coll, device))

    def eval_loss():
        return path.module(batch.engine)[0]

    opt = type(path.engine.optimizer).__name__
    return st, _OwnModel(step=lambda: path.step(batch), eval_loss=eval_loss, model=path.module,
                         mcfg=path.module.model.config, n_frozen=n_frozen, n_lora=n_lora, head_rows=st["masked"],
                         recompute=path.recompute,
                         extra={"zero": str(path.zero_stage), "recompute": path.recompute, "optimizer": opt,
                                "fused_ops": path.cfg.model.fused_ops,
                                "budget_gib": f"{path.plan.budget_bytes / 2**30:.1f}"},
                         title=f"ZeRO {path.zero_stage}, {path.recompute} recompute, {opt}")


OWN_MODEL_IMPLS = {"reference": _build_hf_reference, "reference-fa2": _build_hf_reference,
                   "engine-auto": _build_engine_auto}


def measure_own_model(args, writer, impl, profile_out=None):
    """An MNTP row whose model is built in this process for this row alone (gpu_run.sh runs each in its own
    process), on the same batch for the same --seed:

    * reference / reference-fa2: llm2vec's one-GPU recipe, no DeepSpeed and no engine code. HF model + PEFT
      LoRA, bf16 on the GPU, bidirectional SDPA (or flash-attn 2) with no mask on the unpadded MNTP batch,
      full gradient checkpointing, full-logit CE inside the HF loss, clip 1.0 + torch AdamW;
    * engine-auto: what `deepspeed engine/train.py` sets up for this model on this device (_build_engine_auto).

    A SIGTERM (Terminated: the step's `timeout`) ends the measurement where it is: the row is written from the
    steps timed so far with cut=term (train_step_measure.term_cut), without the profiled step.
    """
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tiny = args.tiny
    arch = getattr(args, "arch", "mistral-7b")
    spec = own_model_spec(arch, tiny)
    shapes, lora = (TINY_SHAPES, TINY_LORA) if tiny else (GPU_SHAPES, LORA)
    shape = row_shape(arch, shapes)
    mask = MASK["tiny" if tiny else "gpu"]
    extra = {"world": 1, "dtype": str(dtype).replace("torch.", ""), "mask_prob": mask[0], "mask_scheme": mask[1],
             "arch": arch}
    if HF_REFERENCES.get(impl) == "flash_attention_2":
        extra.update(zero="none", attn="flash_attention_2")
        if importlib.util.find_spec("flash_attn") is None:
            return writer.add(shape, impl, "step", float("nan"), status="skipped", detail="flash_attn not installed",
                              **extra)
        if device.type != "cuda":
            return writer.add(shape, impl, "step", float("nan"), status="skipped", detail="flash-attn needs CUDA",
                              **extra)
    status, failure, times, peak, loss = "ok", None, [], float("nan"), float("nan")
    own, cut_by_term = None, False
    try:
        st, own = OWN_MODEL_IMPLS[impl](args, impl, device, dtype, spec, lora, mask)
        extra.update(own.extra)
        model_flops, hw_flops = stage_flops("mntp", st, own.mcfg, own.n_frozen, own.n_lora, head_rows=own.head_rows,
                                            recompute=own.recompute)
        extra.update(tokens=st["tokens"], padded_tokens=st["padded_tokens"], masked_rows=st["masked"],
                     model_tflop=f"{model_flops / 1e12:.2f}", head_rows=own.head_rows, flops_def=FLOPS_DEF)
        own.model.eval()  # the loss before any step (LoRA B is zero): the same batch on every own-model row
        with torch.no_grad():
            extra["eval_loss0"] = f"{float(own.eval_loss()):.6f}"
        own.model.train()
        for _ in range(args.warmup):
            own.step()
        sync(device)
        log(f"{impl}: {args.warmup} warm-up steps done; timing up to {args.steps}")
        base = 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        for _ in range(args.steps):
            sync(device)
            t0 = time.perf_counter()
            loss = float(own.step())
            sync(device)
            times.append(time.perf_counter() - t0)
            if out_of_time(args, times):
                extra["cut"] = "budget"
                break
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / 2**20
            extra["act_peak_mb"] = f"{peak - base / 2**20:.1f}"
    except Terminated as exc:
        log(f"{impl}: {exc}; writing the row of the {len(times)} step(s) timed so far")
        cut_by_term = True
        if times and device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / 2**20
            extra["act_peak_mb"] = f"{peak - base / 2**20:.1f}"
    except torch.cuda.OutOfMemoryError as exc:
        status, failure = "oom", str(exc).split("\n")[0][:80]
    except Exception as exc:  # recorded, never fatal
        traceback.print_exc()
        status, failure = "error", f"{type(exc).__name__}: {exc}".split("\n")[0][:80]
    extra["status"] = status
    if failure:
        extra["detail"] = failure.replace(";", ",").replace("=", ":")
    if cut_by_term:
        term_cut(extra, len(times))
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    pk, pk_src = peak_tflops(gpu, args.peak_tflops)
    if times:
        s = statistics.median(times)
        extra.update(step_stats(times, args.warmup))
        extra.update(tokens_per_s=f"{st['tokens'] / s:.1f}", steps_ms="/".join(f"{t * 1e3:.1f}" for t in times),
                     mfu=f"{model_flops / s / 1e12 / pk:.4f}" if pk == pk else "nan",
                     hfu=f"{hw_flops / s / 1e12 / pk:.4f}" if pk == pk else "nan", peak_tflops=f"{pk:.1f}",
                     peak_src=pk_src.replace(";", ","), loss=f"{loss:.4f}")
        row = writer.add(shape, impl, "step", s * 1e3, tflops=model_flops / s / 1e12, peak_mb=peak, **extra)
        log(f"{impl}: median {s * 1e3:.1f} ms, min {extra['min_ms']} ms, IQR {extra['iqr_ms']} ms over {len(times)} "
            f"steps; loss {loss:.4f}")
        if profile_out is not None and status == "ok" and not cut_by_term and device.type == "cuda":
            try:
                title = f"mntp / {impl} ({gpu}, {extra['dtype']}, {own.title})"
                text, cats, wall, busy = profile_step(own.step, device, {"V": spec["vocab_size"],
                                                                         "I": spec["intermediate_size"],
                                                                         "r": lora["r"], "H": spec["hidden_size"]},
                                                      title)
                with open(profile_out, "a") as f:
                    f.write(text + "\n")
                print(text, flush=True)
            except Exception as exc:
                log(f"profile of {impl} failed: {type(exc).__name__}: {exc}")
    else:
        row = writer.add(shape, impl, "step", float("nan"), **extra)
    del own
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row

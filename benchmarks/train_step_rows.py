"""The train-step rows that share one model and one DeepSpeed engine (bench_train_step's IMPLS: the older
reference-zero3, the engine's stages and their torch-kernel ablations, the big-batch supervised steps): the
model is built once, and the attention path, the kernel implementations and the stage are switched between
rows. Without DeepSpeed (absent, or failing on the device) PlainEngine runs the same calls in plain torch."""
import gc
import re
import statistics
import time
import traceback

import torch
import torch.distributed as dist
from torch.autograd.profiler import record_function

import llm2vec_kernels
from benchmarks.harness import (DEEPSPEED_ERROR, GPU_MODEL, LORA, TINY_LORA, TINY_MODEL, SyntheticTokenizer, _lengths, _rand_ids,
                                batch_stats, build_model, count_params, make_batches, make_stages, make_train_config,
                                deepspeed, set_attention_path, sync)
from benchmarks.train_step_measure import (GPU_SHAPES, MASK, T0, TINY_SHAPES, FLOPS_DEF, log, out_of_time,
                                           peak_tflops, shape_name, stage_flops, step_stats)
from benchmarks.train_step_profile import CATEGORIES, profile_step
from engine.bidirectional import set_attention_dropout
from engine.config import deepspeed_config
from engine.distributed import init_distributed
from engine.encoding import pad_batch
from engine.modeling import add_lora
from engine.trainer import EngineModule

IMPLS = {  # name -> (path, {op: impl})
    "reference-zero3": ("reference", {"attention": "auto", "masked_ce": "auto", "contrastive": "torch"}),
    "engine": ("engine", {"attention": "auto", "masked_ce": "auto", "contrastive": "auto"}),
    "engine-torch-attention": ("engine", {"attention": "torch", "masked_ce": "auto", "contrastive": "auto"}),
    "engine-torch-masked_ce": ("engine", {"attention": "auto", "masked_ce": "torch", "contrastive": "auto"}),
    "engine-torch-contrastive": ("engine", {"attention": "auto", "masked_ce": "auto", "contrastive": "torch"}),
}


class PlainEngine:
    """Stand-in for the DeepSpeed engine when DeepSpeed cannot be imported or initialised: the same calls in
    plain torch (AdamW, clipping at 1.0), so the run still compares the paths; rows then say zero=none."""

    def __init__(self, module, optimizer):
        self.module, self.optimizer = module, optimizer
        self.params = [p for p in module.parameters() if p.requires_grad]

    def __call__(self, batch):
        return self.module(batch)

    def backward(self, loss):
        loss.backward()

    def step(self):
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)

    def train(self, mode=True):
        self.module.train(mode)

    def eval(self):
        self.module.train(False)


class Bench:
    def __init__(self, args):
        self.args = args
        self.tiny = args.tiny
        self.zero = "none" if getattr(args, "no_deepspeed", False) else "3"
        try:
            if self.zero == "none":
                raise RuntimeError("--no-deepspeed")
            if deepspeed is None:
                raise RuntimeError(f"deepspeed cannot be imported ({DEEPSPEED_ERROR})")
            self.device = init_distributed()  # a world of one; DeepSpeed places the module on this device
            probe = torch.ones(1, device=self.device)
            dist.all_reduce(probe)  # the process group works (ZeRO-3 gathers go through it)
            if probe.item() != 1.0:
                raise RuntimeError(f"all_reduce in a world of one returned {probe.item()}")
        except Exception as exc:
            if self.zero == "3":
                log(f"WARNING: DeepSpeed unavailable ({type(exc).__name__}: {exc}); measuring without ZeRO-3")
            self.zero = "none"
            self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        spec = TINY_MODEL if self.tiny else GPU_MODEL
        self.shapes = TINY_SHAPES if self.tiny else GPU_SHAPES
        self.lora = TINY_LORA if self.tiny else LORA
        self.cfg = make_train_config(self.tiny, self.lora, MASK["tiny" if self.tiny else "gpu"])
        self.tok = SyntheticTokenizer(spec["vocab_size"])
        self.stages = make_stages(self.cfg, self.tok)

        t0 = time.perf_counter()
        self._build(spec)
        if self.zero == "3":
            try:
                ds_cfg = deepspeed_config(self.cfg, 1, use_bf16=self.dtype == torch.bfloat16)
                self.engine, _, _, _ = deepspeed.initialize(model=self.module, optimizer=self.optimizer,
                                                            config=ds_cfg)
            except Exception as exc:
                traceback.print_exc()
                log(f"WARNING: deepspeed.initialize failed ({type(exc).__name__}: {exc}); rebuilding the model "
                    "and measuring without ZeRO-3")
                self.zero = "none"
                del self.model, self.module, self.optimizer
                self.cleanup()
                self._build(spec)
        if self.zero == "none":
            self.engine = PlainEngine(self.module, self.optimizer)
        self.engine.train()
        mem = (f", {torch.cuda.memory_allocated(self.device) / 2**30:.1f} GiB allocated"
               if self.device.type == "cuda" else "")
        log(f"model + LoRA + {'ZeRO-3 engine' if self.zero == '3' else 'plain torch engine'} built in "
            f"{time.perf_counter() - t0:.1f} s on {self.device} ({self.dtype}){mem}; frozen GEMM params "
            f"{self.n_frozen / 1e9:.3f} B, LoRA {self.n_lora / 1e6:.2f} M")
        self.batches = make_batches(self.shapes, self.stages, spec["vocab_size"], self.device, seed=args.seed)
        self.stats = {s: batch_stats(s, b) for s, b in self.batches.items()}
        self.gpu = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.peak, self.peak_src = peak_tflops(self.gpu, args.peak_tflops)
        self.dims_cfg = {"V": self.mcfg.vocab_size, "I": self.mcfg.intermediate_size, "r": self.lora["r"],
                         "H": self.mcfg.hidden_size}
        self.step_s = {}  # (stage, impl) -> slowest measured step (s), for the time budget

    def _build(self, spec):
        """Random model on the device -> MNTP head -> bidirectional -> checkpointing -> LoRA -> EngineModule."""
        model = build_model(spec, self.dtype, self.device)
        self.mcfg = model.config
        model = self.stages[("mntp", "engine")].prepare_model(model)  # LM head that can return the fused loss
        set_attention_path(model, "engine")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = add_lora(model, self.cfg.lora)
        self.n_frozen, self.n_lora = count_params(model)
        self.model = model
        self.module = EngineModule(model, self.stages[("mntp", "engine")])
        self.optimizer = torch.optim.AdamW([p for p in self.module.parameters() if p.requires_grad], lr=1e-5)

    # -- switching -------------------------------------------------------------------------------
    def configure(self, stage, impl):
        path, impls = IMPLS[impl]
        for op, val in impls.items():
            llm2vec_kernels.set_default_impl(op, val)
        set_attention_path(self.model, path)
        set_attention_dropout(self.model, 0.3 if stage == "simcse" else 0.0)
        self.module.stage = self.stages[(stage, path)]

    def train_step(self, batch):
        loss, _ = self.module.stage.train_micro_step(self.engine, batch)
        self.engine.step()
        return loss

    def phased_step(self, batch):
        """The same step with profiler scopes around forward, backward and the optimizer step."""
        with record_function("phase:forward"):
            loss, _ = self.engine(batch)
        with record_function("phase:backward"):
            self.engine.backward(loss)
        with record_function("phase:optimizer"):
            self.engine.step()
        return loss

    def recover(self):
        """Best effort after an OOM or error inside a step: drop grads and cached blocks."""
        try:
            self.engine.zero_grad()
        except Exception:
            pass
        try:
            coord = self.engine.optimizer.parameter_offload.get_param_coordinator()
            coord.release_and_reset_all(self.module)
        except Exception:
            pass
        try:
            self.module.zero_grad(set_to_none=True)
        except Exception:
            pass
        self.cleanup()

    def cleanup(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def estimate_s(self, stage, impl, profile):
        """Rough cost of a measurement from what was measured so far (0 when nothing was)."""
        same = [t for (s, _), t in self.step_s.items() if s == stage]
        if same:
            step = max(same)
        elif self.step_s:
            per_token = max(t / self.stats[s]["tokens"] for (s, _), t in self.step_s.items())
            step = per_token * self.stats[stage]["tokens"] * (1.5 if impl.startswith("reference") else 1.0)
        else:
            return 0.0
        step *= 1.5 if "torch" in impl else 1.0
        return (self.args.warmup + self.args.steps) * step + ((step + 10.0) if profile else 0.0)

    # -- parity ----------------------------------------------------------------------------------
    @torch.no_grad()
    def parity(self, stage):
        """Eval-mode loss of the reference and the engine path on the same batch (no dropout)."""
        losses = {}
        self.engine.eval()
        try:
            for impl in ("reference-zero3", "engine"):
                self.configure(stage, impl)
                loss, _ = self.engine(self.batches[stage])
                losses[impl] = float(loss)
        finally:
            self.engine.train()
        ref = losses["reference-zero3"]
        rel = abs(losses["engine"] - ref) / max(abs(ref), 1e-12)
        log(f"parity {stage}: reference-zero3 {ref:.6f} engine {losses['engine']:.6f} rel {rel:.2e}")
        return rel, losses

    # -- one measurement -------------------------------------------------------------------------
    def measure(self, writer, stage, impl, parity_rel, profile_out=None):
        st = self.stats[stage]
        full_logits = stage == "mntp" and impl.startswith("reference")
        model_flops, hw_flops = stage_flops(stage, st, self.mcfg, self.n_frozen, self.n_lora,
                                            head_rows=st["padded_tokens"] if full_logits else None)
        shape = shape_name(stage, self.shapes)
        extra = {"tokens": st["tokens"],
                 "padded_tokens": st["padded_tokens"] if impl.startswith("reference") else st["tokens"],
                 "dtype": str(self.dtype).replace("torch.", ""), "zero": self.zero, "world": 1,
                 "peak_tflops": f"{self.peak:.1f}", "peak_src": self.peak_src.replace(";", ","),
                 "model_tflop": f"{model_flops / 1e12:.2f}", "parity_rel": f"{parity_rel:.2e}", "flops_def": FLOPS_DEF}
        if stage == "mntp":
            extra["masked_rows"] = st["masked"]
            extra["head_rows"] = st["padded_tokens"] if full_logits else st["masked"]
            extra["mask_prob"], extra["mask_scheme"] = MASK["tiny" if self.tiny else "gpu"]
        batch = self.batches[stage]
        self.cleanup()
        status, times, peak, act_peak, loss = "ok", [], float("nan"), float("nan"), float("nan")
        failure = None
        try:
            self.configure(stage, impl)
            for _ in range(self.args.warmup):
                self.train_step(batch)
            sync(self.device)
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
                base = torch.cuda.memory_allocated(self.device)
            for _ in range(self.args.steps):
                sync(self.device)
                t0 = time.perf_counter()
                loss = float(self.train_step(batch))
                sync(self.device)
                times.append(time.perf_counter() - t0)
                if out_of_time(self.args, times):
                    extra["cut"] = "budget"
                    break
            if self.device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(self.device) / 2**20
                act_peak = peak - base / 2**20
        except torch.cuda.OutOfMemoryError as exc:
            status, failure = "oom", str(exc).split("\n")[0][:80]
        except Exception as exc:  # recorded, never fatal: the rest of the GPU run goes on
            traceback.print_exc()
            status, failure = "error", f"{type(exc).__name__}: {exc}".split("\n")[0][:80]
        if failure is not None:
            self.recover()
            extra["detail"] = failure.replace(";", ",").replace("=", ":")
        extra["status"] = status
        if times:
            s = statistics.median(times)
            self.step_s[(stage, impl)] = max(times)
            extra.update(step_stats(times, self.args.warmup))
            extra.update(tokens_per_s=f"{st['tokens'] / s:.1f}", steps_ms="/".join(f"{t * 1e3:.1f}" for t in times),
                         mfu=f"{model_flops / s / 1e12 / self.peak:.4f}" if self.peak == self.peak else "nan",
                         hfu=f"{hw_flops / s / 1e12 / self.peak:.4f}" if self.peak == self.peak else "nan",
                         act_peak_mb=f"{act_peak:.1f}", loss=f"{loss:.4f}")
            row = writer.add(shape, impl, "step", s * 1e3, tflops=model_flops / s / 1e12, peak_mb=peak, **extra)
        else:
            row = writer.add(shape, impl, "step", float("nan"), **extra)
        if profile_out is not None and status == "ok":
            self.profile(writer, stage, impl, shape, profile_out)
        return row

    def profile(self, writer, stage, impl, shape, path):
        try:
            title = f"{stage} / {impl} ({self.gpu}, {str(self.dtype)[6:]}, zero={self.zero})"
            text, cats, wall, busy = profile_step(lambda: self.phased_step(self.batches[stage]), self.device,
                                                  self.dims_cfg, title)
        except Exception as exc:
            traceback.print_exc()
            writer.add(shape, impl, "profile", float("nan"), status="error",
                       detail=f"{type(exc).__name__}: {exc}".split("\n")[0][:80].replace(";", ",").replace("=", ":"))
            return
        with open(path, "a") as f:
            f.write(text + "\n")
        print(text, flush=True)
        keys = {c: re.sub(r"[^a-z]+", "_", c.lower()).strip("_") for c in CATEGORIES}
        writer.add(shape, impl, "profile", wall, status="ok", busy_ms=f"{busy:.1f}",
                   busy_pct=f"{100 * busy / max(wall, 1e-9):.0f}" if self.device.type == "cuda" else "nan",
                   **{f"{keys[c]}_ms": f"{v:.2f}" for c, v in cats.items()})


BIG_BATCH_WARMUP, BIG_BATCH_STEPS = 1, 1  # per configuration, unless --warmup / --steps say otherwise


def big_batch(bench, writer, sizes, chunk, budget, warmup=BIG_BATCH_WARMUP, steps=BIG_BATCH_STEPS):
    """Peak memory and time of the supervised engine step at large global batches, without gradient caching
    (chunk 0) and with it. Texts are short (queries 8-32 tokens, positives/negatives 16-64) so a 7B step at
    batch 4096 (12288 texts) stays within a GPU run's minutes; memory without caching grows with the batch,
    with caching it is bounded by one chunk's activations plus the (n_texts, H) embeddings.

    Each configuration runs ``warmup`` untimed steps (the first compiles the Triton kernels for the new shapes and
    carries DeepSpeed's first-step setup), then ``steps`` timed ones (none or fewer when the next would end past
    ``budget``, judged by the last step's time, the warm-up's for the first: cut=budget); ms is their median and
    the row's extras give the quartiles, warmup and timed_steps (step_stats), so the summary can say a time below
    the protocol (5 + 20) is provisional. peak_mb is the peak over every step, the first included (read after the
    warm-up too, so a cut keeps it): a batch fits only if its first step does."""
    lo_q, hi_q, lo_d, hi_d = (4, 8, 6, 12) if bench.tiny else (8, 32, 16, 64)
    # Most needed first, so a run that is cut short keeps the issue-6 figure (the largest batch WITH caching):
    # every size with caching, largest first, then the sizes without it (the largest is expected to OOM).
    runs = ([(B, chunk) for B in sorted(sizes, reverse=True)] if chunk > 0 else []) + [(B, 0) for B in sorted(sizes)]
    batches = {}
    for B, c in runs:
        if B not in batches:
            g = torch.Generator().manual_seed(B)
            lens = _lengths(g, B, lo_q, hi_q) + _lengths(g, 2 * B, lo_d, hi_d)
            seqs = [_rand_ids(g, n, bench.mcfg.vocab_size) for n in lens]
            ids, am, pm = pad_batch(seqs, 0, "right", extra=([[1] * n for n in lens],))
            batches[B] = ({"input_ids": ids.to(bench.device), "attention_mask": am.to(bench.device),
                           "pool_mask": pm.to(bench.device), "n_queries": torch.tensor(B)}, int(am.sum()))
        batch, n_tokens = batches[B]
        shape = f"supervised-bigbatch B{B}+{B}p+{B}n q{lo_q}-{hi_q} d{lo_d}-{hi_d}"
        impl = f"engine-gradcache{c}" if c else "engine-nocache"
        elapsed = time.perf_counter() - T0
        if elapsed > budget:
            writer.add(shape, impl, "step", float("nan"), status="skipped_budget", elapsed_s=f"{elapsed:.0f}")
            continue
        bench.cfg.contrastive.grad_cache_chunk = c
        bench.configure("supervised", "engine")
        bench.cleanup()
        status, peak, detail, times, cut = "ok", float("nan"), "", [], None
        try:
            if bench.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(bench.device)
            sync(bench.device)
            t0 = time.perf_counter()
            for _ in range(warmup):
                bench.train_step(batch)
            sync(bench.device)
            estimate = (time.perf_counter() - t0) / max(warmup, 1)  # a warm-up step's time, the first included
            if bench.device.type == "cuda":  # the issue-6 figure survives a cut or a stop in the timed steps
                peak = torch.cuda.max_memory_allocated(bench.device) / 2**20
            for _ in range(steps):
                if time.perf_counter() - T0 + (max(times) if times else estimate) > budget:
                    cut = "budget"
                    break
                t0 = time.perf_counter()
                bench.train_step(batch)
                sync(bench.device)
                times.append(time.perf_counter() - t0)
            if bench.device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(bench.device) / 2**20
        except torch.cuda.OutOfMemoryError as exc:
            status, detail = "oom", str(exc).split("\n")[0][:80]
            bench.recover()
        except Exception as exc:
            status, detail = "error", f"{type(exc).__name__}: {exc}".split("\n")[0][:80]
            bench.recover()
        finally:
            bench.cfg.contrastive.grad_cache_chunk = 0
        extra = {"status": status, "texts": 3 * B, "tokens": n_tokens, "chunk": c, "zero": bench.zero}
        if detail:
            extra["detail"] = detail.replace(";", ",").replace("=", ":")
        if times:
            extra.update(step_stats(times, warmup))
        else:
            extra.update(warmup=warmup, timed_steps=0)
        if cut:
            extra["cut"] = cut
        ms = statistics.median(times) * 1e3 if times and status != "oom" else float("nan")
        writer.add(shape, impl, "step", ms, peak_mb=peak, **extra)


def _safe_parity(bench, stage):
    try:
        rel, _ = bench.parity(stage)
        return rel
    except Exception as exc:
        traceback.print_exc()
        log(f"parity {stage} failed: {type(exc).__name__}: {exc}")
        bench.recover()
        return float("nan")


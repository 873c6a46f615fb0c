"""End-to-end train-step throughput: the engine path against what an LLM2Vec user runs instead.

The `reference` rows (llm2vec's one-GPU recipe, MNTP) build a model of their own without DeepSpeed. For the
other rows one model and one DeepSpeed engine are built once (building a 7B model is the expensive part); the
path and the kernel implementations are switched between them. For figures that do not disturb each other,
run each path in its own process (`--impls reference`, `--impls reference-zero3`, `--impls engine`), as
benchmarks/gpu_run.sh does.

Model (GPU mode): Mistral-7B-shaped (32 layers, hidden 4096, intermediate 14336, GQA 32/8 heads,
head_dim 128, vocab 32000), randomly initialised in bf16 directly on the GPU, bidirectional, LoRA r=16
(alpha 32, dropout 0.05) on q/k/v/o/gate/up/down, gradient checkpointing, DeepSpeed ZeRO-3 in a world
of one, torch AdamW as the client optimizer. Synthetic token ids (seeded); nothing is downloaded.

Stages (one micro-batch = one optimizer step):
  * mntp        32 x 512 tokens, unpadded, masked as llm2vec does for the model family (configs/mistral-7b:
                0.8, every masked token replaced; the tiny Llama: 0.2, BERT scheme; the shape name and the row
                state it), labels shifted as the MNTP stage does; the same batch on every path;
  * simcse      128 sentences, lengths uniform in [16, 128] (one of 128), two dropout views
                (attention-probability dropout 0.3 + LoRA dropout) -> 256 sequences;
  * supervised  64 queries (16-64 tokens incl. an 8-12 token instruction that is attended, not pooled)
                + 64 positives + 64 hard negatives (64-512 tokens, one of 512); mean pooling.

Implementations:
  * reference   llm2vec's own one-GPU recipe (MNTP): HF model + PEFT LoRA (r on all seven projections, dropout
                0.05, PEFT defaults), bf16, bidirectional SDPA with no mask on the unpadded batch, full
                gradient checkpointing, full logits for every position and the CE inside the HF loss (fp32
                upcast), clip 1.0 + plain torch AdamW; no DeepSpeed and no engine code (build_hf_reference).
  * reference-fa2   the same with attn_implementation="flash_attention_2" (a row with status=skipped when
                flash_attn is not installed).
  * reference-zero3   the older reference, an ablation inside the engine's harness: the engine's model under
                DeepSpeed ZeRO-3 running what LLM2Vec does on HF transformers + PEFT: SDPA given a dense additive (B, 1, S, S)
                bidirectional padding mask (so SDPA cannot use its flash backend, and HF repeats K/V for
                GQA because a mask is given), full logits for every
                position upcast to fp32 and F.cross_entropy(ignore_index=-100) as HF models do, and the
                torch contrastive loss; contrastive texts run as LLM2Vec runs them, one forward per text
                slot (SimCSE: view 1, view 2; supervised: queries, positives, negatives), each padded to
                its own longest sequence.
  * engine      the engine's own stages: packed varlen forward (no padding anywhere) through the Triton
                flash-attention kernel, fused masked cross-entropy over the masked rows only, fused
                contrastive loss; one forward for all texts of a step.
  * engine-torch-<op>   ablations: the engine path with one kernel switched to its torch reference
                (llm2vec_kernels.set_default_impl(op, "torch")), op in attention / masked_ce / contrastive.

Reported per (stage, impl), one CSV row (benchmarks/common.CsvWriter, bench="train_step", pass="step"):
  ms        median wall time of the timed steps (forward + backward + optimizer step, synchronised);
            extra min_ms, q1_ms, q3_ms, iqr_ms, warmup, timed_steps and every step's time (steps_ms);
  peak_mb   torch.cuda.max_memory_allocated over the timed steps (weights included; reset per run);
            extra act_peak_mb is the same minus what was allocated before the step;
  tflops    model FLOPs / step time; extra tokens_per_s, mfu, hfu, peak_tflops.

FLOPs (per step, T = real tokens, L_i = real sequence lengths, l = layers, Hq*D = query width):
  model = 4 * N_frozen * T                 frozen decoder weights: forward (2) + input gradient (2), no weight grad
        + 6 * N_lora * T                   LoRA weights: forward, input gradient and weight gradient
        + 12 * sum(L_i^2) * Hq * D * l     attention: forward 4*L^2*Hq*D per layer, backward 2x forward
        + 4 * R * V * H                    MNTP LM head over the R rows it actually computes (forward + input
                                           grad): the masked rows for the engine, every position for a
                                           full-logit reference
        + 6 * B * N * E                    contrastive scores (B queries x N candidates)
  hfu   = model + the forward recomputed under gradient checkpointing (2*N_frozen*T + 2*N_lora*T + the
          attention forward; engine-auto under selective recompute: the attention forward only, and nothing
          without recompute); the flash-style recompute inside the attention backward is not counted.
  Both count work on real tokens only; padding is never counted, and the LM head counts the rows the path
  computes, so a full-logit reference gets credit for its logits (MFU ratios then differ from throughput
  ratios; compare tokens_per_s for speed). extra model_tflop holds the FLOPs of the row. MFU = model
  FLOP/s over the card's dense bf16 peak (H100 SXM / H200: 989.4 TFLOP/s; see PEAK_TFLOPS, or pass
  --peak-tflops).

Each measurement: --warmup (5) warm-up steps, then --steps (20) timed steps (1 and 2 with --tiny); the row
reports the median, min and IQR. A --big-batch configuration runs 1 warm-up + 1 timed step unless --warmup /
--steps are given (below the protocol: its row's warmup and timed_steps say so, and so does the summary).
Timing stops early, after at least 5 steps, when the next steps would end past --budget-s (the row says
cut=budget and timed_steps how many ran). An OOM or error is recorded as a row with ms=nan and extra
status=oom/error, and the run goes on. Measurements run in priority order (reference and
engine for MNTP, supervised, SimCSE; then the ablations) and those that would end after --budget-s
(default 135 s on the GPU) are recorded as status=skipped_budget. --budget-s counts from the process's start
(train_step_measure.process_start), as the `timeout` gpu_run.sh runs it under does: imports count. A SIGTERM
(that `timeout`) ends the run where it is: the measurement under way writes its row from the steps timed so far,
cut=term (status=ok with timed_steps of them, or status=timeout with none; fewer than 20 timed steps make a
verdict on it provisional, as cut=budget does), and the process exits 143. Before timing, each stage's
reference and engine losses are compared in eval mode on the same batch (extra parity_rel). If DeepSpeed
cannot be imported or initialised, the same measurements run with a plain torch optimizer step and the
rows say zero=none (--no-deepspeed forces it).

--profile PATH: one more step, after and apart from the timed ones, under torch.profiler, of the engine, the
reference-zero3 and the reference MNTP step. On the GPU it records CUDA activity only (no CPU ops, no
record_shapes, which inflated the profiled step to 3.5 s in the 2026-11-26 run): kernel time by category from
kernel names (attention, all GEMMs, loss, collectives, other) and GPU busy time (union of kernel intervals)
against wall time. On CPU (--tiny) CPU self time is grouped by op: attention, linear (MLP / attention
projections / LoRA), loss, optimizer, ZeRO
fetch/release/grad-reduce and other, by op name, scope and GEMM shape; the category table and the top
ops and kernels go to PATH, and one CSV row per profile (pass="profile") holds the category times.

    python -m benchmarks.bench_train_step --out $OUT/bench_train_step.csv --profile $OUT/profile.txt
    python -m benchmarks.bench_train_step --tiny --out /tmp/ts.csv --profile /tmp/prof.txt   # CPU, ~30 s

--arch gemma2-9b (or another structure of benchmarks.step_paths.ARCHS): the own-model MNTP rows (reference,
reference-fa2, engine-auto) on that structure, and only those. llm2vec's recipe there runs SDPA, or
transformers' eager attention where SDPA is refused (Gemma2: soft-capped scores), handed all-zero bidirectional
masks. Its rows are named "<arch>:mntp ..." and stay out of issue 7's targets. With --tiny the structure keeps its
family and features at the tiny Llama's sizes.

--tiny (and any run without CUDA): a tiny random Llama (2 layers, hidden 64, vocab 512), small batches, fp32,
DeepSpeed ZeRO-3 on gloo in a world of one; the engine's kernels resolve to their torch references on CPU.
"""
import math
import os
import signal
import sys
import time
import traceback

if __package__ in (None, ""):  # `python benchmarks/bench_train_step.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import llm2vec_kernels  # noqa: E402
from benchmarks.common import CsvWriter, check_outputs, cli_error, cli_ints, cli_names, parser  # noqa: E402
from engine.cli import nonnegative_int, positive_float, positive_int  # noqa: E402
from benchmarks.harness import GPU_MODEL, TINY_MODEL, llm2vec_masking  # noqa: E402
from benchmarks.train_step_measure import (BENCH, GPU_SHAPES, MASK, T0, TINY_SHAPES, Terminated,  # noqa: E402
                                           catch_sigterm, log, shape_name, term_cut, terminated)
from benchmarks.step_paths import ARCHS  # noqa: E402
from benchmarks.train_step_own import OWN_MODEL, measure_own_model, row_shape  # noqa: E402
from benchmarks.train_step_rows import (BIG_BATCH_STEPS, BIG_BATCH_WARMUP, IMPLS, Bench, _safe_parity,  # noqa: E402
                                         big_batch)

ALL_IMPLS = OWN_MODEL + list(IMPLS)
STAGE_ABLATIONS = {"mntp": ("attention", "masked_ce"), "simcse": ("attention", "contrastive"),
                   "supervised": ("attention", "contrastive")}


class StepWriter(CsvWriter):
    """The benchmark's CsvWriter. Once SIGTERM has come (train_step_measure.terminated), a step row that a
    measurement's own handler recorded as an error (the harness's rows, benchmarks.train_step_rows, catch
    Terminated as any Exception) is the cut it is: term_cut, its timed steps kept (ms is their median). Once
    written, Terminated goes on up (the harness's loops, --big-batch's among them, would start the next one)."""

    def add(self, shape, impl, pass_, ms, tflops=float("nan"), peak_mb=float("nan"), **extra):
        cut = terminated() and pass_ == "step" and extra.get("status") == "error"
        if cut:
            term_cut(extra, extra.get("timed_steps", 0) if not math.isnan(float(ms)) else 0)
        row = super().add(shape, impl, pass_, ms, tflops, peak_mb, **extra)
        if cut:
            raise Terminated(f"SIGTERM: the row of {shape.split()[0]} {impl} is written")
        return row


def default_plan(stages, tiny):
    """(stage, impl) in priority order: the headline pairs first, then ablations (MNTP, supervised, SimCSE).

    On the GPU the SimCSE attention ablation is left out: with dropout the torch attention reference draws
    its keep-masks on the CPU per sequence and head, which measures the host RNG, not attention.
    """
    plan = [("mntp", i) for i in ("reference", "reference-fa2", "engine-auto") if "mntp" in stages]
    plan += [(s, i) for s in ("mntp", "supervised", "simcse") if s in stages for i in ("reference-zero3", "engine")]
    for s in ("mntp", "supervised", "simcse"):
        if s not in stages:
            continue
        for op in STAGE_ABLATIONS[s]:
            if s == "simcse" and op == "attention" and not tiny:
                continue
            plan.append((s, f"engine-torch-{op}"))
    return plan


def make_plan(args):
    """(stage, impl) pairs of a run in priority order, from --stages, --arch and --impls (default_plan, filtered
    and extended by --impls); bad input ends the run with one line (cli_error) before anything is built."""
    stages = cli_names(args.stages, list(STAGE_ABLATIONS), "--stages")
    if args.arch != "mistral-7b":  # the harness's ZeRO-3 rows and ablations are built on the Mistral-7B structure
        bad = [w for w in (args.impls or "").split(",") if w.strip() and w.strip().rpartition(":")[2] not in OWN_MODEL]
        if bad or args.big_batch or "mntp" not in stages:
            cli_error(f"--arch {args.arch} runs the own-model MNTP rows only ({', '.join(OWN_MODEL)})")
        stages = ["mntp"]
    plan = default_plan(stages, args.tiny)
    if args.arch != "mistral-7b":
        plan = [(s, i) for s, i in plan if i in OWN_MODEL]
    if args.impls:
        wanted = [x.strip() for x in args.impls.split(",") if x.strip()]
        plan = [(s, i) for s, i in plan if i in wanted or f"{s}:{i}" in wanted]
        for w in wanted:
            s, _, i = w.rpartition(":")
            if i not in ALL_IMPLS:
                cli_error(f"--impls: unknown impl {i!r}; choose from {', '.join(sorted(ALL_IMPLS))}")
            if s and s not in STAGE_ABLATIONS:
                cli_error(f"--impls: unknown stage {s!r} in {w!r}; choose from {', '.join(STAGE_ABLATIONS)}")
            if i in OWN_MODEL and s not in ("", "mntp"):
                cli_error(f"--impls: {i} is MNTP only")
            for stg in ([s] if s else (["mntp"] if i in OWN_MODEL else stages)):
                if (stg, i) not in plan:
                    plan.append((stg, i))
    return plan


def main(argv=None):
    """The run (module docstring); SIGTERM is Terminated while it lasts (train_step_measure.catch_sigterm)."""
    previous = catch_sigterm()
    try:
        return _main(argv)
    except Terminated as exc:  # outside a measurement (a build, a row being written): what was written stays
        log(f"{exc}: the run ends here")
        raise SystemExit(128 + signal.SIGTERM)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv):
    ap = parser(__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join("benchmarks", "results", f"bench_{BENCH}.csv"))
    ap.add_argument("--profile", default=None, help="text file for the profiler breakdown (engine + reference MNTP)")
    ap.add_argument("--tiny", action="store_true", help="CPU mode: tiny random Llama, small batches (CI)")
    ap.add_argument("--stages", default="mntp,simcse,supervised")
    ap.add_argument("--arch", default="mistral-7b", choices=sorted(ARCHS),
                    help="the model of the own-model MNTP rows (reference, reference-fa2, engine-auto); another "
                         "structure than Mistral-7B's runs those rows only")
    ap.add_argument("--impls", default=None, help="comma list of (stage:)impl to run instead of the default plan, "
                    f"impl in {', '.join(ALL_IMPLS)}")
    ap.add_argument("--warmup", type=nonnegative_int, default=None,
                    help="warm-up steps per measurement (5; 1 with --tiny; 1 per configuration of --big-batch)")
    ap.add_argument("--steps", type=positive_int, default=None,
                    help="timed steps per measurement (20; 2 with --tiny; 1 per configuration of --big-batch)")
    ap.add_argument("--budget-s", type=positive_float, default=None,
                    help="stop starting measurements that would end after this many seconds from start "
                         "(default 135 on GPU, none with --tiny)")
    ap.add_argument("--peak-tflops", type=positive_float, default=None,
                    help="override the card's dense bf16 peak (TFLOP/s, > 0)")
    ap.add_argument("--no-parity", action="store_true")
    ap.add_argument("--no-deepspeed", action="store_true",
                    help="plain torch optimizer step instead of DeepSpeed ZeRO-3 (also the automatic fallback)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--big-batch", default=None,
                    help="comma list of global batch sizes: measure only the supervised step's peak memory at these "
                         "batch sizes (short texts), without and with gradient caching (issue 6)")
    ap.add_argument("--grad-cache-chunk", type=positive_int, default=256, help="texts per chunk for --big-batch")
    args = ap.parse_args(argv)
    check_outputs(args, "--out")
    # bad input ends the run in one line (cli_error) before a model is built
    sizes = cli_ints(args.big_batch, "--big-batch") if args.big_batch is not None else None
    if not torch.cuda.is_available():
        # Small CPU ops on shared cores: OpenMP barriers stall whenever a core is taken, one thread does not.
        torch.set_num_threads(1)
    if not args.tiny and not torch.cuda.is_available():
        log("no CUDA device: running the --tiny CPU configuration instead")
        args.tiny = True
    MASK["gpu"], MASK["tiny"] = llm2vec_masking(GPU_MODEL["model_type"]), llm2vec_masking(TINY_MODEL["model_type"])
    # --big-batch: 1 warm-up + 1 timed step per configuration by default (BIG_BATCH_WARMUP, BIG_BATCH_STEPS: a 7B
    # step at batch 4096 takes tens of seconds), below the protocol, and its rows say so (warmup, timed_steps)
    big_counts = (BIG_BATCH_WARMUP if args.warmup is None else args.warmup,
                  BIG_BATCH_STEPS if args.steps is None else args.steps)
    if args.warmup is None:
        args.warmup = 1 if args.tiny else 5
    if args.steps is None:
        args.steps = 2 if args.tiny else 20
    budget = args.budget_s if args.budget_s is not None else (float("inf") if args.tiny else 135.0)
    args.budget_resolved = budget
    plan = make_plan(args)  # after --tiny is settled: the plan depends on it
    if args.profile:
        os.makedirs(os.path.dirname(os.path.abspath(args.profile)) or ".", exist_ok=True)
        open(args.profile, "w").close()

    writer = StepWriter(args.out, BENCH, timing="wall-synced-step")
    # llm2vec's one-GPU recipe and engine-auto first, each in a model of its own that is freed before the next
    own_plan = [(s, i) for s, i in plan if i in OWN_MODEL and not args.big_batch]  # --big-batch: only that
    plan = [(s, i) for s, i in plan if i not in OWN_MODEL]
    for stage, impl in own_plan:
        elapsed = time.perf_counter() - T0
        if elapsed > budget:
            writer.add(row_shape(args.arch, TINY_SHAPES if args.tiny else GPU_SHAPES), impl, "step", float("nan"),
                       status="skipped_budget", elapsed_s=f"{elapsed:.0f}", budget_s=f"{budget:.0f}")
            continue
        measure_own_model(args, writer, impl, args.profile)  # a SIGTERM: its row is written cut=term
        if terminated():
            break
    if terminated():
        return _cut(writer, args)
    if not plan and not args.big_batch:
        writer._f.close()
        log(f"{len(writer.rows)} rows -> {args.out}")
        return writer.rows
    try:
        bench = Bench(args)
    except Exception as exc:  # no model: one error row per planned measurement says why, then fail
        traceback.print_exc()
        detail = f"{type(exc).__name__}: {exc}".split("\n")[0][:80].replace(";", ",").replace("=", ":")
        for stage, impl in plan:
            writer.add(shape_name(stage, TINY_SHAPES if args.tiny else GPU_SHAPES), impl, "step", float("nan"),
                       status="error", detail=f"setup failed: {detail}")
        writer._f.close()
        raise
    parity = {}
    try:
        if args.big_batch:
            plan = []  # this invocation measures only the big-batch supervised steps
            big_batch(bench, writer, sizes, args.grad_cache_chunk, budget, *big_counts)
        for stage, impl in plan:
            if terminated():  # a handler that swallows exceptions (parity, a profile) took the SIGTERM
                break
            prof = args.profile if (args.profile and stage == "mntp" and impl in ("reference-zero3", "engine")) else None
            elapsed = time.perf_counter() - T0
            est = bench.estimate_s(stage, impl, prof is not None)
            if elapsed + est > budget:
                writer.add(shape_name(stage, bench.shapes), impl, "step", float("nan"),
                           status="skipped_budget", elapsed_s=f"{elapsed:.0f}", est_s=f"{est:.0f}",
                           budget_s=f"{budget:.0f}")
                continue
            if stage not in parity:
                parity[stage] = float("nan") if args.no_parity else _safe_parity(bench, stage)
                if terminated():
                    break
            bench.measure(writer, stage, impl, parity[stage], profile_out=prof)
    finally:
        writer._f.close()
        for op in ("attention", "masked_ce", "contrastive"):
            llm2vec_kernels.set_default_impl(op, "auto")
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass
    if terminated():
        return _cut(writer, args)
    log(f"{len(writer.rows)} rows -> {args.out}")
    return writer.rows


def _cut(writer, args):
    """The end of a run that SIGTERM cut: the rows written so far stay in --out; exit 143 (128 + SIGTERM)."""
    writer._f.close()
    log(f"SIGTERM: the run ends after {len(writer.rows)} rows -> {args.out}")
    raise SystemExit(128 + signal.SIGTERM)


if __name__ == "__main__":
    main()

"""A CPU proxy of the GPU MNTP train step: kernel launches, host syncs, ZeRO hooks, host time and a predicted
H200 step time for each path, so a change to the step can be judged without a GPU.

    python -m benchmarks.bench_step_ops                       # all three paths, a few minutes on 2 cores
    python -m benchmarks.bench_step_ops --set model.fused_ops=triton --paths engine   # after an engine change
    python -m benchmarks.bench_step_ops --reduced             # CI: 2 layers, small batch, a few host steps
    python -m benchmarks.bench_step_ops --arch gemma2-9b      # the same recipe on Gemma2-9B's structure (or qwen3-8b)

This module is the CLI (one worker process per path, the table); benchmarks/step_paths.py builds the paths,
benchmarks/step_census.py counts (launches, syncs, ZeRO hooks), benchmarks/step_cost.py costs (roofline
prediction, calibration), benchmarks/harness.py holds what bench_train_step shares.

Paths (one optimizer step of MNTP, the same tokens, masks and micro-batching on every path):
  * reference        llm2vec's one-GPU recipe: HF model + PEFT LoRA (fp32 adapters, PEFT's default), SDPA
                     non-causal with no mask (enable_gqa), full gradient checkpointing, full-logit CE inside the HF
                     loss, clip 1.0 + torch AdamW, no DeepSpeed (benchmarks.harness.build_hf_reference);
  * reference-bf16   the same with the adapters in bf16: a stronger baseline than llm2vec's;
  * reference-zero3  the older reference of bench_train_step: the engine's model under DeepSpeed ZeRO-3 with
                     SDPA given a dense (B, 1, S, S) mask and full logits;
  * engine           the engine's own code: engine.config (configs/mistral-7b/mntp.yaml + --set overrides),
                     engine.modeling.load_model, engine.trainer.setup_model (fused LoRA, the memory plan's ZeRO
                     stage and recompute policy for an H200), engine.stages.mntp, DeepSpeed from
                     engine.config.deepspeed_config. model.attention / model.loss default to triton here.

Rows: every path at every --tokens shape (default 32 x 512, one micro-batch as in llm2vec's recipe, and the
micro-batch configs/mistral-7b/mntp.yaml ships, 4 x 512). Model (default --arch): the Mistral-7B structure (32
layers, 32 query / 8 KV heads, MLP ratio 3.5, untied LM head) with LoRA r16 on all seven projections (dropout 0.05,
on), bf16.
Counting and host time run it at tiny width (hidden 64, head_dim 2, intermediate 224, vocab 1024); the
prediction runs it at full size (hidden 4096, vocab 32000) on meta tensors. Masking as llm2vec does for Mistral
(0.8, every masked token replaced), mask token = EOS.

--arch gemma2-9b costs and counts Gemma2-9B's structure (configs/architectures/google__gemma-2-9b-it.json: 42
layers, 16 query / 8 KV heads of 256, four norms a layer, soft-capped scores and logits, tied 256k vocabulary)
under the same recipe. transformers refuses SDPA for Gemma2, so the reference paths run its eager attention
(llm2vec's bidirectional masks: all zeros; full-size bf16 scores per head, fp32 softmax); reference-zero3 (SDPA)
has no Gemma2 row. The calibration stays the Mistral-7B step the H200 profiled: its per-class efficiencies are
applied to Gemma2's ops, where eager attention's batched GEMMs count as GEMMs (cuBLAS at the GEMM efficiency, the
favourable end for the reference). --arch qwen3-8b (configs/architectures/Qwen__Qwen3-8B.json: 36 layers, 32 / 8
heads of 128, per-head q and k norms, 151,936-token vocabulary) runs every path, SDPA included. Issue 24's
targets are Mistral-7B's and are printed for it only.

One recompute policy per row: the full-size meta run sets the path up as an H200 would (for the engine, the
memory plan's ZeRO stage and recompute policy at the row's micro-batch); the tiny-width count is then forced to
that policy and stage (a tiny model's own plan would pick no recompute). The row prints it.

Figures per row:
  launches      kernel launches in one optimizer step (forward, backward, optimizer, DeepSpeed): ATen ops that
                are neither views nor bare allocations or reshapes (step_census.NO_KERNEL) and that touch a
                device tensor, plus Triton launches. Triton kernels are enabled (TRITON_INTERPRET=1) and their
                launcher is intercepted: each launch is counted and not executed (the floating tensors it was
                handed are made finite, so that DeepSpeed's inf/NaN check does not skip the optimizer step;
                skipped steps are reported and must be 0). A tensor is host-side when a factory op made it
                with at most one element (the seed draws) or from Python data, or when every tensor it was
                computed from is host-side; everything else would live on the GPU. dropout is dispatched as
                aten::native_dropout, as on CUDA; AdamW and clipping use their foreach ops, CUDA's default.
  hooks         of those, the launches inside DeepSpeed's per-parameter gradient hooks (step_census.GRAD_HOOKS).
  syncs         device-to-host syncs inside forward + backward: _local_scalar_dense (.item(), bool(), int()),
                nonzero, masked_select, unique, .tolist() on device tensors.
  opt           launches of the optimizer step alone (DeepSpeed's wrapper, clipping, AdamW), part of
                launches; opt_syncs its host syncs (DeepSpeed's inf/NaN checks read bools back).
  zero_hooks    DeepSpeed ZeRO-3 module fetch_sub_module + release_sub_module calls in the step.
  host_ms       CPU time of this thread per step at tiny width (one thread): median (the table's figure), min and
                quartiles over --host-steps timed steps (20) after --host-warmup untimed ones (5), the protocol of
                benchmarks/common.py, on a --host-batch batch (the same op sequence; the launch count at that batch
                is kept beside it). CPU time, not wall time, so that a loaded machine does not inflate it. Triton
                launches cost nothing here (intercepted): this is dispatcher + Python + hooks + small CPU kernels.
  best_ms, pess_ms  the full-size step on an H200 from shapes alone: forward, backward and optimizer step run
                on meta tensors (the batch and its index tensors stay real, so packing and row selection see
                real lengths); per op max(FLOPs / 790 TFLOP/s (53.6 for fp32 GEMMs: no tensor cores),
                bytes read + written / 4.0 TB/s: an in-place op's target both, an expanded view its storage)
                + a per-launch floor
                (step_cost.HOST_FLOOR_US), per op class (GEMMs, attention, LoRA GEMMs, elementwise, loss,
                optimizer, DeepSpeed hooks, other) at the efficiencies the 2026-11-26 H200 profile measured:
                best at the most favourable one measured, pessimistic at the least (step_calibration); no part
                of a class below its time at the spec peaks, and reference-zero3 at the profile's 32 x 512 no
                faster at best than the profile measured it. DeepSpeed is not run on meta tensors: its hook and
                optimizer launches are costed from the census.

Calibration (printed on every full run; --reduced and --no-calibrate skip it and the table says UNCALIBRATED):
the ZeRO-3 engine and reference MNTP steps that the 2026-11-26 H200 profile measured, without the run's --set
overrides (they would change the op stream the profile's times are compared with)
(benchmarks/results/2026-11-26-h200/train_step_profile.txt) are rerun on meta tensors at the profile's own step
(step_calibration.profile_shape: 32 x 512 tokens in one micro-batch, the Mistral-7B structure at 32 layers, mask
0.2, BERT scheme, ZeRO-3's F.linear, full recompute), whatever --tokens, --layers and --arch ask to cost, and
every op class is compared with the profile, with its error, its launches against those the profile records
(a difference of a launch a layer stops the run) and its measured time over its roofline. HOST_FLOOR_US was fitted
once on the engine's elementwise + other ops (each run prints the floor that would fit them). No class is priced
faster than the H200's spec peaks allow (989.4 TFLOP/s, 4.8 TB/s: the 790 TFLOP/s of the roofline is no limit, the
profile's GEMMs beat it), and a row of the path the profile measured at its tokens and layers (reference-zero3 at
32 x 512) no faster at best than the profile measured each class.

Budgets are in CPU time (--cpu-budget-s per path, read from /proc), so the run finishes on a loaded machine;
--timeout-s only caps a hung worker's wall time. The table goes to stdout; its last line is one JSON object keyed
by row ("<path> <tokens>"), each with recompute, zero, launches, hook_launches, syncs, zero_hooks, host_ms
({"min", "q1", "median", "q3"}) and predicted_ms ({"best", "pessimistic"}). Each path runs in its own process.
"""
import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):  # `python benchmarks/bench_step_ops.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# the workers count Triton launches through the interpreter's launcher (set before triton is imported)
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import yaml  # noqa: E402

from benchmarks.common import ITERS, WARMUP, Timing, check_outputs, cli_error, parser, write_json  # noqa: E402
from benchmarks.harness import ROOT, llm2vec_masking  # noqa: E402
from benchmarks.step_calibration import (PROFILED, calibration_lines, finish, fit_floor,  # noqa: E402
                                         launch_mismatches, profile_shape, read_profile)
from benchmarks.step_census import TritonLaunches, count_step, gpu_like_ops  # noqa: E402
from benchmarks.step_cost import CLASSES, HOST_FLOOR_US, predict_path  # noqa: E402
from benchmarks.step_paths import ARCHS, CONFIG, FULL, Path, batch_for, engine_config, log, tiny_of  # noqa: E402
from engine.cli import nonnegative_int, positive_int  # noqa: E402
from engine.config import ConfigError  # noqa: E402

PATHS = ("reference", "reference-bf16", "reference-zero3", "engine")
# reference-zero3 gives the engine's model SDPA and a dense mask, which cannot soft-cap: no Gemma2 row
ARCH_PATHS = {"mistral-7b": PATHS, "gemma2-9b": ("reference", "reference-bf16", "engine"), "qwen3-8b": PATHS,
              "phi3-mini": PATHS}
# the targets of issue 24, engine against the references on the headline shape
TARGETS = (("best", "reference", 0.40), ("best", "reference-bf16", 0.55), ("pessimistic", "reference", 0.45))
LAUNCH_TARGET = 0.4


def shipped_tokens(config=CONFIG):
    """The micro-batch configs/mistral-7b/mntp.yaml trains on: micro_batch_size x max_seq_len."""
    with open(config) as f:
        cfg = yaml.safe_load(f)
    return f"{cfg['micro_batch_size']}x{cfg['max_seq_len']}"


def _shape(text):
    return tuple(int(x) for x in text.split("x"))


# ----------------------------------------------------------------------------------------------
# Worker: one path in its own process, every shape
# ----------------------------------------------------------------------------------------------

def _policy_sets(name, pred):
    """Counting runs under the policy the full-size plan chose (the memory plan of a tiny model would choose
    another): the engine's recompute policy and ZeRO stage, forced."""
    if name != "engine":
        return []
    return [f"model.gradient_checkpointing={pred['recompute']}", f"zero_stage={pred['zero_stage']}"]


def host_time(step, batch, warmup, steps):
    """A row's host_ms, host_warmup and host_steps: ``warmup`` untimed calls of step(batch), then ``steps`` timed ones
    in CPU time of this thread (what a step costs, whatever the load); min, quartiles and median as common.Timing's."""
    for _ in range(warmup):
        step(batch)
    times = []
    for _ in range(steps):
        t = time.thread_time()
        step(batch)
        times.append((time.thread_time() - t) * 1e3)
    timing = Timing(tuple(times), warmup)
    return {"host_ms": {"min": round(min(times), 2), "q1": round(timing.q1, 2), "median": round(timing.median, 2),
                        "q3": round(timing.q3, 2)}, "host_warmup": warmup, "host_steps": len(times)}


def _count(args, sets, micro, launches, mask):
    """Build the tiny-width path under sets, then its census and host CPU time per step."""
    tiny = dict(tiny_of(ARCHS[args.arch]), num_hidden_layers=args.layers)
    out = {}
    t0 = time.process_time()
    with gpu_like_ops():
        path = Path(args.worker, tiny, "cpu", sets, micro)
        if not path.hf:
            try:
                path.init_deepspeed()
            except Exception as exc:  # counted without ZeRO-3, and the row says so
                log(f"{args.worker}: DeepSpeed unavailable ({type(exc).__name__}: {exc}); no ZeRO-3")
        out["zero"] = str(path.zero_stage) if path.ds else "none"
        out["recompute"] = path.recompute
        out["dtype"] = str(path.dtype).replace("torch.", "")
        host_batch = batch_for(_shape(args.host_batch), tiny["vocab_size"], mask)
        big = batch_for(_shape(args.count_batch), tiny["vocab_size"], mask)
        out["build_cpu_s"] = round(time.process_time() - t0, 1)
        path.step(host_batch)  # warm-up: lazy initialisation and DeepSpeed's first-step tracing stay out
        out.update(count_step(path, big, launches))
        small = count_step(path, host_batch, launches)
        out["launches_host_batch"], out["census_host_batch"] = small["launches"], small["census"]
        skipped0 = path.skipped_steps()
        out.update(host_time(path.step, host_batch, args.host_warmup, args.host_steps))
        out["host_skipped_steps"] = path.skipped_steps() - skipped0
        del path
    out["count_cpu_s"] = round(time.process_time() - t0, 1)
    return out


def _calibration(name, launches, shape=None):
    """summarise() of the profiled path ``name`` as the H200 ran it, whatever the command line asks to cost: the
    Mistral-7B structure at the profile's own tokens, micro-batch, layers and masking (profile_shape: 32 x 512 in
    one micro-batch, 32 layers, mask 0.2 BERT), under ZeRO-3 (predict_path sets F.linear as ZeRO-3 does) and none
    of the run's --set overrides (model.attention=torch or another recompute policy would price the profile's
    measured times against another op stream). Stops the run when its per-class launches differ from those the
    profile records (launch_mismatches)."""
    shape = profile_shape() if shape is None else shape
    cal_name = "engine-as-profiled" if name == "engine" else name
    sets = [f"mntp.mask_prob={shape['mask_prob']}", f"mntp.scheme={shape['scheme']}"]
    with gpu_like_ops(meta=True):
        cal = predict_path(cal_name, sets, shape["micro"], shape["tokens"], (shape["mask_prob"], shape["scheme"]),
                           shape["layers"], launches, FULL)
    if cal["zero_stage"] != 3 or cal["recompute"] != "full":
        raise RuntimeError(f"calibration {cal_name}: ZeRO {cal['zero_stage']}, {cal['recompute']} recompute; the "
                           "profile ran ZeRO-3 with full recompute")
    prof = read_profile().get(name)
    bad = launch_mismatches(cal["summary"], prof, shape["layers"]) if prof else []
    if bad:
        raise RuntimeError(f"calibration {cal_name}: launches per class differ from the profile's (class, "
                           f"calibration, profile): {bad}")
    return cal["summary"]


def worker(args):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    launches = TritonLaunches()
    mask = (args.mask_prob, args.scheme)
    rows, counted = {}, {}
    with launches.active():
        for tokens in args.tokens.split(","):
            shape = _shape(tokens)
            t0 = time.process_time()
            with gpu_like_ops(meta=True):
                pred = predict_path(args.worker, args.set, shape[0], shape, mask, args.layers, launches,
                                    ARCHS[args.arch])
            row = {"path": args.worker, "tokens": tokens, "arch": args.arch, "layers": args.layers,
                   "sets": list(args.set), "mask_prob": args.mask_prob, "scheme": args.scheme,
                   "summary": pred["summary"],
                   "masked_rows": pred["masked"],
                   "census_full_nozero": pred["census"], "launches_full_nozero": sum(pred["census"].values()),
                   "predict_cpu_s": round(time.process_time() - t0, 1)}
            sets = list(args.set) + _policy_sets(args.worker, pred)
            key = tuple(sets)
            if key not in counted:  # one count per policy: the op stream does not depend on the batch
                counted[key] = _count(args, sets, shape[0], launches, mask)
            row.update(counted[key])
            if pred["recompute"] != row["recompute"]:
                raise RuntimeError(f"{args.worker} {tokens}: counted under {row['recompute']}, costed under "
                                   f"{pred['recompute']}")
            rows[f"{args.worker} {tokens}"] = row
        # the calibration runs of the profiled paths, at the profile's own shape (not the rows'): in that path's own
        # worker, or, for a structure without a row of it (reference-zero3 on Gemma2), in the reference worker
        first = next(iter(rows.values()), None)
        if args.calibrate and first is not None:
            if args.worker in PROFILED:
                first["cal"] = _calibration(args.worker, launches)
            if args.worker == "reference":
                for p in (p for p in PROFILED if p not in ARCH_PATHS[args.arch]):
                    first.setdefault("cal_for", {})[p] = _calibration(p, launches)
    write_json(args.result, rows)


# ----------------------------------------------------------------------------------------------
# Parent: one process per path, budgets in CPU time, then the table and the JSON line
# ----------------------------------------------------------------------------------------------

def _cpu_s(pid):
    """CPU time (user + system, s) a live process has used so far (Linux /proc; 0 where unreadable)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _ratio(a, b):
    return a / b if b else float("nan")


def table(results, args, fac, per_hook, tri=None):
    first = next((r for r in results.values() if "arch" in r), {})  # a JSON from before --arch: Mistral-7B
    arch, layers = first.get("arch", "mistral-7b"), first.get("layers", args.layers)
    lines = [f"bench_step_ops: MNTP step, mask {args.mask_prob} ({args.scheme}), {arch} structure at {layers} "
             f"layers; counted at tiny width on {args.count_batch} (and {args.host_batch}) under each row's recompute "
             f"policy; host CPU time on {args.host_batch}; costed at full size (meta) on the row's tokens; sets: "
             f"{' '.join(args.set or []) or '-'}",
             f"{'row':24s} {'recompute':>9s} {'zero':>4s} {'launches':>8s} {'hooks':>5s} {'opt':>4s} {'syncs':>5s} "
             f"{'opt_syncs':>9s} {'zero_hooks':>10s} {'host_ms':>8s} {'best_ms':>8s} {'pess_ms':>8s} {'best/ref':>8s} "
             f"{'best/bf16':>9s} {'pess/ref':>8s} {'launch/ref':>10s}"]
    for k, r in results.items():
        if "error" in r:
            lines.append(f"{k:24s} ERROR {r['error']}")
            continue
        ref = results.get(f"reference {r['tokens']}", {})
        bf = results.get(f"reference-bf16 {r['tokens']}", {})
        rp, bp = ref.get("predicted_ms", {}), bf.get("predicted_ms", {})
        p = r["predicted_ms"]
        lines.append(f"{k:24s} {r['recompute']:>9s} {r['zero']:>4s} {r['launches']:8d} {r['hook_launches']:5d} "
                     f"{r['optimizer_launches']:4d} {r['syncs']:5d} {r['optimizer_syncs']:9d} {r['zero_hooks']:10d} "
                     f"{r['host_ms']['median']:8.1f} {p['best']:8.1f} {p['pessimistic']:8.1f} "
                     f"{_ratio(p['best'], rp.get('best')):8.2f} {_ratio(p['best'], bp.get('best')):9.2f} "
                     f"{_ratio(p['pessimistic'], rp.get('pessimistic')):8.2f} "
                     f"{_ratio(r['launches'], ref.get('launches')):10.2f}")
    lines.append("launches: one optimizer step (forward, backward, optimizer, DeepSpeed), of which hooks in DeepSpeed's "
                 "gradient hooks and opt in the optimizer step; syncs: device->host in forward + backward; host_ms: "
                 "median CPU time per step at tiny width (quartiles in the JSON); best_ms / pess_ms: predicted H200 "
                 "step (step_calibration); x/ref: this row over the reference row of the same tokens (pessimistic "
                 "over pessimistic)")
    for k, r in results.items():
        if "predicted_best" in r:
            lines.append(f"predicted {k} by class, best / pessimistic (ms): " + ", ".join(
                f"{c} {r['predicted_best'][c]:.0f}/{r['predicted_pess'][c]:.0f}" for c in CLASSES
                if r["predicted_best"].get(c) or r["predicted_pess"].get(c)))
    if fac:
        lines.append("efficiency factors measured / predicted on the profiled paths (best = min, pessimistic = max; "
                     "unprofiled Triton kernels pessimistic at the Triton attention's"
                     + (f", {tri:.2f}" if tri is not None else "") + "; no class part faster than the spec peaks "
                     "allow, and a profiled path at the profile's shape no faster than measured): " + ", ".join(
                         f"{c} {min(v):.2f}-{max(v):.2f}" for c, v in fac.items())
                     + f"; DeepSpeed launches {per_hook:.2f}-{args.floor_us:g} us each")
    else:
        lines.append("UNCALIBRATED (no calibration run): every class at the roofline + floor, best = pessimistic")
    for k, r in results.items():
        if "census" in r:
            top = ", ".join(f"{c} {v}" for c, v in list(r["census"].items())[:12])
            lines.append(f"census {k}: {top}; syncs {r['sync_ops'] or '-'}; hooks {r['hook_census'] or '-'}")
    profile = read_profile()
    fit = fit_floor(results, profile)
    if fit is not None:
        lines.append(f"per-launch floor: {args.floor_us:g} us in use; {fit:.2f} us makes the engine's elementwise + "
                     "other match the profile exactly")
    lines += calibration_lines(results, profile, args.floor_us, per_hook)
    lines += target_lines(results, args)
    return "\n".join(lines)


def target_lines(results, args):
    """Issue 24's targets on the headline tokens (the first of --tokens), met or not."""
    tokens = args.tokens.split(",")[0]
    eng = results.get(f"engine {tokens}")
    if not eng or "error" in eng or eng.get("arch", "mistral-7b") != "mistral-7b":  # the targets are Mistral-7B's
        return []
    out = []
    for kind, ref_name, limit in TARGETS:
        ref = results.get(f"{ref_name} {tokens}")
        if not ref or "error" in ref:
            continue
        x = eng["predicted_ms"][kind] / ref["predicted_ms"][kind]
        out.append(f"target engine {kind} <= {limit:.2f}x {ref_name} ({tokens}): {x:.2f}x "
                   f"{'met' if x <= limit else 'NOT met'}")
    ref = results.get(f"reference {tokens}")
    if ref and "error" not in ref:
        x = eng["launches"] / ref["launches"]
        out.append(f"target launches <= {LAUNCH_TARGET:.2f}x reference under {eng['recompute']} recompute "
                   f"({tokens}): {x:.2f}x {'met' if x <= LAUNCH_TARGET else 'NOT met'}")
    return out


def _deepspeed_logs_to_stderr():
    """stdout is the table and its last line the JSON: DeepSpeed's logger (a stdout handler) goes to stderr."""
    for h in logging.getLogger("DeepSpeed").handlers:
        if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is sys.stdout:
            h.setStream(sys.stderr)


def main(argv=None):
    _deepspeed_logs_to_stderr()
    ap = parser(__doc__.split("\n")[0])
    ap.add_argument("--arch", default="mistral-7b", choices=sorted(ARCHS),
                    help="the model structure costed and counted (the calibration is always Mistral-7B's profile)")
    ap.add_argument("--paths", default=None, help="comma list (default: every path the structure has)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="engine config override (engine and reference-zero3 paths), e.g. model.fused_ops=triton")
    ap.add_argument("--tokens", default=None, help="comma list of batch x sequence rows to cost (default: 32x512 and "
                    "the micro-batch configs/mistral-7b/mntp.yaml ships); the first is the headline")
    ap.add_argument("--host-batch", default="2x64", help="batch x sequence of the host-time steps")
    ap.add_argument("--count-batch", default="4x64", help="batch x sequence of the counted real step")
    ap.add_argument("--host-steps", type=positive_int, default=ITERS, help="timed host steps (the protocol's 20)")
    ap.add_argument("--host-warmup", type=nonnegative_int, default=WARMUP,
                    help="untimed host steps before them (the protocol's 5)")
    ap.add_argument("--layers", type=int, default=None, help="default: the structure's")
    ap.add_argument("--mask-prob", type=float, default=None, help="default: llm2vec's Mistral setting (0.8)")
    ap.add_argument("--scheme", default=None, choices=("bert", "all"))
    ap.add_argument("--reduced", action="store_true",
                    help="CI: 2 layers, 4x64 tokens, 1 warm-up + 3 host steps, no calibration")
    ap.add_argument("--no-calibrate", dest="calibrate", action="store_false")
    ap.add_argument("--floor-us", type=float, default=HOST_FLOOR_US, help="per-launch floor of the prediction")
    ap.add_argument("--from-json", default=None, help="print the table of a run saved with --json (no measuring)")
    ap.add_argument("--json", default=None, help="also write the results (with census) to this file")
    ap.add_argument("--cpu-budget-s", type=float, default=300.0,
                    help="CPU seconds a path's worker may use (the run finishes on a loaded machine too)")
    ap.add_argument("--timeout-s", type=int, default=3600, help="wall-clock cap per path (a hung worker)")
    ap.add_argument("--jobs", type=int, default=1, help="paths run at once")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    check_outputs(args, "--json")
    if args.mask_prob is None or args.scheme is None:
        p, s = llm2vec_masking("mistral")
        args.mask_prob = p if args.mask_prob is None else args.mask_prob
        args.scheme = s if args.scheme is None else args.scheme
    if args.layers is None:
        args.layers = ARCHS[args.arch]["num_hidden_layers"]
    if args.reduced:
        args.layers, args.host_warmup, args.host_steps, args.calibrate = 2, 1, 3, False
        args.tokens, args.count_batch = args.tokens or "4x64", "4x32"
    args.tokens = args.tokens or f"32x512,{shipped_tokens()}"
    if args.worker:
        worker(args)
        return None
    paths = [p for p in (args.paths or ",".join(ARCH_PATHS[args.arch])).split(",") if p]
    bad = [p for p in paths if p not in ARCH_PATHS[args.arch]]
    if bad:
        cli_error(f"unknown path(s) {bad} for --arch {args.arch}; choose from {ARCH_PATHS[args.arch]}")
    try:
        shapes = [_shape(t) for t in args.tokens.split(",")]
        if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
            raise ValueError(args.tokens)
    except ValueError:
        cli_error(f"bad --tokens {args.tokens!r}: want BxS[,BxS...]")
    if args.set:
        try:
            engine_config(args.set, tiny_of(ARCHS[args.arch]), 32)
        except ConfigError as exc:
            cli_error(f"bad --set: {exc}")
    if args.from_json:  # re-render a saved run (e.g. with another --floor-us); nothing is measured
        return _report(_saved_run(args.from_json), args)
    return _report(_run_workers(paths, args), args)


def _saved_run(path):
    """The results a run saved with --json (cli_error when the file is missing or not that JSON)."""
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, ValueError) as exc:
        cli_error(f"--from-json {path}: {type(exc).__name__}: {exc}")
    if not isinstance(results, dict):
        cli_error(f"--from-json {path}: not the results of a --json run (a JSON object of rows)")
    need = ("tokens", "recompute", "zero", "launches", "predicted_ms", "host_ms")
    for key, row in results.items():
        missing = [k for k in need if k not in row] if isinstance(row, dict) and "error" not in row else []
        if not isinstance(row, dict):
            cli_error(f"--from-json {path}: not the results of a bench_step_ops --json run ({key!r} is no row)")
        if missing:
            cli_error(f"--from-json {path}: row {key!r} lacks {', '.join(missing)}: saved by an older bench_step_ops "
                      f"(its own README has the table it printed); re-run to get this format")
    return results


def _run_workers(paths, args):
    results = {}
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE"):
        env.pop(k, None)
    with tempfile.TemporaryDirectory() as tmp:
        pending, running = list(paths), {}
        while pending or running:
            while pending and len(running) < max(1, args.jobs):
                p = pending.pop(0)
                out = os.path.join(tmp, f"{p}.json")
                cmd = [sys.executable, "-m", "benchmarks.bench_step_ops", "--worker", p, "--result", out,
                       "--arch", args.arch,
                       "--tokens", args.tokens, "--host-batch", args.host_batch, "--host-steps", str(args.host_steps),
                       "--host-warmup", str(args.host_warmup), "--count-batch", args.count_batch,
                       "--layers", str(args.layers), "--mask-prob", str(args.mask_prob), "--scheme", args.scheme]
                cmd += [f"--set={s}" for s in args.set] + ([] if args.calibrate else ["--no-calibrate"])
                errf = open(os.path.join(tmp, f"{p}.err"), "w+")
                proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=errf, stderr=subprocess.STDOUT, text=True)
                running[p] = (proc, out, errf, time.perf_counter())
            time.sleep(0.5)
            for p, (proc, out, errf, t0) in list(running.items()):
                cpu, wall = _cpu_s(proc.pid), time.perf_counter() - t0
                if proc.poll() is None and cpu < args.cpu_budget_s and wall < args.timeout_s:
                    continue
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                    why = f"{cpu:.0f} CPU s > {args.cpu_budget_s:g}" if cpu >= args.cpu_budget_s else f"{wall:.0f} s wall"
                    results[p] = {"error": f"over budget: {why}", "path": p}
                elif proc.returncode != 0 or not os.path.isfile(out):
                    errf.seek(0)
                    text = errf.read()
                    tail = text.strip().splitlines()[-1:] or ["no output"]
                    results[p] = {"error": f"rc {proc.returncode}: {tail[0][:200]}", "path": p}
                    log(f"{p} failed:\n{text[-3000:]}")
                else:
                    with open(out) as f:
                        results.update(json.load(f))
                errf.close()
                del running[p]
                log(f"{p}: {wall:.1f} s wall, {cpu:.1f} CPU s")
    return results


def _ordered(results, args):
    """Rows by path (PATHS order), then by --tokens order (the headline first)."""
    tokens = args.tokens.split(",")

    def key(kv):
        r = kv[1]
        t = r.get("tokens")
        return (PATHS.index(r["path"]) if r.get("path") in PATHS else len(PATHS),
                tokens.index(t) if t in tokens else len(tokens), kv[0])

    return dict(sorted(results.items(), key=key))


def _report(results, args):
    results = _ordered(results, args)
    fac, per_hook, tri = finish(results, args.floor_us)
    if args.json:
        write_json(args.json, results)
    print(table(results, args, fac, per_hook, tri))
    keys = ("recompute", "zero", "launches", "hook_launches", "syncs", "zero_hooks", "host_ms", "predicted_ms")
    print(json.dumps({k: ({x: r[x] for x in keys} if "error" not in r else {"error": r["error"]})
                      for k, r in results.items()}))
    if any("error" in r for r in results.values()):
        sys.exit(1)
    return results


if __name__ == "__main__":
    main()

"""A CPU proxy of the GPU MNTP train step: kernel launches, host syncs, ZeRO hooks, host time and a predicted
H200 step time for each path, so a change to the step can be judged without a GPU.

    python -m benchmarks.bench_step_ops                       # all three paths, < 5 min on 2 cores
    python -m benchmarks.bench_step_ops --set model.fused_ops=triton --paths engine   # after an engine change
    python -m benchmarks.bench_step_ops --reduced             # CI: 2 layers, small batch, a few host steps

This module is the CLI (one worker process per path, the table); benchmarks/step_paths.py builds the paths,
benchmarks/step_census.py counts (launches, syncs, ZeRO hooks), benchmarks/step_cost.py costs (roofline
prediction, calibration), benchmarks/harness.py holds what bench_train_step shares.

Paths (one optimizer step of MNTP, the same tokens, masks and micro-batching on every path):
  * reference        llm2vec's one-GPU recipe: HF model + PEFT LoRA, SDPA non-causal with no mask, full
                     gradient checkpointing, full-logit CE inside the HF loss, clip 1.0 + torch AdamW, no
                     DeepSpeed (benchmarks.harness.build_hf_reference; no engine code);
  * reference-zero3  the older reference of bench_train_step: the engine's model under DeepSpeed ZeRO-3 with
                     SDPA given a dense (B, 1, S, S) mask and full logits;
  * engine           the engine's own code: engine.config (configs/mistral-7b/mntp.yaml + --set overrides),
                     engine.modeling.load_model, engine.trainer.setup_model (fused LoRA, the memory plan's ZeRO
                     stage and recompute policy for an H200), engine.stages.mntp, DeepSpeed from
                     engine.config.deepspeed_config. model.attention / model.loss default to triton here.

Model: the Mistral-7B structure (32 layers, 32 query / 8 KV heads, MLP ratio 3.5, untied LM head) with LoRA r16
on all seven projections (dropout 0.05, on), bf16. Counting and host time run it at tiny width (hidden 64,
head_dim 2, intermediate 224, vocab 1024); the prediction runs it at full size (hidden 4096, vocab 32000) on
meta tensors. Batch: 32 x 512 tokens in one micro-batch, masking as llm2vec does for Mistral (0.8, every
masked token replaced: configs/mistral-7b/mntp.yaml), mask token = EOS.

Figures per path:
  launches      kernel launches in one optimizer step (forward, backward, optimizer, ZeRO): ATen ops that are
                neither views nor bare allocations or reshapes (empty*, resize_, set_, lift_fresh,
                _unsafe_view) and that touch a
                device tensor, plus Triton launches. Triton kernels are enabled (TRITON_INTERPRET=1) and
                their launcher is intercepted: each launch is counted and not executed (the floating tensors
                it was handed are made finite, so that DeepSpeed's inf/NaN check does not skip the optimizer
                step: see TritonLaunches; skipped steps are reported and must be 0). A tensor is host-side
                when a factory op made it with
                at most one element (the seed draws) or from Python data (torch.tensor), or when every
                tensor it was computed from is host-side; everything else would live on the GPU.
                dropout is dispatched as aten::native_dropout, as on CUDA (the CPU build decomposes it);
                AdamW and gradient clipping use their foreach (multi-tensor) ops, CUDA's default.
  syncs         device-to-host syncs inside forward + backward: _local_scalar_dense (.item(), bool(), int()),
                nonzero, masked_select, unique, .tolist() on device tensors.
  opt           launches of the optimizer step alone (DeepSpeed's wrapper, clipping, AdamW), part of
                launches; opt_syncs its host syncs (DeepSpeed's inf/NaN checks read bools back).
  zero_hooks    DeepSpeed ZeRO-3 module fetch_sub_module + release_sub_module calls in the step.
  host_ms       wall time of the step at tiny width on one thread, min and median over --host-steps steps,
                on a --host-batch batch (the same op sequence as 32 x 512; the launch count at that batch is
                printed beside it). Triton launches cost nothing here (intercepted), so this is dispatcher +
                Python + hooks + small CPU kernels.
  predicted_ms  the full-size step on an H200, from shapes alone: the path's forward, backward and optimizer
                step run on meta tensors (the batch and its index tensors stay real, so packing and row
                selection see real lengths); per op max(FLOPs / 790 TFLOP/s, bytes / 4.0 TB/s) + a per-launch
                floor (HOST_FLOOR_US). FLOPs from torch.utils.flop_counter's registry (attention kernels:
                4 * sum(L^2) * Hq * D per QK^T-sized product), bytes = input + output tensor sizes. SDPA is
                dispatched to the fused op a GPU would run (flash without a mask, memory-efficient with one).
                DeepSpeed is not modelled (no ZeRO copies or collectives in the prediction).

Calibration (--calibrate, and printed on every full run): the ZeRO-3 engine and reference MNTP steps that the
2026-11-26 H200 profile measured (benchmarks/results/2026-11-26-h200/train_step_profile.txt; mask 0.2, BERT
scheme) are predicted and compared on two figures: GEMMs of the frozen weights (MLP + attention projections:
843.6 ms engine, 841.9 ms reference) and "other" ops (684.1 ms engine, 712.8 ms reference). HOST_FLOOR_US was
fitted once on the engine's "other" figure (each run prints the floor that would fit it); the reference's two
figures and the engine's GEMMs are out of sample. Errors at 21.8 us (2026-11-30): engine GEMMs +4.7%, other
0.0% (fitted); reference-zero3 GEMMs +4.9%, other -2.6%.

The table goes to stdout; its last line is one JSON object keyed by path, each with launches, syncs,
zero_hooks, host_ms ({"min", "median"}) and predicted_ms. Each path runs in its own process.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):  # `python benchmarks/bench_step_ops.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# the workers count Triton launches through the interpreter's launcher (set before triton is imported)
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from benchmarks.harness import ROOT, llm2vec_masking  # noqa: E402
from benchmarks.step_census import TritonLaunches, count_step, gpu_like_ops  # noqa: E402
from benchmarks.step_cost import HOST_FLOOR_US, PROFILE_MS, finish, fit_floor, predict_path  # noqa: E402
from benchmarks.step_paths import TINY, Path, batch_for, engine_config, log  # noqa: E402
from engine.config import ConfigError  # noqa: E402

PATHS = ("reference", "reference-zero3", "engine")


# ----------------------------------------------------------------------------------------------
# Worker: one path in its own process
# ----------------------------------------------------------------------------------------------

def worker(args):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    launches = TritonLaunches()
    sets = args.set or []
    mask = (args.mask_prob, args.scheme)
    layers = args.layers
    tiny = dict(TINY, num_hidden_layers=layers)
    shape = tuple(int(x) for x in args.tokens.split("x"))
    host_shape = tuple(int(x) for x in args.host_batch.split("x"))
    count_shape = tuple(int(x) for x in args.count_batch.split("x"))
    res = {"path": args.worker}
    t0 = time.perf_counter()
    with launches.active(), gpu_like_ops():
        path = Path(args.worker, tiny, "cpu", sets, shape[0])
        if args.worker != "reference":
            try:
                path.init_deepspeed()
            except Exception as exc:  # counted without ZeRO, and the row says so
                log(f"{args.worker}: DeepSpeed unavailable ({type(exc).__name__}: {exc}); no ZeRO-3")
        res["zero"] = str(path.zero_stage) if path.ds else "none"
        res["recompute"] = path.recompute
        res["dtype"] = str(path.dtype).replace("torch.", "")
        host_batch = batch_for(host_shape, tiny["vocab_size"], mask)
        big = batch_for(count_shape, tiny["vocab_size"], mask)
        res["build_s"] = round(time.perf_counter() - t0, 1)
        path.step(host_batch)  # warm-up: lazy initialisation and DeepSpeed's first-step tracing stay out
        t1 = time.perf_counter()
        res.update(count_step(path, big, launches))
        res["count_s"] = round(time.perf_counter() - t1, 1)
        small = count_step(path, host_batch, launches)
        res["launches_host_batch"], res["census_host_batch"] = small["launches"], small["census"]
        times, skipped0 = [], path.skipped_steps()
        for _ in range(args.host_steps):
            t = time.perf_counter()
            path.step(host_batch)
            times.append((time.perf_counter() - t) * 1e3)
        res["host_ms"] = {"min": round(min(times), 2), "median": round(statistics.median(times), 2)}
        res["host_steps"] = len(times)
        res["host_skipped_steps"] = path.skipped_steps() - skipped0
        res["host_s"] = round(time.perf_counter() - t1, 1)
        del path
    t2 = time.perf_counter()
    with launches.active(), gpu_like_ops(meta=True):
        pred, n, census, masked = predict_path(args.worker, sets, shape[0], shape, mask, layers, launches)
        res["roofline"] = {k: round(v, 3) for k, v in pred.items() if k != "total"}  # ms, no per-launch floor
        res["roofline_n"] = dict(n)
        res["masked_rows"] = masked
        # the same step at full size, 32 x 512, without DeepSpeed: its launch census (meta run)
        res["launches_full_nozero"] = sum(census.values())
        res["census_full_nozero"] = dict(census.most_common())
        if args.calibrate and args.worker in PROFILE_MS:
            cal_name = "engine-as-profiled" if args.worker == "engine" else args.worker
            cal, cal_n = predict_path(cal_name, sets + ["mntp.mask_prob=0.2", "mntp.scheme=bert"], shape[0],
                                      shape, (0.2, "bert"), layers, launches)[:2]
            res["cal_roofline"] = {k: round(v, 3) for k, v in cal.items() if k != "total"}
            res["cal_n"] = dict(cal_n)
    res["predict_s"] = round(time.perf_counter() - t2, 1)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    with open(args.result, "w") as f:
        json.dump(res, f)


# ----------------------------------------------------------------------------------------------
# Parent: one process per path, then the table and the JSON line
# ----------------------------------------------------------------------------------------------

def _ds_optimizer_ms(r, floor_us):
    """The optimizer launches DeepSpeed adds over the meta run's plain foreach AdamW, at the per-launch floor."""
    return max(0, r.get("optimizer_launches", 0) - r["roofline_n"].get("optimizer", 0)) * floor_us / 1e3


def table(results, args):
    lines = [f"bench_step_ops: MNTP step, one micro-batch, mask {args.mask_prob} ({args.scheme}), Mistral-7B "
             f"structure at {args.layers} layers; counted at tiny width on {args.count_batch} (and {args.host_batch}), "
             f"host time on {args.host_batch}, full size on {args.tokens} (meta, no DeepSpeed); sets: "
             f"{' '.join(args.set or []) or '-'}",
             f"{'path':16s} {'launches':>9s} {'@host':>6s} {'@full':>6s} {'syncs':>6s} {'zero_hooks':>10s} "
             f"{'host_ms min':>11s} {'median':>8s} {'predicted_ms':>12s} {'mm@full':>8s} {'dropout@full':>12s} "
             f"{'triton':>6s} {'zero':>4s} {'opt':>5s} {'opt_syncs':>9s}"]
    for p, r in results.items():
        if "error" in r:
            lines.append(f"{p:16s} ERROR {r['error']}")
            continue
        c, cf = r["census"], r["census_full_nozero"]
        tri = sum(v for k, v in c.items() if k.startswith("triton:"))
        lines.append(f"{p:16s} {r['launches']:9d} {r['launches_host_batch']:6d} {r['launches_full_nozero']:6d} "
                     f"{r['syncs']:6d} {r['zero_hooks']:10d} {r['host_ms']['min']:11.1f} {r['host_ms']['median']:8.1f} "
                     f"{r['predicted_ms']:12.1f} {cf.get('aten.mm', 0):8d} {cf.get('aten.native_dropout', 0):12d} "
                     f"{tri:6d} {r['zero']:>4s} {r.get('optimizer_launches', -1):5d} {r.get('optimizer_syncs', -1):9d}")
    lines.append("opt, opt_syncs: launches and host syncs of the optimizer step alone (counted with DeepSpeed, "
                 "inside 'launches'); predicted_ms costs the meta run's plain foreach AdamW instead, so at the floor "
                 "DeepSpeed's optimizer adds about: " + ", ".join(
                     f"{p} {_ds_optimizer_ms(r, args.floor_us):.0f} ms"
                     for p, r in results.items() if "error" not in r))
    lines.append("H200 profile census (2026-11-26, engine ZeRO-3 step): native_dropout 448, mm 2464 (288 MLP + 384 "
                 "projections + 1792 LoRA)")
    lines.append("predicted_ms by category (ms): " + "; ".join(
        f"{p}: " + ", ".join(f"{k} {v:.0f}" for k, v in r["predicted"].items() if k != "total")
        for p, r in results.items() if "predicted" in r))
    for p, r in results.items():
        if "census" in r:
            top = ", ".join(f"{k} {v}" for k, v in list(r["census"].items())[:12])
            lines.append(f"census {p}: {top}; syncs {r['sync_ops'] or '-'}")
            top = ", ".join(f"{k} {v}" for k, v in list(r["census_full_nozero"].items())[:8])
            lines.append(f"census {p} at full size, no DeepSpeed: {top}")
    fit = fit_floor(results)
    if fit is not None:
        lines.append(f"per-launch floor: {args.floor_us:g} us in use; {fit:.2f} us makes the engine's 'other' match "
                     "the profile exactly")
    for p, r in results.items():
        cal = r.get("calibration")
        if not cal:
            continue
        prof = PROFILE_MS[p]
        eg, eo = cal.get("gemm", 0) / prof["gemm"] - 1, cal.get("other", 0) / prof["other"] - 1
        lines.append(f"calibration {p} (mask 0.2 BERT, as profiled): frozen GEMMs predicted {cal.get('gemm', 0):.0f} "
                     f"ms vs {prof['gemm']:.0f} measured ({100 * eg:+.1f}%), other {cal.get('other', 0):.0f} ms vs "
                     f"{prof['other']:.0f} ({100 * eo:+.1f}%)" + (" [floor fitted here]" if p == "engine" else ""))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="engine config override (engine and reference-zero3 paths), e.g. model.fused_ops=triton")
    ap.add_argument("--tokens", default="32x512", help="batch x sequence of the counted step")
    ap.add_argument("--host-batch", default="2x64", help="batch x sequence of the host-time steps")
    ap.add_argument("--count-batch", default="4x64", help="batch x sequence of the counted real step")
    ap.add_argument("--host-steps", type=int, default=10)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--mask-prob", type=float, default=None, help="default: llm2vec's Mistral setting (0.8)")
    ap.add_argument("--scheme", default=None, choices=("bert", "all"))
    ap.add_argument("--reduced", action="store_true", help="CI: 2 layers, 4x64 tokens, 3 host steps, no calibration")
    ap.add_argument("--no-calibrate", dest="calibrate", action="store_false")
    ap.add_argument("--floor-us", type=float, default=HOST_FLOOR_US, help="per-launch floor of the prediction")
    ap.add_argument("--from-json", default=None, help="print the table of a run saved with --json (no measuring)")
    ap.add_argument("--json", default=None, help="also write the results (with census) to this file")
    ap.add_argument("--timeout-s", type=int, default=280, help="per path")
    ap.add_argument("--jobs", type=int, default=1, help="paths run at once (1 for host_ms figures: they share cores)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.mask_prob is None or args.scheme is None:
        p, s = llm2vec_masking("mistral")
        args.mask_prob = p if args.mask_prob is None else args.mask_prob
        args.scheme = s if args.scheme is None else args.scheme
    if args.reduced:
        args.layers, args.tokens, args.host_steps, args.calibrate = 2, "4x64", 3, False
        args.count_batch = "4x32"
    if args.worker:
        worker(args)
        return None
    paths = [p for p in args.paths.split(",") if p]
    bad = [p for p in paths if p not in PATHS]
    if bad:
        print(f"unknown path(s) {bad}; choose from {PATHS}", file=sys.stderr)
        sys.exit(2)
    if args.set:
        try:
            engine_config(args.set, TINY, 32)
        except ConfigError as exc:
            print(f"bad --set: {exc}", file=sys.stderr)
            sys.exit(2)
    if args.from_json:  # re-render a saved run (e.g. with another --floor-us); nothing is measured
        with open(args.from_json) as f:
            results = json.load(f)
        return _report(results, args)
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
                       "--tokens", args.tokens, "--host-batch", args.host_batch, "--host-steps", str(args.host_steps),
                       "--count-batch", args.count_batch,
                       "--layers", str(args.layers), "--mask-prob", str(args.mask_prob), "--scheme", args.scheme]
                cmd += [f"--set={s}" for s in args.set] + ([] if args.calibrate else ["--no-calibrate"])
                errf = open(os.path.join(tmp, f"{p}.err"), "w+")
                proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=errf, stderr=subprocess.STDOUT, text=True)
                running[p] = (proc, out, errf, time.perf_counter())
            time.sleep(0.2)
            for p, (proc, out, errf, t0) in list(running.items()):
                if proc.poll() is None and time.perf_counter() - t0 < args.timeout_s:
                    continue
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                    results[p] = {"error": f"timeout after {args.timeout_s}s"}
                elif proc.returncode != 0 or not os.path.isfile(out):
                    errf.seek(0)
                    text = errf.read()
                    tail = text.strip().splitlines()[-1:] or ["no output"]
                    results[p] = {"error": f"rc {proc.returncode}: {tail[0][:200]}"}
                    log(f"{p} failed:\n{text[-3000:]}")
                else:
                    with open(out) as f:
                        results[p] = json.load(f)
                errf.close()
                del running[p]
                log(f"{p}: {time.perf_counter() - t0:.1f}s")
    results = {p: results[p] for p in paths}
    return _report(results, args)


def _report(results, args):
    finish(results, args.floor_us)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(table(results, args))
    keys = ("launches", "syncs", "zero_hooks", "host_ms", "predicted_ms")
    print(json.dumps({p: ({k: r[k] for k in keys} if "error" not in r else {"error": r["error"]})
                      for p, r in results.items()}))
    if any("error" in r for r in results.values()):
        sys.exit(1)
    return results


if __name__ == "__main__":
    main()

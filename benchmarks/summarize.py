"""The GPU run's closing table: every target of issues 4-7, measured ratio against target, met or missed.

    python -m benchmarks.summarize --dir $OUT [--steps steps.tsv] [--md $OUT/summary.md] [--plot train_step.png]
    python -m benchmarks.summarize --dir <fetched $OUT> --archive benchmarks/results   # after the GPU run

Reads bench_attention.csv, bench_masked_ce.csv, bench_contrastive.csv, bench_train_step.csv (common.py columns) and
correctness.json from --dir. Every figure comes from those files; a target whose rows are missing is reported as n/a
with the reason, and so is one whose row measured nothing (skipped, error). A kernel CSV is read for its last
row's device (newest_gpu: rows of another, a --tiny rehearsal's or another card's, are left out and counted in
the notes). Train-step rows of follow-up calls in
--dir's rerun/ replace the first call's, but for those of another GPU (left out, said in the notes); a ratio of two
calls' or GPUs' rows is none; the header names every GPU and commit of the rows read. A run from before llm2vec's HF
recipe joined (its `reference` rows say zero=3) is read in today's names (legacy_rows). --steps is the tab-separated
step log gpu_run.sh writes (name, exit code, seconds); kernel checks that did not run (ops of
llm2vec_kernels.gpu_check.CHECKS absent from correctness.json) are NOT RUN rows. --plot draws the train-step
throughput and peak memory per stage and impl. --archive ROOT copies a fetched $OUT (CSVs, correctness.json, log.txt,
summary, and the plots, profiler text, environment and step log unpacked from results.tar.gz) to ROOT/<date>-<gpu>/,
with a README: what ran, card, commit.
"""
import ast
import json
import math
import os
import re
import sys

from benchmarks.archive_run import archive, step_log, steps_notes
from benchmarks.summary_rows import extra as _extra, key as _key, newest_gpu, read as _rows, train_step_rows
from engine.cli import ArgumentParser, fail, unwritable

GPU_CHECK_SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "llm2vec_kernels",
                                "gpu_check", "__init__.py")


def gpu_checks(path=GPU_CHECK_SOURCE):
    """llm2vec_kernels.gpu_check.CHECKS, the literal tuple of op names its source assigns, read without importing
    it (it imports torch; this module stays free of it); () when the source is missing or assigns another thing."""
    try:
        with open(path) as f:
            body = ast.parse(f.read(), path).body
        node = next(n for n in body if isinstance(n, ast.Assign)
                    and [getattr(t, "id", "") for t in n.targets] == ["CHECKS"])
        value = ast.literal_eval(node.value)
    except (OSError, SyntaxError, StopIteration, ValueError):
        return ()
    return value if isinstance(value, tuple) and all(isinstance(v, str) for v in value) else ()


def _f(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def _ok(v):
    return v == v and not math.isinf(v)


def distinct(rows, key):
    """The rows' values of ``key``, each once in the order met, comma-separated ("" when none has one)."""
    return ", ".join(dict.fromkeys(r[key] for r in rows if r.get(key)))


PROTOCOL = (5, 20)  # benchmarks/common.py's WARMUP and ITERS: the least a final timing verdict rests on


def _row_timing(row):
    """(median, q1, q3, warmup, timed) in ms from its ms column and timing extras; a count is None where the row
    does not record it (rows from before the protocol: a contrastive row's ``iters`` is its timed count)."""
    ex = _extra(row)

    def count(*keys):
        for k in keys:
            if k in ex:
                try:
                    return int(ex[k])
                except ValueError:
                    return None
        return None

    return (_f(row.get("ms")), _f(ex.get("q1_ms")), _f(ex.get("q3_ms")), count("warmup"),
            count("timed_steps", "iters"))


def row_doubts(r):
    """Why one row's time is no final figure ([] when it is): below PROTOCOL (and the row's cut), or no quartiles."""
    out, (_, q1, q3, warm, timed), name = [], _row_timing(r), r.get("impl", "?")
    cut = f", cut={_extra(r)['cut']}" if _extra(r).get("cut") else ""  # budget: its stop rule; term: SIGTERM
    if warm is not None and timed is not None and (warm < PROTOCOL[0] or timed < PROTOCOL[1]):
        out.append(f"{name}: {warm} warm-up + {timed} timed calls (protocol {PROTOCOL[0]} + {PROTOCOL[1]}){cut}")
    elif timed is not None and timed < PROTOCOL[1]:
        out.append(f"{name}: {timed} timed calls (protocol {PROTOCOL[1]}){cut}")
    if not (_ok(q1) and _ok(q3)):
        out.append(f"{name}: no quartiles recorded")
    return out


def timing_doubts(value, limit, up, down):
    """Why a time ratio's verdict is provisional ([] when it is not). ``value`` grows with ``up``'s time over
    ``down``'s (a time ratio up / down, or a tokens/s ratio down-path / up-path); both rows are what it rests on:
    provisional when either row_doubts, or when the target lies inside the ratio's IQR range: ``value``
    scaled by (q1_up / median_up) / (q3_down / median_down) at the low end and (q3_up / median_up) / (q1_down /
    median_down) at the high end, the ratio each pair of quartiles would give."""
    out = row_doubts(up) + row_doubts(down)
    (mu, q1u, q3u, _, _), (md, q1d, q3d, _, _) = _row_timing(up), _row_timing(down)
    if all(_ok(v) and v > 0 for v in (mu, q1u, q3u, md, q1d, q3d)):
        lo, hi = value * (q1u / mu) / (q3d / md), value * (q3u / mu) / (q1d / md)
        if lo <= limit <= hi:
            out.append(f"the IQR range of the ratio, {lo:.3f}-{hi:.3f}x, spans the target {limit}x")
    return out


class Table:
    def __init__(self):
        self.lines = []

    def add(self, issue, target, measured, verdict, note=""):
        self.lines.append((issue, target, measured, verdict, note))

    def ratio(self, issue, target, value, limit, kind, detail="", fmt="{:.3f}", timing=None):
        """kind 'le': value <= limit is met; 'ge': value >= limit. ``timing`` = (up row, down row) for a time
        ratio (timing_doubts): a verdict it puts in doubt reads "met (provisional)" or "MISSED (provisional)",
        the reasons in the notes."""
        if not _ok(value):
            self.add(issue, target, "n/a", "n/a", detail or "no measurement")
            return
        verdict = "met" if (value <= limit if kind == "le" else value >= limit) else "MISSED"
        doubts = timing_doubts(value, limit, *timing) if timing else []
        if doubts:
            verdict += " (provisional)"
            detail = "; ".join(x for x in (detail, "provisional: " + ", ".join(doubts)) if x)
        self.add(issue, target, fmt.format(value) + "x", verdict, detail)

    def markdown(self):
        out = ["| issue | target | measured | verdict | where / notes |", "| --- | --- | --- | --- | --- |"]
        return "\n".join(out + ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in self.lines])


def attention_targets(t, rows):
    if rows is None:
        for target in ("dense D=128 S>=512 fwd+bwd <= 1.0x best SDPA", "padded mix >= 2x SDPA + additive mask"):
            t.add("4 attention", target, "n/a", "n/a", "bench_attention.csv missing")
        return
    ok = [r for r in rows if _ok(_f(r["ms"])) and r["pass"] in ("fwd+bwd", "fwdbwd", "step")]
    by_shape, row_of = {}, {}
    for r in ok:
        by_shape.setdefault(r["shape"], {})[r["impl"]] = _f(r["ms"])
        row_of[(r["shape"], r["impl"])] = r
    dense, mixed = [], []
    for shape, impls in by_shape.items():
        tri = [(v, k) for k, v in impls.items() if k.startswith("triton")]
        if not tri:
            continue
        tri, tri_impl = min(tri)  # the faster of the fixed configs and opt-in autotuning, named in the notes
        label = f"{shape} [{tri_impl}]"
        masked = [(v, k) for k, v in impls.items() if "mask" in k.lower()]
        plain = [(v, k) for k, v in impls.items() if k.lower().startswith("sdpa") and "mask" not in k.lower()]
        if masked and "pad" in shape.lower():
            m, m_impl = min(masked)
            mixed.append((m / tri, label, (row_of[(shape, m_impl)], row_of[(shape, tri_impl)])))
        m = re.match(r"^(\d+)x(\d+)x(\d+)x(\d+)x(\d+)$", shape.strip())
        if m:
            s, d = int(m.group(2)), int(m.group(5))
        else:
            ms = re.search(r"(?:^|[^A-Za-z])S=?(\d+)|xS(\d+)", shape)
            md = re.search(r"(?:^|[^A-Za-z])D=?(\d+)|xD(\d+)", shape)
            ms = ms and next(int(g) for g in ms.groups() if g)
            md = md and next(int(g) for g in md.groups() if g)
            s, d = ms or None, md or None
        if plain and d == 128 and s is not None and s >= 512 and "pad" not in shape.lower() and "varlen" not in shape:
            p, p_impl = min(plain)
            dense.append((tri / p, label, (row_of[(shape, tri_impl)], row_of[(shape, p_impl)])))
    first = lambda x: x[0]  # noqa: E731
    if dense:
        worst = max(dense, key=first)
        t.ratio("4 attention", "dense D=128 S>=512 fwd+bwd time <= 1.0x best SDPA backend", worst[0], 1.0, "le",
                f"worst of {len(dense)} shapes: {worst[1]}; best {min(dense, key=first)[0]:.3f}x", timing=worst[2])
    else:
        t.add("4 attention", "dense D=128 S>=512 fwd+bwd <= 1.0x best SDPA", "n/a", "n/a",
              "no dense D=128 S>=512 fwd+bwd rows with triton and sdpa")
    if mixed:
        worst = min(mixed, key=first)
        t.ratio("4 attention", "padded length mix: >= 2x faster than SDPA + additive mask", worst[0], 2.0, "ge",
                f"speedup (mask ms / triton ms), {worst[1]}", timing=worst[2])
    else:
        t.add("4 attention", "padded mix >= 2x SDPA + additive mask", "n/a", "n/a",
              "no row with an sdpa *mask* impl beside triton")
    # Gemma2's soft-capped scores: no issue target, the speed-up over what a Gemma2 user would otherwise run
    for shape, impls in by_shape.items():
        if "cap" not in shape.split(":")[-1]:
            continue
        tri = [(v, k) for k, v in impls.items() if k.startswith("triton")]
        others = {k: v for k, v in impls.items() if k in ("eager", "flex", "flash_attn")}
        if tri and others:
            best, name = min((v, k) for k, v in others.items())
            t.add("soft-cap", f"{shape.split(':')[0]} fwd+bwd: best of {'/'.join(sorted(others))} over triton",
                  f"{best / min(tri)[0]:.2f}x", "info", f"{shape} [{min(tri)[1]} vs {name}]")


def masked_ce_targets(t, rows):
    name = "5 masked CE"
    if rows is None:
        t.add(name, "Llama-3-8B: peak <= 5%, time <= 0.35x full logits, <= 1.0x gather", "n/a", "n/a",
              "bench_masked_ce.csv missing")
        return
    sel = {r["impl"]: r for r in rows  # each impl's last row
           if r["shape"].startswith("llama3_8b") and r["pass"] == "fwd+bwd" and _ok(_f(r["ms"]))}
    tri, full, gat = sel.get("triton_fused"), sel.get("full_logits"), sel.get("gather_torch")
    if tri and full:
        t.ratio(name, "Llama-3-8B peak extra memory <= 0.05x full-logits path",
                _f(tri["peak_mb"]) / _f(full["peak_mb"]), 0.05, "le",
                f"{_f(tri['peak_mb']):.0f} MB vs {_f(full['peak_mb']):.0f} MB", fmt="{:.4f}")
        t.ratio(name, "Llama-3-8B fwd+bwd time <= 0.35x full-logits path", _f(tri["ms"]) / _f(full["ms"]), 0.35, "le",
                f"{_f(tri['ms']):.2f} ms vs {_f(full['ms']):.2f} ms", timing=(tri, full))
    else:
        t.add(name, "Llama-3-8B vs full logits (memory, time)", "n/a", "n/a",
              "missing triton_fused or full_logits fwd+bwd row (OOM or error?)")
    if tri and gat:
        t.ratio(name, "Llama-3-8B fwd+bwd time <= 1.0x gather-then-torch", _f(tri["ms"]) / _f(gat["ms"]), 1.0, "le",
                f"{_f(tri['ms']):.2f} ms vs {_f(gat['ms']):.2f} ms", timing=(tri, gat))
    else:
        t.add(name, "Llama-3-8B time <= 1.0x gather-then-torch", "n/a", "n/a", "missing rows")
    rec = sel.get("triton_recompute")
    if rec and gat:  # the other strategy, for the record (auto picks eager for a frozen head)
        t.add(name, "Llama-3-8B recompute strategy: time / gather-then-torch (no target)",
              f"{_f(rec['ms']) / _f(gat['ms']):.3f}x", "info",
              f"{_f(rec['ms']):.2f} ms, peak {_f(rec['peak_mb']):.0f} MB")


LOWP_TIME_TARGET = "B=512 loss fwd+bwd time <= 1.0x torch_lowp (the same dense maths in the inputs' dtype)"
FP32_TIME_INFO = "B=512 loss fwd+bwd time / torch reference (fp32 upcast: not like-for-like; no target)"


def contrastive_targets(t, rows, ts_rows=None):
    """Issue 6's rows. Time is judged against torch_lowp, the same dense maths in the inputs' dtype: the torch
    reference upcasts to fp32, and its ratio is an info row (an older CSV without torch_lowp: the baseline is
    missing, n/a). Memory is the issue's target against the reference (torch_lowp's ratio in the notes). Each
    figure is its (B, impl)'s newest (last) row, as for attention and masked CE."""
    name, mb, ms = "6 contrastive", (lambda r: _f(r["peak_mb"])), (lambda r: _f(r["ms"]))
    if rows is None:
        t.add(name, "B=32768 peak <= 10% torch; B=512 time <= 1.0x torch_lowp", "n/a", "n/a",
              "bench_contrastive.csv missing")
    else:
        def pick(b, impl):
            found = [r for r in rows if r["shape"].startswith(f"B={b},") and r["impl"] == impl
                     and r["pass"] == "fwd+bwd" and _ok(_f(r["ms"]))]
            return found[-1] if found else None

        tri, ref, low = (pick(32768, i) for i in ("triton", "torch", "torch_lowp"))
        if tri and ref:
            lowp = f"; torch_lowp {mb(low):.0f} MB ({mb(tri) / mb(low):.4f}x)" if low and mb(low) > 0 else ""
            t.ratio(name, "B=32768 loss fwd+bwd peak memory <= 0.10x torch reference", mb(tri) / mb(ref), 0.10, "le",
                    f"{mb(tri):.0f} MB vs {mb(ref):.0f} MB (fp32 upcast){lowp}", fmt="{:.4f}")
        else:
            t.add(name, "B=32768 peak <= 0.10x torch", "n/a", "n/a", "missing triton or torch fwd+bwd row at B=32768")
        tri, ref, low = (pick(512, i) for i in ("triton", "torch", "torch_lowp"))
        if tri and low:
            t.ratio(name, LOWP_TIME_TARGET, ms(tri) / ms(low), 1.0, "le", f"{ms(tri):.3f} ms vs {ms(low):.3f} ms",
                    timing=(tri, low))
        else:
            t.add(name, LOWP_TIME_TARGET, "n/a", "n/a", "missing triton fwd+bwd row at B=512" if not tri else
                  "no torch_lowp fwd+bwd row at B=512: the like-for-like baseline is missing (an older CSV?)")
        if tri and ref:
            t.add(name, FP32_TIME_INFO, f"{ms(tri) / ms(ref):.3f}x", "info", f"{ms(tri):.3f} ms vs {ms(ref):.3f} ms")
    big = {(r["impl"], r["shape"].split()[1]): r for r in (ts_rows or []) if r["shape"].startswith("supervised-bigbatch")}
    cached = [r for (impl, b), r in big.items() if b.startswith("B4096") and impl.startswith("engine-gradcache")]
    if not cached:
        t.add(name, "supervised step, 7B, global batch 4096 (grad cache) fits on one GPU", "not measured", "n/a",
              "no supervised-bigbatch B4096 row (bench_train_step --big-batch)")
    else:
        r = cached[0]
        nocache = [x for (impl, b), x in big.items() if b.startswith("B4096") and impl == "engine-nocache"]
        nc = "" if not nocache else "; without caching: " + (
            f"{mb(nocache[0]):.0f} MB" if _ok(ms(nocache[0])) else "did not run (OOM or skipped)")
        # its time: below the protocol, or no step counts (rows before they had them timed one cold step)
        doubts = [] if not _ok(ms(r)) else row_doubts(r) if _row_timing(r)[4] is not None else [
            f"{r['impl']}: no warm-up / timed step counts (one cold step?)"]
        t.add(name, "supervised step, 7B, global batch 4096 (grad cache) fits on one GPU",
              *fits_verdict(_extra(r).get("status", "?"), mb(r)),
              f"{r['shape']}, {r['ms']} ms" + ("; time provisional: " + ", ".join(doubts) if doubts else "") + nc)


def fits_verdict(status, peak_mb):
    """(measured, verdict) of a "fits on one GPU" target from its row's status: ok is met (its peak), oom is
    MISSED; any other status (skipped_budget, error, ...) measured nothing: n/a, saying which."""
    if status == "ok":
        return f"{peak_mb:.0f} MB peak", "met"
    if status == "oom":
        return "oom", "MISSED"
    return f"not measured ({status})", "n/a"


def train_step_targets(t, rows, legacy=False):
    """Issue 7's rows. The MNTP target's reference is llm2vec's HF recipe (`reference`); in a legacy run
    (legacy_rows) it was the ZeRO-3 reference path, the only one then, and the verdict is judged against it."""
    name = "7 train step"
    if rows is None:
        t.add(name, "MNTP >= 1.5x tokens/s, peak <= 0.6x; supervised >= 1.3x", "n/a", "n/a",
              "bench_train_step.csv missing")
        return {}
    steps = {(r["shape"].split()[0], r["impl"]): r for r in rows if r["pass"] == "step"}  # each pair's last row

    def tps(stage, impl):
        r = steps.get((stage, impl))
        return _f(_extra(r).get("tokens_per_s")) if r else float("nan")

    def two_calls(stage, a, b):
        """Why rows a and b of the stage make no ratio: measured by two calls (commits) or on two GPUs, else ""."""
        (ca, ga), (cb, gb) = ((steps[(stage, i)].get("commit"), steps[(stage, i)].get("gpu")) for i in (a, b))
        return "" if (ca, ga) == (cb, gb) else f"{a} and {b} from two calls ({ca} on {ga}, {cb} on {gb}): no ratio"

    def why(stage):
        bad = [f"{i}: {_extra(r).get('status')} {_extra(r).get('detail', '')}".strip()
               for (s, i), r in steps.items()
               if s == stage and (i.startswith("reference") or i in ("engine", "engine-auto"))
               and _extra(r).get("status") != "ok"]
        return "; ".join(bad)

    def timing(stage, impl):
        ex = _extra(steps[(stage, impl)])
        if "min_ms" not in ex:
            return f"{impl} {_f(steps[(stage, impl)]['ms']):.0f} ms"
        return (f"{impl} median {_f(steps[(stage, impl)]['ms']):.0f} ms (min {_f(ex['min_ms']):.0f}, IQR "
                f"{_f(ex['iqr_ms']):.0f}, {ex.get('timed_steps', '?')} steps)")

    # Every ratio names its reference: `reference` is llm2vec's one-GPU HF + PEFT recipe (MNTP only),
    # `reference-zero3` the older ablation inside the engine's ZeRO-3 harness. The MNTP engine figure is
    # `engine-auto` (what engine/train.py sets up: fused layer, the memory plan's ZeRO stage and recompute) when
    # that row ran, else the harness's `engine` row (ZeRO-3, full recompute, no fused decoder ops).
    # another structure's MNTP rows (bench_train_step --arch: "gemma2-9b:mntp ..."): no issue target, the ratio
    for stage in sorted({s for s, _ in steps if s.endswith(":mntp")}):
        a, r = tps(stage, "engine-auto"), tps(stage, "reference")
        state = ", ".join(f"{i} {_extra(row).get('status')}" for (s, i), row in sorted(steps.items()) if s == stage)
        apart = two_calls(stage, "engine-auto", "reference") if _ok(a) and _ok(r) else ""
        t.add(name, f"{stage.split(':')[0]} MNTP tokens/s: engine-auto over reference",
              f"{a / r:.2f}x" if _ok(a) and _ok(r) and r and not apart else "n/a", "info", apart or state)
    auto = steps.get(("mntp", "engine-auto"))
    head = "engine-auto" if auto and _extra(auto).get("status") == "ok" else "engine"
    mntp_ref = "reference-zero3" if legacy else "reference"
    pairs = [("mntp", mntp_ref, 1.5), ("mntp", "reference-fa2", None), ("mntp", "reference-zero3", None),
             ("mntp", "engine", None), ("supervised", "reference-zero3", 1.3), ("simcse", "reference-zero3", None)]
    done = set()
    for stage, ref, target in pairs:
        eng = head if stage == "mntp" else "engine"
        if eng == ref or (stage, ref) in done:
            continue
        done.add((stage, ref))
        e, r = tps(stage, eng), tps(stage, ref)
        if (stage, ref) not in steps and ref != mntp_ref and stage == "mntp":
            continue
        if _ok(e) and _ok(r):
            apart = two_calls(stage, eng, ref)
            detail = apart or f"{eng} {e:.0f} vs {ref} {r:.0f} tokens/s; {timing(stage, eng)}; {timing(stage, ref)}"
            e = float("nan") if apart else e
        else:
            detail = why(stage) or "no rows"
        if target is None:
            t.add(name, f"{stage} tokens/s {eng} / {ref} (no target)",
                  f"{e / r:.3f}x" if _ok(e) and _ok(r) else "n/a", "info", detail)
        else:
            t.ratio(name, f"{stage} step tokens/s >= {target}x {ref}", e / r if _ok(r) else float("nan"),
                    target, "ge", detail, timing=(steps[(stage, ref)], steps[(stage, eng)]) if _ok(e) else None)
    re_ = steps.get(("mntp", head))
    ref_mem = "reference" if steps.get(("mntp", "reference")) else "reference-zero3"
    rr = steps.get(("mntp", ref_mem))
    if re_ and rr and _ok(_f(re_["peak_mb"])) and _ok(_f(rr["peak_mb"])) and not two_calls("mntp", head, ref_mem):
        t.ratio(name, f"MNTP step peak memory <= 0.6x {ref_mem} (max_memory_allocated, weights included)",
                _f(re_["peak_mb"]) / _f(rr["peak_mb"]), 0.6, "le",
                f"{head} {_f(re_['peak_mb']):.0f} MB vs {_f(rr['peak_mb']):.0f} MB; above weights: "
                f"{_f(_extra(re_).get('act_peak_mb')):.0f} vs {_f(_extra(rr).get('act_peak_mb')):.0f} MB "
                f"({_f(_extra(re_).get('act_peak_mb')) / _f(_extra(rr).get('act_peak_mb')):.3f}x)")
    else:
        t.add(name, f"MNTP peak memory <= 0.6x {ref_mem}", "n/a", "n/a",
              why("mntp") or (re_ and rr and two_calls("mntp", head, ref_mem)) or "no peak memory (CPU run?)")
    for (stage, impl), r in sorted(steps.items()):
        if impl.startswith("engine-torch-"):
            e, a = tps(stage, "engine"), _f(_extra(r).get("tokens_per_s"))
            apart = two_calls(stage, "engine", impl) if _ok(e) and _ok(a) else ""
            t.add(name, f"ablation {stage}: engine tokens/s / {impl} tokens/s (>1: the kernel helps)",
                  f"{e / a:.3f}x" if _ok(e) and _ok(a) and not apart else "n/a", "info",
                  apart or _extra(r).get("status", ""))
    return steps


def profile_notes(rows):
    out = []
    for r in rows or []:
        if r["pass"] != "profile" or _extra(r).get("status") != "ok":
            continue
        ex = _extra(r)
        cats = {k[:-3]: _f(v) for k, v in ex.items() if k.endswith("_ms") and k != "busy_ms"}
        total = sum(v for v in cats.values() if _ok(v))
        if total <= 0:
            continue
        top = sorted(cats.items(), key=lambda kv: -kv[1])[:5]
        busy = _f(ex.get("busy_pct"))
        busy = f"GPU busy {busy:.0f}% of the step, " if _ok(busy) else ""
        out.append(f"- profile {r['shape'].split()[0]} / {r['impl']} (step {_f(r['ms']):.0f} ms under the profiler, "
                   f"{busy}{total:.0f} ms of llm2vec_kernels/ops): "
                   + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in top))
    return out


def correctness(path):
    if not os.path.isfile(path):
        return ["- correctness.json missing"]
    try:
        with open(path) as f:
            data = json.load(f)
    except Exception as exc:
        return [f"- correctness.json unreadable: {exc}"]
    out = []
    for op, res in data.items():
        if isinstance(res, dict) and "error" in res:
            out.append(f"- gpu_check {op}: ERROR {res['error'][:160]}")
            continue
        skipped = [r for r in res if r.get("skipped")] if isinstance(res, list) else []
        rows = [r for r in res if not r.get("skipped")] if isinstance(res, list) else []
        bad = [r for r in rows if not r.get("ok")]
        out.append(f"- gpu_check {op}: {len(rows) - len(bad)}/{len(rows)} ok"
                   + ("" if not bad else "; failing: " + ", ".join(
                       f"{r.get('case', '?')}:{r.get('quantity', r.get('tensor', ''))}" for r in bad[:6]))
                   + ("" if not skipped else f"; NOT RUN ({skipped[0]['skipped']}): "
                      + ", ".join(str(r.get("case")) for r in skipped)))
    return out


def correctness_target(t, path, steps_path):
    """NOT RUN rows of the bf16 kernel checks, naming why from the step log, never a silent gap among the notes: one
    when correctness.json is missing; else one per op of gpu_checks() the file lacks (a check that never started)
    and one when checks left cases unchecked for their time budget (rows with "skipped")."""
    step = next((s for s in step_log(steps_path) if s[0] == "correctness"), None)
    step_says = "" if step is None else f"step correctness {step[1]}" + (f" ({step[3]})" if step[3] else "")
    if os.path.isfile(path):
        try:
            with open(path) as f:
                data = dict(json.load(f))
        except (OSError, ValueError, TypeError):
            return  # correctness() says it does not read
        for op in [op for op in gpu_checks() if op not in data]:
            t.add("bf16 correctness", f"gpu_check {op} against its reference", "not run", "NOT RUN",
                  "absent from correctness.json" + (f"; {step_says}" if step_says else ""))
        skipped = [f"{op}:{r.get('case')}" for op, res in data.items() if isinstance(res, list)
                   for r in res if isinstance(r, dict) and r.get("skipped")]
        if skipped:
            t.add("bf16 correctness", "every case of every kernel's gpu_check", f"{len(skipped)} case(s) not run",
                  "NOT RUN", "time budget: " + ", ".join(skipped[:8]) + (" ..." if len(skipped) > 8 else ""))
        return
    t.add("bf16 correctness", "gpu_check of every kernel against its reference", "not run", "NOT RUN",
          step_says or "correctness.json missing")


def plot_train_step(rows, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in rows if r["pass"] == "step" and _ok(_f(_extra(r).get("tokens_per_s")))]
    if not steps:
        return None
    stages = sorted({r["shape"].split()[0] for r in steps})
    impls = sorted({r["impl"] for r in steps}, key=lambda i: (i != "reference", i != "reference-zero3", i != "engine", i))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(impls)
    for ax, metric, label in ((axes[0], "tokens_per_s", "tokens/s"), (axes[1], "peak_mb", "peak memory (MB)")):
        for i, impl in enumerate(impls):
            vals = []
            for s in stages:
                m = [r for r in steps if r["shape"].split()[0] == s and r["impl"] == impl]
                v = (_f(_extra(m[-1]).get(metric)) if metric != "peak_mb" else _f(m[-1]["peak_mb"])) if m else 0.0
                vals.append(v if _ok(v) else 0.0)
            ax.bar([x + i * width for x in range(len(stages))], vals, width, label=impl)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(stages))])
        ax.set_xticklabels(stages)
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"train step, {distinct(steps, 'gpu')} @ {distinct(steps, 'commit')}")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def main(argv=None):
    ap = ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", required=True)
    ap.add_argument("--steps", default=None)
    ap.add_argument("--md", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--archive", default=None, help="copy the run to ARCHIVE/<date>-<gpu>/ with a README")
    args = ap.parse_args(argv)
    d = args.dir
    if not os.path.isdir(d):
        sys.exit(fail(f"--dir {d} is not a folder (a fetched GPU run's $OUT)"))
    for flag, value in (("--md", args.md), ("--plot", args.plot)):
        if value is not None and unwritable(value):
            sys.exit(fail(f"{flag} {unwritable(value)}"))
    if args.archive:
        try:
            dst = archive(d, args.archive)
        except OSError as e:
            sys.exit(fail(f"--archive {args.archive}: {e}"))
        print(f"archived to {dst}")
        return dst
    t = Table()
    correctness_target(t, os.path.join(d, "correctness.json"), args.steps)
    try:
        ts_rows, legacy, apart = train_step_rows(d)
    except Exception:
        ts_rows, legacy, apart = None, False, []
    every = list(ts_rows or [])  # the rows the table reads: the header names each GPU and commit among them
    left_out = []  # (csv name, rows of another device than the file's last row's)
    for fn, csv_name in ((attention_targets, "bench_attention.csv"), (masked_ce_targets, "bench_masked_ce.csv"),
                         (contrastive_targets, "bench_contrastive.csv")):
        try:
            rows = _rows(os.path.join(d, csv_name))
            rows, other = newest_gpu(rows)
            if other:
                left_out.append((csv_name, rows[-1]["gpu"], other))
            every += rows or []
            fn(t, rows, *([ts_rows] if fn is contrastive_targets else []))
        except Exception as exc:  # one malformed file must not hide the rest
            t.add(csv_name, "parse", "n/a", "n/a", f"{type(exc).__name__}: {exc}")
    try:
        train_step_targets(t, ts_rows, legacy)
    except Exception as exc:
        t.add("bench_train_step.csv", "parse", "n/a", "n/a", f"{type(exc).__name__}: {exc}")
    commits = distinct(every, "commit")
    lines = [f"# GPU run summary ({distinct(every, 'gpu') or 'unknown device'}, commit{'s' * (', ' in commits)} "
             f"{commits or 'unknown'})", "", t.markdown(), ""]
    notes = steps_notes(args.steps) + correctness(os.path.join(d, "correctness.json"))
    if apart:
        notes.append(f"- rerun/: {len(apart)} train-step rows measured on {distinct(apart, 'gpu')}, not the first "
                     "call's GPU, left out (no ratio across GPUs): " + ", ".join("/".join(_key(r)) for r in apart))
    for csv_name, gpu, other in left_out:
        notes.append(f"- {csv_name}: {len(other)} rows measured on {distinct(other, 'gpu')}, not its last row's "
                     f"device ({gpu}), left out (no ratio across devices)")
    zero = {_extra(r).get("zero") for r in ts_rows or [] if r.get("pass") == "step"  # `reference`: no DeepSpeed
            and not r.get("impl", "").startswith("reference") or r.get("impl") == "reference-zero3"} - {None}
    if "none" in zero:
        notes.append("- NOTE: the train step ran WITHOUT DeepSpeed ZeRO-3 (zero=none: deepspeed unavailable or failed)")
    try:
        notes += profile_notes(ts_rows)
    except Exception as exc:
        notes.append(f"- profile rows unreadable: {exc}")
    lines += notes
    text = "\n".join(lines) + "\n"
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    if args.plot and ts_rows:
        try:
            plot_train_step(ts_rows, args.plot)
        except Exception as exc:
            print(f"plot failed: {exc}", file=sys.stderr)
    print(text)
    return text


if __name__ == "__main__":
    main()

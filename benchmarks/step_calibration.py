"""Calibration of the CPU proxy's cost model (benchmarks/step_cost.py) on the committed H200 profile, and the best
and pessimistic step time of each row.

The profile (benchmarks/results/2026-11-26-h200/train_step_profile.txt) measured two MNTP steps on an H200 (bf16,
ZeRO-3, 32 x 512, mask 0.2 BERT): the engine as it was then (the proxy's "engine-as-profiled") and the older
reference (the proxy's "reference-zero3"). Its kernel time per category is mapped onto the cost model's classes:

    gemm = linear: MLP + linear: attention projections   attention   lora = linear: LoRA   loss   optimizer
    hooks = ZeRO fetch/release/grad-reduce                elementwise / other = the profile's "other" split by op

The profile lists only its top 25 ops, so its "elementwise" is the listed elementwise ops of "other" and its
"other" the rest of that category (unlisted small elementwise ops included); its ZeRO category also holds CUDA
runtime calls (146 ms of the reference's 148 ms), which are left out of "hooks" (they are host time, not kernels).

For a class c with roofline time R_c (no floor) and n_c launches, the prediction at efficiency f is
(R_c + n_c * floor) * f. f_c = measured / predicted(f=1) on each profiled path; a row's best figure uses the
smallest f_c of the profiled paths, its pessimistic figure the largest. elementwise and other share one factor (the
floor was fitted on their sum). Triton kernels the profile never ran (LoRA, RMSNorm, RoPE, GLU) take their class's
factor at best and at worst the measured Triton attention's (the only Triton kernel timed, well off its roofline).
DeepSpeed is not run on meta tensors, so launches it adds are costed from the census: the gradient hooks
(hook_launches) and the optimizer step's launches at HOOK_US each at best (what each of the engine's 896 ZeRO-3
gradient-hook copies took in the profile) and at the per-launch floor at worst.
"""
import os
import re

from benchmarks.harness import ROOT
from benchmarks.step_cost import CLASSES, HOST_FLOOR_US, is_elementwise

PROFILE = os.path.join(ROOT, "benchmarks", "results", "2026-11-26-h200", "train_step_profile.txt")
# the proxy paths that rerun the committed profile's steps on meta tensors (--calibrate): "engine" as profiled
# (ZeRO-3, PEFT LoRA, full recompute: bench_step_ops calibrates it as engine-as-profiled) and the ZeRO-3 reference
PROFILED = ("engine", "reference-zero3")
PROFILE_CLASS = {"linear: MLP": "gemm", "linear: attention projections": "gemm", "attention": "attention",
                 "linear: LoRA": "lora", "loss": "loss", "optimizer": "optimizer",
                 "ZeRO fetch/release/grad-reduce": "hooks", "other": "other"}
FACTOR_CLASSES = ("gemm", "attention", "lora", "loss")  # + elementwise and other, one shared factor
_CAT = re.compile(r"^(.+?)\s+([0-9.]+)\s+([0-9.]+)%$")
_OP = re.compile(r"^\s*([0-9.]+) ms\s+(\d+)x\s+(.+)\s+(\S+)\s*$")


def profiled_path(name, setup):
    """The path a profile section "== mntp / <name> (<card>, <dtype>, <setup>)" ran. Sections are named by
    bench_train_step's impl. Before llm2vec's HF recipe joined it (the committed profile), `reference` was the
    ZeRO-3 reference, its setup "zero=3": today's reference-zero3. Today's `reference` is the HF recipe (setup
    "no DeepSpeed"), the proxy's reference path; reference-zero3, engine (the ZeRO-3 harness, which the proxy's
    engine calibration reruns as profiled) and engine-auto keep their names."""
    if name == "reference" and "zero=" in setup:
        return "reference-zero3"
    return name


def read_profile(path=PROFILE):
    """{path (profiled_path): {"ms": {class: measured ms}, "ops": [(ms, launches, profile category, op name)]}}."""
    out, cur, section = {}, None, None
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            m = re.match(r"^== mntp / (\S+) \((.*)\)", line)
            if m:
                cur = out.setdefault(profiled_path(m.group(1), m.group(2)),
                                     {"ms": dict.fromkeys(CLASSES, 0.0), "ops": []})
                section = "cats"
                continue
            if cur is None:
                continue
            if line.startswith("-- top") and "ops" in line:
                section = "ops"
                continue
            if line.startswith("-- top"):
                section = None
                continue
            if section == "cats" and _CAT.match(line) and _CAT.match(line).group(1) in PROFILE_CLASS:
                m = _CAT.match(line)
                cur["ms"][PROFILE_CLASS[m.group(1)]] += float(m.group(2))
            elif section == "ops" and _OP.match(line):
                m = _OP.match(line)
                cur["ops"].append((float(m.group(1)), int(m.group(2)), m.group(3).strip(), m.group(4)))
    for prof in out.values():  # the listed elementwise ops of "other" are the elementwise class
        el = sum(ms for ms, _, cat, op in prof["ops"]
                 if cat == "other" and op.startswith("aten::") and is_elementwise(op[6:]))
        prof["ms"]["elementwise"], prof["ms"]["other"] = el, prof["ms"]["other"] - el
        # the ZeRO category also holds CUDA runtime calls (cudaStreamIsCapturing, event records: host time the
        # profiler weighted like kernels); only the kernels count
        runtime = sum(ms for ms, _, cat, op in prof["ops"] if PROFILE_CLASS.get(cat) == "hooks" and op.startswith("cuda"))
        prof["ms"]["hooks"] -= runtime
    return out


def hook_us(profile):
    """Per-launch time of the engine's ZeRO-3 gradient-hook kernels in the profile (us)."""
    hooks = [(ms, n) for ms, n, cat, op in profile["engine"]["ops"]
             if PROFILE_CLASS.get(cat) == "hooks" and op.startswith("aten::")]
    return 1e3 * sum(ms for ms, _ in hooks) / max(sum(n for _, n in hooks), 1)


def _cal(results, path):
    """The calibration run (summarise() of the as-profiled step) of a profiled path, if it ran: its own row's
    "cal", or another row's "cal_for" (a structure with no row of that path calibrates it elsewhere)."""
    own = next((r["cal"] for r in results.values() if r.get("path") == path and r.get("cal")), None)
    return own or next((r["cal_for"][path] for r in results.values() if path in r.get("cal_for", {})), None)


def at_floor(summary, c, floor_us):
    """The class's prediction at efficiency 1: roofline + floor per launch (ms)."""
    return summary[c]["roof"] + summary[c]["n"] * floor_us * 1e-3


def factors(results, profile, floor_us):
    """{class: [measured / predicted on each profiled path]} from the rows' calibration runs ("cal")."""
    out = {}
    for path, prof in profile.items():
        cal = _cal(results, path)
        if not cal:
            continue
        for c in FACTOR_CLASSES:
            if not cal[c]["n"]:  # the calibration run has no op of this class (e.g. --set model.attention=torch
                continue         # moves attention into GEMMs and elementwise ops): no factor from it
            out.setdefault(c, []).append(prof["ms"][c] / max(at_floor(cal, c, floor_us), 1e-9))
        pred = at_floor(cal, "elementwise", floor_us) + at_floor(cal, "other", floor_us)
        out.setdefault("elementwise", []).append((prof["ms"]["elementwise"] + prof["ms"]["other"]) / pred)
    if "elementwise" in out:
        out["other"] = out["elementwise"]
    return out


def estimate(row, fac, floor_us, per_hook_us):
    """(best {class: ms}, pessimistic {class: ms}) of one row; see the module docstring."""
    s = row["summary"]
    tri_worst = max(fac.get("attention", [1.0]))
    best, pess = {}, {}
    for c in ("gemm", "attention", "lora", "loss", "elementwise", "other"):
        f = fac.get(c) or [1.0]
        aten = s[c]["roof"] - s[c]["roof_triton"] + (s[c]["n"] - s[c]["n_triton"]) * floor_us * 1e-3
        tri = s[c]["roof_triton"] + s[c]["n_triton"] * floor_us * 1e-3
        t_pess = max(f) if c in ("attention", "loss") else max(max(f), tri_worst)  # measured Triton vs not
        best[c], pess[c] = aten * min(f) + tri * min(f), aten * max(f) + tri * t_pess
    n_opt = max(row.get("optimizer_launches", 0), s["optimizer"]["n"])  # counted with DeepSpeed, or the meta run's
    best["optimizer"] = s["optimizer"]["roof"] + n_opt * per_hook_us * 1e-3
    pess["optimizer"] = s["optimizer"]["roof"] + n_opt * floor_us * 1e-3
    best["hooks"] = row.get("hook_launches", 0) * per_hook_us * 1e-3
    pess["hooks"] = row.get("hook_launches", 0) * floor_us * 1e-3
    return best, pess


def fit_floor(results, profile):
    """Per-launch floor (us) that makes the engine's predicted elementwise + other match the profile exactly."""
    cal = _cal(results, "engine")
    if not cal or "engine" not in profile:
        return None
    roof = cal["elementwise"]["roof"] + cal["other"]["roof"]
    n = cal["elementwise"]["n"] + cal["other"]["n"]
    meas = profile["engine"]["ms"]["elementwise"] + profile["engine"]["ms"]["other"]
    return 1e3 * (meas - roof) / max(n, 1)


def calibration_lines(results, profile, floor_us, per_hook_us):
    """One line per profiled path: every class predicted at efficiency 1 against the measurement, with its error."""
    lines = []
    for path, prof in profile.items():
        cal = _cal(results, path)
        if not cal:
            continue
        parts = []
        for c in CLASSES:
            meas = prof["ms"][c]
            if c == "hooks":
                n = sum(k for _, k, cat, op in prof["ops"] if PROFILE_CLASS.get(cat) == "hooks" and
                        op.startswith("aten::"))
                pred = n * per_hook_us * 1e-3
                note = f" ({n} launches at {per_hook_us:.2f} us: fitted)" if n else " (not modelled: runtime calls)"
            else:
                pred = at_floor(cal, c, floor_us)
                note = ""
                if c == "optimizer":
                    note = " (meta foreach AdamW; DeepSpeed's per-tensor optimizer not in the meta run)"
                elif c in ("elementwise", "other"):
                    note = " (profile: listed ops only)" if c == "elementwise" else " (profile: the rest of 'other')"
            err = f"{100 * (pred / meas - 1):+.1f}%" if meas else "n/a"
            parts.append(f"{c} {pred:.1f} vs {meas:.1f} ms ({err}){note}")
        lines.append(f"calibration {path} (as profiled: ZeRO-3, full recompute, mask 0.2 BERT), predicted at the "
                     f"roofline + {floor_us:g} us/launch vs measured: " + "; ".join(parts))
    return lines


def finish(results, floor_us=HOST_FLOOR_US, profile=None):
    """Best and pessimistic predictions of every row (in place); returns the factors used."""
    profile = read_profile() if profile is None else profile
    fac = factors(results, profile, floor_us)
    per_hook = hook_us(profile)
    for r in results.values():
        if "summary" not in r:
            continue
        best, pess = estimate(r, fac, floor_us, per_hook)
        r["predicted_best"] = {k: round(v, 2) for k, v in best.items()}
        r["predicted_pess"] = {k: round(v, 2) for k, v in pess.items()}
        r["predicted_ms"] = {"best": round(sum(best.values()), 1), "pessimistic": round(sum(pess.values()), 1)}
        r["calibrated"] = bool(fac)
    return fac, per_hook

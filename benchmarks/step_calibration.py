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

The calibration runs are pinned to the profile's own step (profile_shape: 32 x 512 tokens in one micro-batch, 32
layers, mask 0.2 BERT, ZeRO-3, full recompute), whatever rows the command line asks to cost; their per-class launch
counts must match the ones the profile records (recorded_launches, launch_mismatches), or the run stops.

For a class c with roofline time R_c (no floor) and n_c launches, the prediction at efficiency f is
(R_c + n_c * floor) * f. f_c = measured / predicted(f=1) on each profiled path; a row's best figure uses the
smallest f_c of the profiled paths, its pessimistic figure the largest. elementwise and other share one factor (the
floor was fitted on their sum). Triton kernels the profile never ran (LoRA, RMSNorm, RoPE, GLU) take their class's
factor at best and at worst the measured Triton attention's (the only Triton kernel timed, well off its roofline:
triton_attention_factor). DeepSpeed is not run on meta tensors, so launches it adds are costed from the census: the
gradient hooks (hook_launches) and the optimizer step's launches at HOOK_US each at best (what each of the engine's
896 ZeRO-3 gradient-hook copies took in the profile) and at the per-launch floor at worst.

Two limits hold for every figure (estimate): no part of a class (its ATen ops, its Triton kernels) is faster than
the H200's spec peaks allow (summarise's roof_hw: FLOPs at 989.4 TFLOP/s, bytes at 4.8 TB/s; a factor below 1
applies to roofline + floor, and the floor is not hardware, so f * (R + n * floor) can fall below what the card can
do). The achievable roofline R (790 TFLOP/s, 4.0 TB/s) is no such limit: the profile's frozen GEMMs ran at 0.97x
their time at R. And a row of a path the profile measured, at the profile's tokens and layers, with no --set
override and at least its masking (the host masks the tokens; the loss reads no fewer rows), is never faster in a
class at best than the profile measured that class (elementwise and other together: the profile splits them by
what it listed, not by op).
"""
import csv
import os
import re

from benchmarks.harness import ROOT
from benchmarks.step_cost import CLASSES, HOST_FLOOR_US, HW_OVER_ROOF, is_elementwise

PROFILE = os.path.join(ROOT, "benchmarks", "results", "2026-11-26-h200", "train_step_profile.txt")
# What the profile's folder does not record, from bench_train_step.py at the profiled commit (d092a01, the commit
# column of the folder's bench_train_step.csv): the model is its GPU_MODEL, the Mistral-7B structure at 32 layers
# (docstring and l.99-100 there), masked with the BERT scheme (l.12, l.187: MNTPConfig(mask_prob=0.2,
# scheme="bert")), one micro-batch per optimizer step (l.11). The profile's own GEMM counts agree: 288 MLP GEMMs
# = 32 layers x 9 (3 forward, 3 recomputed, 3 input gradients), 384 projection GEMMs = 32 x 12.
PROFILE_LAYERS = 32
PROFILE_SCHEME = "bert"
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


def profile_shape(profile_path=PROFILE):
    """The step the profile measured: {"tokens": (B, S), "micro": B, "mask_prob": p, "scheme", "layers"}. Tokens and
    mask from the bench_train_step.csv beside the profile (its rows of pass "profile", shape "mntp BxS maskP"),
    layers and scheme from the constants above (the CSV does not record them)."""
    csv_path = os.path.join(os.path.dirname(profile_path), "bench_train_step.csv")
    shapes = set()
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("pass") == "profile" and row.get("shape", "").startswith("mntp "):
                shapes.add(row["shape"])
    m = [re.fullmatch(r"mntp (\d+)x(\d+) mask([0-9.]+)", x) for x in shapes]
    if len(shapes) != 1 or not m[0]:
        raise RuntimeError(f"{csv_path}: want one MNTP shape on the profile rows, found {sorted(shapes)}")
    B, S, p = int(m[0].group(1)), int(m[0].group(2)), float(m[0].group(3))
    return {"tokens": (B, S), "micro": B, "mask_prob": p, "scheme": PROFILE_SCHEME, "layers": PROFILE_LAYERS}


def recorded_launches(prof):
    """{class: launches} that a profile section records in full: a class whose categories' time is all in listed
    ops (the listing is the top 25 by time), each an ATen op (one op, one launch, as in the meta run; the Triton
    attention is listed by its autograd Functions, not its launches)."""
    out = {}
    for c in FACTOR_CLASSES:
        cats = {k for k, v in PROFILE_CLASS.items() if v == c}
        ops = [(ms, n, op) for ms, n, cat, op in prof["ops"] if cat in cats]
        listed = sum(ms for ms, _, _ in ops)
        if ops and all(op.startswith("aten::") for _, _, op in ops) and \
                abs(listed - prof["ms"][c]) <= 0.005 * (len(ops) + len(cats)):  # the listing's 2-decimal rounding
            out[c] = sum(n for _, n, _ in ops)
    return out


def launch_mismatches(cal, prof, layers=PROFILE_LAYERS):
    """[(class, calibration launches, profiled launches)] that differ by a launch a layer or more: the calibration
    run is then not the op stream the profile timed. Smaller differences are the profiler's attribution: its
    classifier puts every op run under a ZeRO scope in the ZeRO category (train_step_profile.classify), and the
    reference's section lists 1 projection GEMM and 3 LoRA GEMMs fewer than its step runs (671 and 1789 of 672 and
    1792, the engine's section lists all 672 and 1792)."""
    return [(c, cal[c]["n"], n) for c, n in recorded_launches(prof).items() if abs(cal[c]["n"] - n) >= layers]


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


def triton_attention_factor(results, profile, floor_us):
    """measured / predicted(f=1) of the attention of the profiled path whose attention ran in Triton kernels (the
    only Triton kernels the profile timed), or None."""
    out = []
    for path, prof in profile.items():
        cal = _cal(results, path)
        if cal and cal["attention"]["n"] and cal["attention"]["n_triton"] == cal["attention"]["n"]:
            out.append(prof["ms"]["attention"] / max(at_floor(cal, "attention", floor_us), 1e-9))
    return max(out) if out else None


def estimate(row, fac, floor_us, per_hook_us, tri_worst=None, measured=None):
    """(best {class: ms}, pessimistic {class: ms}) of one row; see the module docstring. tri_worst: the factor of
    unprofiled Triton kernels at worst (default: the largest attention factor); measured: {class: ms} the profile
    measured on this row's path at its shape (profiled_section), the floor of the best figure."""
    s = row["summary"]
    tri_worst = max(fac.get("attention", [1.0])) if tri_worst is None else tri_worst
    best, pess = {}, {}
    for c in ("gemm", "attention", "lora", "loss", "elementwise", "other"):
        f = fac.get(c) or [1.0]
        aten = s[c]["roof"] - s[c]["roof_triton"] + (s[c]["n"] - s[c]["n_triton"]) * floor_us * 1e-3
        tri = s[c]["roof_triton"] + s[c]["n_triton"] * floor_us * 1e-3
        # the spec-peak time of each part (a lower bound from roof for rows saved without it)
        hw_tri = s[c].get("roof_hw_triton", s[c]["roof_triton"] * HW_OVER_ROOF)
        hw_aten = s[c].get("roof_hw", s[c]["roof"] * HW_OVER_ROOF) - hw_tri
        t_pess = max(f) if c in ("attention", "loss") else max(max(f), tri_worst)  # measured Triton vs not
        # never faster than the hardware, whatever the factor (it scales roofline + floor)
        best[c] = max(hw_aten, aten * min(f)) + max(hw_tri, tri * min(f))
        pess[c] = max(hw_aten, aten * max(f)) + max(hw_tri, tri * t_pess)
    n_opt = max(row.get("optimizer_launches", 0), s["optimizer"]["n"])  # counted with DeepSpeed, or the meta run's
    best["optimizer"] = s["optimizer"]["roof"] + n_opt * per_hook_us * 1e-3
    pess["optimizer"] = s["optimizer"]["roof"] + n_opt * floor_us * 1e-3
    best["hooks"] = row.get("hook_launches", 0) * per_hook_us * 1e-3
    pess["hooks"] = row.get("hook_launches", 0) * floor_us * 1e-3
    if measured:  # the same path at the same shape was measured: no class faster than it ran
        for c in ("gemm", "attention", "lora", "loss", "optimizer", "hooks"):
            best[c] = max(best[c], measured.get(c, 0.0))
        el = measured.get("elementwise", 0.0) + measured.get("other", 0.0)
        got = best["elementwise"] + best["other"]
        if el > got > 0:  # one shared factor: both scaled up to the measured sum
            best["elementwise"], best["other"] = best["elementwise"] * el / got, best["other"] * el / got
        elif el > got:
            best["elementwise"] = el
    for c in best:
        pess[c] = max(pess[c], best[c])
    return best, pess


# a profile section (profiled_path's names) -> the proxy row of the same path: the profiled "engine" is the harness's
# ZeRO-3 engine (the proxy's engine-as-profiled, never a row); the trainer's own setup is the proxy's engine
ROW_OF_SECTION = {"reference": "reference", "reference-zero3": "reference-zero3", "engine-auto": "engine"}


def profiled_section(row, profile, shape):
    """The profile section measured on this row's path at the row's shape, or None: the path (ROW_OF_SECTION), the
    Mistral-7B structure, the profile's tokens and layers, no --set override, masking at least the profile's."""
    sec = next((k for k, v in ROW_OF_SECTION.items() if v == row.get("path")), None)
    if sec not in profile or "sets" not in row or "mask_prob" not in row:  # a row saved before they were recorded
        return None
    same = (row.get("arch", "mistral-7b") == "mistral-7b" and row.get("layers") == shape["layers"]
            and row.get("tokens") == "x".join(map(str, shape["tokens"])) and not row["sets"]
            and row["mask_prob"] >= shape["mask_prob"])
    return sec if same else None


def fit_floor(results, profile):
    """Per-launch floor (us) that makes the engine's predicted elementwise + other match the profile exactly."""
    cal = _cal(results, "engine")
    if not cal or "engine" not in profile:
        return None
    roof = cal["elementwise"]["roof"] + cal["other"]["roof"]
    n = cal["elementwise"]["n"] + cal["other"]["n"]
    meas = profile["engine"]["ms"]["elementwise"] + profile["engine"]["ms"]["other"]
    return 1e3 * (meas - roof) / max(n, 1)


def calibration_lines(results, profile, floor_us, per_hook_us, shape=None):
    """One line per profiled path: every class predicted at efficiency 1 against the measurement, with its error,
    its launches (and the profile's, where it records them) and the measured time over the roofline alone."""
    shape = profile_shape() if shape is None else shape
    lines = []
    for path, prof in profile.items():
        cal = _cal(results, path)
        if not cal:
            continue
        parts = []
        rec = recorded_launches(prof)
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
                note += f", {cal[c]['n']} launches" + (f" (profile {rec[c]})" if c in rec else "")
                if cal[c]["roof"] and c not in ("elementwise", "other"):
                    note += f", measured / roofline {meas / cal[c]['roof']:.2f}x"
            err = f"{100 * (pred / meas - 1):+.1f}%" if meas else "n/a"
            parts.append(f"{c} {pred:.1f} vs {meas:.1f} ms ({err}){note}")
        B, S = shape["tokens"]
        lines.append(f"calibration {path} (as profiled: {B} x {S}, {shape['layers']} layers, ZeRO-3, full recompute, "
                     f"mask {shape['mask_prob']:g} {shape['scheme'].upper()}), predicted at the roofline + "
                     f"{floor_us:g} us/launch vs measured: " + "; ".join(parts))
    return lines


def finish(results, floor_us=HOST_FLOOR_US, profile=None, shape=None):
    """Best and pessimistic predictions of every row (in place); returns (factors, per-hook us, Triton attention
    factor). shape: profile_shape() of the profile (default: the committed profile's)."""
    profile = read_profile() if profile is None else profile
    shape = profile_shape() if shape is None else shape
    fac = factors(results, profile, floor_us)
    per_hook = hook_us(profile)
    tri = triton_attention_factor(results, profile, floor_us)
    for r in results.values():
        if "summary" not in r:
            continue
        sec = profiled_section(r, profile, shape) if fac else None
        best, pess = estimate(r, fac, floor_us, per_hook, tri, profile[sec]["ms"] if sec else None)
        r["predicted_best"] = {k: round(v, 2) for k, v in best.items()}
        r["predicted_pess"] = {k: round(v, 2) for k, v in pess.items()}
        r["predicted_ms"] = {"best": round(sum(best.values()), 1), "pessimistic": round(sum(pess.values()), 1)}
        r["calibrated"] = bool(fac)
        r["floored_by_profile"] = sec
    return fac, per_hook, tri

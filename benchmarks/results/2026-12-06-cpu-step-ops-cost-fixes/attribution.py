"""What each fix moved: the default command's rows re-costed with the fixes switched on one after another (the
counted fields come from the new run's results.json; the meta costing and the estimate are redone)."""
import contextlib, copy, json, os, sys
os.environ.setdefault("TRITON_INTERPRET", "1")
import torch
torch.set_num_threads(1)
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves
from deepspeed.runtime.zero.linear import zero3_linear_wrap
from benchmarks import step_cost, step_calibration as sc
from benchmarks.step_census import TritonLaunches, gpu_like_ops
from benchmarks.step_paths import FULL

RES = json.load(open(sys.argv[1]))
new_op_bytes = step_cost.op_bytes
MODE = {"bytes": "new", "linear": "new"}

def op_bytes(func, args, kwargs, outs):
    ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    if MODE["bytes"] == "old":
        return step_cost._nbytes(ins) + step_cost._nbytes(outs)
    if MODE["bytes"] == "inplace":  # fix 1 without fix 6: every read at the view's size
        saved = step_cost._read_nbytes
        step_cost._read_nbytes = step_cost._nbytes
        try:
            return new_op_bytes(func, args, kwargs, outs)
        finally:
            step_cost._read_nbytes = saved
    return new_op_bytes(func, args, kwargs, outs)
step_cost.op_bytes = op_bytes

orig_luz = step_cost.linear_under_zero
FORCE = {"stage": None}
@contextlib.contextmanager
def luz(stage):
    with orig_luz(FORCE["stage"] if FORCE["stage"] != "asis" else stage):
        yield
step_cost.linear_under_zero = luz

launches = TritonLaunches()
cache = {}
def predict(name, tokens, cal=False, layers=32, cal_tokens=None):
    B, S = map(int, tokens.split("x"))
    # F.linear as the old workers left it: the engine worker never ran ZeRO-3 (its calibration plain), the
    # reference-zero3 worker costed its first row before its ZeRO-3 count (plain), the rest after (wrapped)
    if MODE["linear"] == "old":
        if name == "engine-as-profiled": FORCE["stage"] = None
        elif name == "reference-zero3" and not cal and tokens == "32x512": FORCE["stage"] = None
        else: FORCE["stage"] = "asis"
    else:
        FORCE["stage"] = "asis"
    key = (name, tokens, cal, layers, MODE["bytes"], FORCE["stage"])
    if key not in cache:
        mask = (0.2, "bert") if cal else (0.8, "all")
        sets = ["mntp.mask_prob=0.2", "mntp.scheme=bert"] if cal else []
        with launches.active(), gpu_like_ops(meta=True):
            cache[key] = step_cost.predict_path(name, sets, B, (B, S), mask, layers, launches, FULL)["summary"]
    return cache[key]

def old_estimate(row, fac, floor_us, per_hook_us, *a, **k):
    s = row["summary"]
    tri_worst = max(fac.get("attention", [1.0]))
    best, pess = {}, {}
    for c in ("gemm", "attention", "lora", "loss", "elementwise", "other"):
        f = fac.get(c) or [1.0]
        aten = s[c]["roof"] - s[c]["roof_triton"] + (s[c]["n"] - s[c]["n_triton"]) * floor_us * 1e-3
        tri = s[c]["roof_triton"] + s[c]["n_triton"] * floor_us * 1e-3
        t_pess = max(f) if c in ("attention", "loss") else max(max(f), tri_worst)
        best[c], pess[c] = aten * min(f) + tri * min(f), aten * max(f) + tri * t_pess
    n_opt = max(row.get("optimizer_launches", 0), s["optimizer"]["n"])
    best["optimizer"] = s["optimizer"]["roof"] + n_opt * per_hook_us * 1e-3
    pess["optimizer"] = s["optimizer"]["roof"] + n_opt * floor_us * 1e-3
    best["hooks"] = row.get("hook_launches", 0) * per_hook_us * 1e-3
    pess["hooks"] = row.get("hook_launches", 0) * floor_us * 1e-3
    return best, pess
new_estimate = sc.estimate

def variant(label, bytes_mode, linear_mode, estimate_new, cal_tokens="32x512", cal_layers=32):
    MODE["bytes"], MODE["linear"] = bytes_mode, linear_mode
    sc.estimate = new_estimate if estimate_new else old_estimate
    res = copy.deepcopy(RES)
    for k, r in res.items():
        r["summary"] = predict(r["path"], r["tokens"])
        r.pop("cal", None)
        if not estimate_new:
            r.pop("sets", None)  # the old finish had no measured floor
    res["engine 32x512"]["cal"] = predict("engine-as-profiled", cal_tokens, True, cal_layers)
    res["reference-zero3 32x512"]["cal"] = predict("reference-zero3", cal_tokens, True, cal_layers)
    fac = sc.factors(res, sc.read_profile(), step_cost.HOST_FLOOR_US)
    sc.finish(res)
    out = {k: r["predicted_ms"] for k, r in res.items()}
    print(f"== {label}")
    print("   factors: " + ", ".join(f"{c} {min(v):.2f}-{max(v):.2f}" for c, v in fac.items()))
    for t in ("32x512", "4x512"):
        e, ref, bf, z = (out[f"{p} {t}"] for p in ("engine", "reference", "reference-bf16", "reference-zero3"))
        print(f"   {t}: engine {e['best']:.1f}/{e['pessimistic']:.1f}, reference {ref['best']:.1f}/"
              f"{ref['pessimistic']:.1f}, reference-bf16 {bf['best']:.1f}/{bf['pessimistic']:.1f}, "
              f"reference-zero3 {z['best']:.1f}/{z['pessimistic']:.1f}; engine/reference "
              f"{e['best'] / ref['best']:.3f}/{e['pessimistic'] / ref['pessimistic']:.3f}, engine/bf16 best "
              f"{e['best'] / bf['best']:.3f}")
    sys.stdout.flush()
    return out

variant("A: the old code (HEAD)", "old", "old", False)
variant("B: + 1 in-place writes", "inplace", "old", False)
variant("C: + 3 ZeRO-3's F.linear on every ZeRO-3 meta run", "inplace", "new", False)
variant("D: + 4 spec-peak limit, measured floor, Triton-only pessimistic factor", "inplace", "new", True)
variant("E: + 6 reads at storage size (= the new code)", "new", "new", True)
print("== 2: what the old code's calibration shape did to other command lines (everything else new)")
variant("   --tokens 4x512,... (old: calibrated at 4 x 512)", "new", "new", True, cal_tokens="4x512")
variant("   --layers 8 (old: calibrated at 8 layers; rows here at 32)", "new", "new", True, cal_layers=8)

"""Benchmark non-causal attention: the Triton kernel vs torch SDPA's backends, SDPA with LLM2Vec's dense
additive padding mask, flash-attn (when installed) and the torch reference; on Gemma2's soft-capped scores,
against transformers' eager attention and compiled FlexAttention instead of SDPA.

    python -m benchmarks.bench_attention                          # GPU: model shapes, <= --budget-s (80 s)
    python -m benchmarks.bench_attention --tiny                   # CPU: tiny shapes (Triton via the interpreter)
    python -m benchmarks.bench_attention --sweep                  # GPU: time the Triton launch-config candidates

"triton-padded" (padded case only) passes the padded batch itself with seqlens=, so the kernels skip the padding
in place, with no unpad / repad copies. "triton-atomicdq" is the kernel with deterministic=False (dQ accumulated
by fp32 atomics in the dK/dV kernel, no separate dQ kernel); "triton-padded-atomicdq" combines the two.
"triton-autotune" is the same kernel with opt-in autotuning on (llm2vec_kernels.attention.set_autotune): its warm-up
calls time the pruned launch-config candidates per bucket, and the choices land in <out>_tuned.json.

Soft-capped cases ("-cap50": Gemma2's scores c tanh(s / c), c = 50) drop SDPA, which cannot soft-cap. They time
what a Gemma2 user would otherwise run: "eager" is transformers' eager attention (Gemma2's default there: K and V
repeated to every query head, scores in the input dtype, fp32 softmax cast back, a dense additive mask when
padded), and "flex" is torch's FlexAttention with the soft-cap as its score_mod and the padding as a block mask,
compiled on a GPU (forward only and uncompiled on CPU, where it has no backward; no dropout). Both run on the
soft-capped cases only; elsewhere SDPA is the stronger torch path.

Every row is one (shape, implementation, pass) with pass in fwd / bwd / fwd+bwd; TFLOP/s count useful work
only, as bench_train_step's model FLOPs do (attention at 3x its forward a step). Per sequence b of L_b real
tokens and per query head, the forward's products are S = Q K^T and O = P V, 2 L_b^2 D each: 4 * sum(L_b^2) * Hq
* D (attention_flops). The backward's useful products are dV = P^T dO, dP = dO V^T, dQ = dS K and dK = dS^T Q,
2 L_b^2 D each: 2x the forward (PASS_FACTOR). Recomputing S = Q K^T in the backward (0.5x the forward, what a
flash kernel does instead of storing P) is hardware work, not useful work, and is not counted; neither are the
products on padding, so implementations that compute on padding are charged for it. The padded-batch case ("pad32") draws 32 lengths uniformly from
[32, 512]: SDPA runs the padded (B, S) batch, the Triton kernel unpads to varlen and repads, and that
unpad/repad is inside its timing. An implementation that is not installed or rejects a shape is reported
on stdout and skipped.
"""
import argparse
import contextlib
import functools
import os
import sys
import time
import warnings

import torch

if not torch.cuda.is_available():  # the Triton kernel runs in the interpreter on CPU-only machines
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (ITERS, WARMUP, CsvWriter, check_outputs, cli_error, cli_names, measure,  # noqa: E402
                               parser, peak_memory_mb, plot, write_json)
from engine.cli import nonnegative_int, positive_float, positive_int, probability  # noqa: E402
from llm2vec_kernels import attention as A  # noqa: E402
from llm2vec_kernels.attention import configs as AC  # noqa: E402  (the launch configs the sweep swaps)

MODELS = {  # name -> (Hq, Hkv, D)
    "mistral7b": (32, 8, 128),   # Llama-3-8B has the same attention shape (32/8 heads, D=128)
    "smollm2": (9, 3, 64),
    "gemma2-9b": (16, 8, 256),   # scale 1/sqrt(256) (query_pre_attn_scalar = 256), attn_logit_softcapping = 50
}
# (label, model, batch, seq len or "pad" for the padded mix, passes or None for all, softcap or None);
# most important first.
GPU_CASES = [
    ("mistral7b-s512", "mistral7b", 16, 512, None, None),
    ("mistral7b-pad32", "mistral7b", 32, "pad", None, None),
    ("mistral7b-s2048", "mistral7b", 4, 2048, None, None),
    ("mistral7b-s128", "mistral7b", 64, 128, None, None),
    ("smollm2-s512", "smollm2", 16, 512, None, None),
    # Gemma2 after the shapes of earlier runs: compiling FlexAttention (forward and backward) takes a while, and
    # a run cut short by gpu_run.sh's timeout keeps the rows written before it (one flush per row)
    ("gemma2-9b-s512-cap50", "gemma2-9b", 16, 512, None, 50.0),
    ("mistral7b-s8192", "mistral7b", 1, 8192, ("fwd+bwd",), None),
    ("smollm2-s2048", "smollm2", 4, 2048, None, None),
    ("gemma2-9b-pad32-cap50", "gemma2-9b", 32, "pad", None, 50.0),
]
TINY_CASES = [("tiny-s24", (4, 2, 32), 2, 24, None, None), ("tiny-pad3", (4, 2, 32), 3, "pad", None, None),
              ("tiny-pad3-cap50", (4, 2, 32), 3, "pad", None, 50.0)]
PASSES = ("fwd", "bwd", "fwd+bwd")
SDPA_BACKENDS = ("flash", "cudnn", "efficient", "math")


def padded_lengths(batch, lo, hi, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi + 1, (batch,), generator=g).tolist()


# useful FLOPs of a pass, in forwards (module docstring): the backward's four products are twice the forward's two
PASS_FACTOR = {"fwd": 1.0, "bwd": 2.0, "fwd+bwd": 3.0}


def attention_flops(lens, hq, d):
    """Useful FLOPs of the forward over sequences of lengths ``lens``: Q K^T and P V, 2 L^2 D each per query head."""
    return 4.0 * sum(n * n for n in lens) * hq * d


class Case:
    def __init__(self, label, heads, batch, seq, device, dtype, softcap=None):
        self.label, self.device, self.dtype, self.softcap = label, device, dtype, softcap
        self.hq, self.hkv, self.d = heads
        if seq == "pad":
            lo, hi = (32, 512) if device == "cuda" else (4, 24)
            self.lens = padded_lengths(batch, lo, hi)
            self.S = max(self.lens)
        else:
            self.lens, self.S = [seq] * batch, seq
        self.B = batch
        self.padded = seq == "pad"
        # with a soft-cap, inputs scaled so the scores' spread is half the cap, where the cap changes the result
        # (tanh(1/2) is 8% under 1/2) and err= would show a kernel that ignored it; timing does not depend on it
        amp = (softcap / 2) ** 0.5 if softcap else 1.0
        mk = lambda h: (amp * torch.randn(self.B, self.S, h, self.d, device=device, dtype=dtype)).requires_grad_()
        self.q, self.k, self.v = mk(self.hq), mk(self.hkv), mk(self.hkv)  # (B, S, H, D), padded rows unused
        self.do = torch.randn_like(self.q)
        self.valid = torch.arange(self.S, device=device)[None, :] < torch.tensor(self.lens, device=device)[:, None]
        self.cu = torch.tensor([0] + torch.tensor(self.lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
        self.flops = attention_flops(self.lens, self.hq, self.d)

    @property
    def shape(self):
        s = f"B{self.B}xS{self.S}" + ("(pad)" if self.padded else "")
        return f"{self.label}:{s}xH{self.hq}/{self.hkv}xD{self.d}" + (f"xcap{self.softcap:g}" if self.softcap else "")


def _triton(case, dropout_p, deterministic=True):
    if not case.padded:
        return lambda q, k, v: A.flash_attention(q, k, v, dropout_p=dropout_p, seed=0, impl="triton",
                                                 deterministic=deterministic, softcap=case.softcap)
    idx = case.valid.flatten().nonzero().squeeze(1)

    def run(q, k, v):  # unpad -> varlen kernel -> repad, as the engine does for padded batches
        flat = [t.reshape(-1, t.shape[2], t.shape[3]).index_select(0, idx) for t in (q, k, v)]
        o = A.flash_attention(*flat, cu_seqlens=case.cu, max_seqlen=case.S, dropout_p=dropout_p, seed=0,
                              impl="triton", deterministic=deterministic, softcap=case.softcap)
        out = o.new_zeros(case.B * case.S, case.hq, case.d).index_copy(0, idx, o)
        return out.view(case.B, case.S, case.hq, case.d)
    return run


def _triton_autotuned(case, dropout_p):
    base = _triton(case, dropout_p)

    def run(q, k, v):  # the backward follows the forward's autotune setting
        A.set_autotune(True)
        try:
            return base(q, k, v)
        finally:
            A.set_autotune(False)
    return run


def _sdpa(backend, mask=None, dropout_p=0.0):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}

    def ctx():
        return sdpa_kernel(getattr(SDPBackend, names[backend])) if backend else contextlib.nullcontext()

    def run(q, k, v):
        qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D) views
        with ctx():
            o = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, dropout_p=dropout_p,
                                                                 enable_gqa=q.shape[2] != k.shape[2])
        return o.transpose(1, 2)
    return run


def _padding_mask(case):
    """The dense (B, 1, S, S) additive mask LLM2Vec's and transformers' paths build: 0 where the key is real,
    dtype-min elsewhere."""
    mask = torch.zeros(case.B, 1, case.S, case.S, device=case.device, dtype=case.dtype)
    return mask.masked_fill_(~case.valid[:, None, None, :], torch.finfo(case.dtype).min)


def _eager(case, dropout_p):
    """transformers' eager attention (Gemma2's default there): K and V repeated to every query head, scores in
    the input dtype, the soft-cap, a dense additive padding mask, fp32 softmax cast back, dropout, then P V."""
    rep = case.hq // case.hkv
    mask = _padding_mask(case) if case.padded else None

    def run(q, k, v):
        qh = q.transpose(1, 2)
        kh, vh = (t.transpose(1, 2).repeat_interleave(rep, dim=1) for t in (k, v))
        w = torch.matmul(qh, kh.transpose(2, 3)) * case.d ** -0.5
        if case.softcap:
            w = torch.tanh(w / case.softcap) * case.softcap
        if mask is not None:
            w = w + mask
        w = torch.nn.functional.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        w = torch.nn.functional.dropout(w, p=dropout_p, training=dropout_p > 0)
        return torch.matmul(w, vh).transpose(1, 2)
    return run


def _flex(case, dropout_p):
    """torch's FlexAttention: the soft-cap as score_mod, the padding as a block mask; compiled on a GPU (as
    transformers' flex_attention path does), uncompiled on CPU, where it runs forward only."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if dropout_p > 0:
        raise NotImplementedError("flex_attention has no attention dropout")
    fn = torch.compile(flex_attention, dynamic=False) if case.device == "cuda" else flex_attention
    cap = case.softcap
    score_mod = None if not cap else (lambda score, b, h, qi, ki: cap * torch.tanh(score / cap))
    block_mask = None
    if case.padded:
        lens = torch.tensor(case.lens, device=case.device)
        block_mask = create_block_mask(lambda b, h, qi, ki: ki < lens[b], case.B, None, case.S, case.S,
                                       device=case.device)

    def run(q, k, v):
        qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
        if case.device == "cpu" and not torch.is_grad_enabled():  # CPU flex refuses inputs that require grad
            qh, kh, vh = qh.detach(), kh.detach(), vh.detach()
        with warnings.catch_warnings():  # uncompiled on CPU on purpose: no "use torch.compile" warning per call
            warnings.simplefilter("ignore", UserWarning)
            o = fn(qh, kh, vh, score_mod=score_mod, block_mask=block_mask, enable_gqa=case.hq != case.hkv,
                   scale=case.d ** -0.5)
        return o.transpose(1, 2)
    return run


IMPL_NAMES = ("triton", "triton-padded", "triton-padded-atomicdq", "triton-autotune", "triton-atomicdq", "sdpa",
              "sdpa-padmask", "eager", "flex", "flash_attn", "torch")  # what --impls may name


def implementations(case, dropout_p, want):
    impls = {}
    if "triton" in want:
        impls["triton"] = _triton(case, dropout_p)
    if "triton-autotune" in want and case.device == "cuda":  # tunes in the warm-up calls; a no-op on CPU
        impls["triton-autotune"] = _triton_autotuned(case, dropout_p)
    if "triton-atomicdq" in want:  # deterministic=False: dQ by atomics inside the dK/dV kernel
        impls["triton-atomicdq"] = _triton(case, dropout_p, deterministic=False)
    if case.padded and ("triton-padded" in want or "triton-padded-atomicdq" in want):
        # the padded batch read in place (seqlens=): no unpad / repad; with or without the atomic-dQ backward
        lens = torch.tensor(case.lens, dtype=torch.int32, device=case.device)
        for name, det in (("triton-padded", True), ("triton-padded-atomicdq", False)):
            if name in want:
                impls[name] = functools.partial(A.flash_attention, seqlens=lens, dropout_p=dropout_p, seed=0,
                                                impl="triton", deterministic=det, softcap=case.softcap)
    if case.softcap and want & {"sdpa", "sdpa-padmask"}:
        print(f"sdpa: skipped on {case.shape}: SDPA cannot soft-cap the scores", flush=True)
    if "sdpa" in want and not case.padded and not case.softcap:
        # the math backend materialises the scores: never the best, and slow past S=512 on a GPU
        for b in SDPA_BACKENDS if case.device == "cuda" else ("math",):
            if b != "math" or case.device == "cpu" or case.S <= 512:
                impls[f"sdpa-{b}"] = _sdpa(b, dropout_p=dropout_p)
    if "sdpa-padmask" in want and (case.padded or case.S <= 512) and not case.softcap:
        # LLM2Vec's reference path: a dense (B, 1, S, S) additive mask, 0 where the key is real, -inf-ish else.
        impls["sdpa-padmask"] = _sdpa(None, mask=_padding_mask(case), dropout_p=dropout_p)
    if "eager" in want and case.softcap:
        impls["eager"] = _eager(case, dropout_p)
    if "flex" in want and case.softcap:
        try:
            impls["flex"] = _flex(case, dropout_p)
        except (ImportError, NotImplementedError) as exc:
            print(f"flex: skipped on {case.shape}: {exc}", flush=True)
    if "flash_attn" in want:
        try:
            import flash_attn
        except ImportError:
            print(f"flash_attn: not installed, skipped ({case.shape})", flush=True)
        else:
            cap = {"softcap": case.softcap} if case.softcap else {}  # flash-attn >= 2.6 soft-caps
            if case.padded:
                idx = case.valid.flatten().nonzero().squeeze(1)

                def fa_var(q, k, v):
                    flat = [t.reshape(-1, t.shape[2], t.shape[3]).index_select(0, idx) for t in (q, k, v)]
                    o = flash_attn.flash_attn_varlen_func(*flat, case.cu, case.cu, case.S, case.S, dropout_p=dropout_p,
                                                          **cap)
                    return o.new_zeros(case.B * case.S, case.hq, case.d).index_copy(0, idx, o).view_as(q)
                impls["flash_attn"] = fa_var
            else:
                impls["flash_attn"] = lambda q, k, v: flash_attn.flash_attn_func(q, k, v, dropout_p=dropout_p, **cap)
    if "torch" in want:
        if case.padded:
            impls["torch"] = lambda q, k, v: _repad_reference(case, q, k, v, dropout_p)
        else:
            impls["torch"] = lambda q, k, v: A.flash_attention_reference(q, k, v, dropout_p=dropout_p, seed=0,
                                                                         softcap=case.softcap)
    return impls


def _repad_reference(case, q, k, v, dropout_p):
    idx = case.valid.flatten().nonzero().squeeze(1)
    flat = [t.reshape(-1, t.shape[2], t.shape[3]).index_select(0, idx) for t in (q, k, v)]
    o = A.flash_attention_reference(*flat, cu_seqlens=case.cu, dropout_p=dropout_p, seed=0, softcap=case.softcap)
    return o.new_zeros(case.B * case.S, case.hq, case.d).index_copy(0, idx, o).view_as(q)


def _valid_rows_error(case, fn):
    """Max |fn - fp32 reference| / max |reference| over real (unpadded) rows."""
    with torch.no_grad():
        got = fn(case.q, case.k, case.v).float()[case.valid]
        want = _repad_reference(case, case.q.float(), case.k.float(), case.v.float(), 0.0)[case.valid]
    return ((got - want).abs().max() / want.abs().max()).item()


def bench_case(writer, case, dropout_p, want, passes, warmup, iters, deadline=None):
    ins = (case.q, case.k, case.v)
    for name, fn in implementations(case, dropout_p, want).items():
        if deadline is not None and time.time() > deadline:
            print(f"{name}: skipped on {case.shape}: --budget-s spent", flush=True)
            continue
        try:
            err = _valid_rows_error(case, fn) if dropout_p == 0 else float("nan")
            for pass_ in passes:
                if pass_ == "fwd":
                    step, flops = (lambda: fn(*ins)), case.flops
                    with torch.no_grad():
                        t, mem = measure(step, warmup, iters, case.device), peak_memory_mb(step, case.device)
                elif pass_ == "bwd":
                    out = fn(*ins)
                    step = lambda: torch.autograd.grad(out, ins, case.do, retain_graph=True)  # noqa: E731
                    flops = PASS_FACTOR["bwd"] * case.flops
                    t, mem = measure(step, warmup, iters, case.device), peak_memory_mb(step, case.device)
                    del out
                else:
                    step = lambda: torch.autograd.grad(fn(*ins), ins, case.do)  # noqa: E731
                    flops = PASS_FACTOR["fwd+bwd"] * case.flops
                    t, mem = measure(step, warmup, iters, case.device), peak_memory_mb(step, case.device)
                writer.add(case.shape, name, pass_, t.median, flops / t.median / 1e9, mem, dtype=str(case.dtype)[6:],
                           dropout=dropout_p, err=f"{err:.1e}", **t.extra())
        except (RuntimeError, NotImplementedError, ValueError, TypeError) as exc:  # rejects this shape or call
            print(f"{name}: skipped on {case.shape}: {str(exc).splitlines()[0][:160]}", flush=True)
        finally:
            if case.device == "cuda":
                torch.cuda.empty_cache()


SWEEP_FWD = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 8, 3)]
SWEEP_DKDV = [(32, 128, 8, 3), (32, 64, 8, 3), (32, 64, 4, 3), (64, 128, 8, 3), (32, 128, 8, 2)]
SWEEP_DQ = [(128, 32, 8, 3), (64, 32, 4, 3), (128, 64, 8, 3), (64, 64, 8, 3)]


def sweep(writer, case, dropout_p, warmup, iters):
    """Time the Triton forward / backward under each candidate launch config (others kept at default)."""
    base_fwd, base_bwd = AC.fwd_config, AC.bwd_config
    ins = (case.q, case.k, case.v)
    fn = _triton(case, dropout_p)
    dkdv0, dq0 = base_bwd(AC._block_d(case.d), case.dtype, dropout_p > 0, 90)
    try:
        for cfg in SWEEP_FWD:
            AC.fwd_config = lambda *a, _c=cfg, **kw: _c
            try:
                with torch.no_grad():
                    t = measure(lambda: fn(*ins), warmup, iters, case.device)
                writer.add(case.shape, "triton" + "x".join(map(str, cfg)), "fwd", t.median, case.flops / t.median / 1e9,
                           **t.extra())
            except Exception as exc:  # out of shared memory / registers for this config
                print(f"fwd {cfg}: {str(exc).splitlines()[0][:160]}", flush=True)
        AC.fwd_config = base_fwd
        out = fn(*ins)
        for cfg in [(c, dq0) for c in SWEEP_DKDV] + [(dkdv0, c) for c in SWEEP_DQ if c != dq0]:
            AC.bwd_config = lambda *a, _c=cfg, **kw: _c
            try:
                t = measure(lambda: torch.autograd.grad(out, ins, case.do, retain_graph=True), warmup, iters,
                            case.device)
                label = "triton-dkdv" + "x".join(map(str, cfg[0])) + "-dq" + "x".join(map(str, cfg[1]))
                writer.add(case.shape, label, "bwd", t.median, PASS_FACTOR["bwd"] * case.flops / t.median / 1e9,
                           **t.extra())
            except Exception as exc:
                print(f"bwd {cfg}: {str(exc).splitlines()[0][:160]}", flush=True)
    finally:
        AC.fwd_config, AC.bwd_config = base_fwd, base_bwd


def main(argv=None):
    p = parser(__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                 "bench_attention.csv"))
    p.add_argument("--plot", default=None, help="PNG path for a bar chart of the CSV (ms)")
    p.add_argument("--tiny", action="store_true", help="tiny CPU shapes; the Triton kernel via the interpreter")
    p.add_argument("--cases", nargs="+", default=None,
                   help="labels from GPU_CASES, or TINY_CASES on CPU (default: all)")
    p.add_argument("--impls", default=",".join(IMPL_NAMES))
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--dropout", type=probability, default=0.0, help="attention dropout probability, in [0, 1)")
    p.add_argument("--warmup", type=nonnegative_int, default=WARMUP, help="untimed calls before the timed ones (GPU)")
    p.add_argument("--iters", type=positive_int, default=ITERS, help="timed calls: the row's ms is their median (GPU)")
    p.add_argument("--torch-max-scores", type=float, default=2.5e8,
                   help="run the torch reference only when B*Hq*S*S is below this (it materialises the scores)")
    p.add_argument("--sweep", action="store_true", help="time the Triton kernel's candidate launch configs")
    p.add_argument("--budget-s", type=positive_float, default=80.0,
                   help="stop starting new cases / implementations after this many seconds (rows so far are kept)")
    args = p.parse_args(argv)
    check_outputs(args, "--out", "--plot")
    deadline = time.time() + args.budget_s

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    every = list(TINY_CASES) if device == "cpu" else [(label, MODELS[m], b, s, ps, cap)
                                                       for label, m, b, s, ps, cap in GPU_CASES]
    known = [c[0] for c in every]
    bad = [c for c in args.cases or () if c not in known]
    if bad:  # before any work: a wrong label would otherwise leave an empty CSV and exit 0
        cli_error(f"--cases: unknown {', '.join(bad)} ({device} cases: {', '.join(known)})")
    cases = [c for c in every if args.cases is None or c[0] in args.cases]
    want = set(cli_names(args.impls, IMPL_NAMES, "--impls"))  # before any work, as --cases
    if device == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            cli_error("CPU mode runs the Triton kernel in the interpreter: set TRITON_INTERPRET=1")
        dtype = torch.float32 if args.dtype == "bf16" else {"fp16": torch.float16, "fp32": torch.float32}[args.dtype]
        warmup, iters = 0, 1
    else:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
        warmup, iters = args.warmup, args.iters
    writer = CsvWriter(args.out, "attention-sweep" if args.sweep else "attention", device=device)
    try:
        for label, heads, batch, seq, passes, softcap in cases:
            if time.time() > deadline:
                print(f"{label}: skipped, --budget-s {args.budget_s:.0f}s spent", flush=True)
                continue
            case = Case(label, heads, batch, seq, device, dtype, softcap)
            if args.sweep:
                sweep(writer, case, args.dropout, warmup, iters)
                continue
            impls = set(want)
            if case.B * case.hq * case.S * case.S > args.torch_max_scores:
                impls.discard("torch")
            bench_case(writer, case, args.dropout, impls, passes or PASSES, warmup, iters, deadline)
            del case
    finally:
        writer._f.close()
    if A.tuned_configs():  # what opt-in autotuning chose per bucket, with every candidate's time
        write_json(os.path.splitext(args.out)[0] + "_tuned.json", A.tuned_configs())
    if args.plot:
        plot(args.out, args.plot, metric="ms", title="attention", run=writer.meta)  # this run's rows, not the CSV's
    return writer.rows


if __name__ == "__main__":
    main()

"""llm2vec_kernels.lora: fused frozen-base LoRA projections vs the fp64 per-projection reference, both impls."""
import pytest
import torch

from llm2vec_kernels._backend import dot_precision
from llm2vec_kernels.lora import draw_seed, lora_dropout_mask, lora_group, lora_group_reference

from .compile_variants import job_rows
from .helpers import assert_close_to_fp64


def _case(M, K, outs, ranks, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    ws = [(torch.randn(n, K, generator=g) / K ** 0.5).to(dtype) for n in outs]
    bs = [torch.randn(n, generator=g).to(dtype) for n in outs] if bias else None
    As = [(torch.randn(r, K, generator=g) / K ** 0.5).to(dtype) for r in ranks]
    Bs = [(torch.randn(n, r, generator=g) / r ** 0.5).to(dtype) for n, r in zip(outs, ranks)]
    gys = [torch.randn(M, n, generator=g).to(dtype) for n in outs]
    return x, ws, bs, As, Bs, gys


def _grads(fn, x, As, Bs, gys):
    x = x.clone().requires_grad_(True)
    As = [a.clone().requires_grad_(True) for a in As]
    Bs = [b.clone().requires_grad_(True) for b in Bs]
    outs = fn(x, As, Bs)
    torch.autograd.backward(outs, gys)
    return [o.detach() for o in outs], [x.grad, *[a.grad for a in As], *[b.grad for b in Bs]]


def _keep_for(impl, seed, M, K, p):
    torch.manual_seed(seed)
    if impl == "triton":
        return lora_dropout_mask(draw_seed(torch.device("cpu")), (M, K), p)
    return torch.empty(M, K, dtype=torch.bool).bernoulli_(1.0 - p)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("M,K,outs,ranks,dtype,bias,p", [
    (37, 45, (45, 19, 19), (8, 8, 8), torch.float32, False, 0.0),  # odd q/k/v group
    (37, 45, (45, 19, 19), (8, 4, 8), torch.float32, True, 0.1),  # ranks differ, bias (qwen2), dropout
    (29, 33, (70, 70), (16, 16), torch.float32, False, 0.3),  # gate/up group
    (21, 70, (33,), (16,), torch.float32, False, 0.05),  # single projection (down)
    (130, 128, (128, 32, 32), (16, 16, 16), torch.float16, False, 0.05),  # real-ish head shapes, half
    (67, 100, (100, 36, 36), (16, 8, 16), torch.float16, True, 0.1),  # half with a K tail (not a BLOCK_K multiple)
])
def test_lora_group_matches_fp64_reference(impl, M, K, outs, ranks, dtype, bias, p):
    x, ws, bs, As, Bs, gys = _case(M, K, outs, ranks, dtype, bias)
    s = 2.0
    keep = _keep_for(impl, 7, M, K, p) if p > 0 else None

    def fused(x_, As_, Bs_):
        torch.manual_seed(7)  # the op draws the same seed / mask as _keep_for
        return lora_group(x_, ws, As_, Bs_, s, p, biases=bs, impl=impl)

    def ref(x_, As_, Bs_):
        return lora_group_reference(x_, [w.double() for w in ws], As_, Bs_, s, p, keep,
                                    biases=None if bs is None else [b.double() for b in bs])

    def same_dtype(x_, As_, Bs_):  # torch's own error in this dtype: the reference's maths, the same mask
        return lora_group_reference(x_, ws, As_, Bs_, s, p, keep, biases=bs)

    out, grads = _grads(fused, x, As, Bs, gys)
    rout, rgrads = _grads(ref, x.double(), [a.double() for a in As], [b.double() for b in Bs],
                          [g.double() for g in gys])
    tout, tgrads = _grads(same_dtype, x, As, Bs, gys)
    if p > 0:  # the mask really drops about p of the input
        assert abs(1 - keep.float().mean().item() - p) < 0.05 + 3 * (p / keep.numel()) ** 0.5
    # twice torch's own error in this dtype + a few ulps (max and RMS; it was a fixed 2e-5 / 4e-3 of the largest
    # value, 90-170x torch's fp32 error)
    for i, (a, r, t) in enumerate(zip(out + grads, rout + rgrads, tout + tgrads)):
        assert a.dtype == dtype
        assert_close_to_fp64(a, r, t, dtype, f"output/grad {i}")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_lora_group_dropout_replays_under_checkpointing(impl):
    """Activation checkpointing recomputes the forward with the RNG state restored: same mask, same grads."""
    from torch.utils.checkpoint import checkpoint

    x, ws, _, As, Bs, gys = _case(33, 40, (40, 24, 24), (8, 8, 8), torch.float32, False, seed=3)

    def fused(x_, As_, Bs_):
        return lora_group(x_, ws, As_, Bs_, 2.0, 0.3, impl=impl)

    def run(ckpt):
        torch.manual_seed(11)
        f = (lambda a, b, c: checkpoint(lambda *t: fused(t[0], t[1:4], t[4:]), a, *b, *c, use_reentrant=False)) \
            if ckpt else fused
        return _grads(f, x, As, Bs, gys)

    (o1, g1), (o2, g2) = run(False), run(True)
    for a, b in zip(o1 + g1, o2 + g2):
        assert torch.equal(a, b)
    torch.manual_seed(12)  # another seed gives another mask
    o3, _ = _grads(fused, x, As, Bs, gys)
    assert not torch.equal(o1[0], o3[0])


def _aten_ops(fn):
    """Every aten op (nested calls included) that ``fn()`` runs on CPU, with input shapes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return [(e.name, e.input_shapes) for e in prof.events() if e.name.startswith("aten::")]


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("bias,p", [(False, 0.0), (True, 0.1)])
def test_lora_outputs_are_written_in_place_without_copies(impl, bias, p):
    """Each output is the base GEMM's result with the low-rank product added in place (``addmm_``): no copy of an
    (M, N_i) output per projection, forward or backward (an out-of-place addmm(low, x, W^T) copies ``low``)."""
    x, ws, bs, As, Bs, gys = _case(33, 40, (40, 24, 24), (8, 8, 8), torch.float32, bias, seed=5)
    x = x.requires_grad_(True)
    As = [a.requires_grad_(True) for a in As]
    Bs = [b.requires_grad_(True) for b in Bs]
    outs = []

    def forward():
        outs.extend(lora_group(x, ws, As, Bs, 2.0, p, biases=bs, impl=impl))

    fwd = _aten_ops(forward)
    bwd = _aten_ops(lambda: torch.autograd.backward(outs, gys))
    in_place = [shapes for name, shapes in fwd if name == "aten::addmm_"]
    assert len(in_place) == 3 and all(sh[0] == [33, n] for sh, n in zip(in_place, (40, 24, 24))), fwd
    # with a bias, the base GEMM is addmm(bias, x, W^T): its only self is the 1-D bias, never an (M, N) tensor
    assert all(len(shapes[0]) == 1 for name, shapes in fwd if name == "aten::addmm"), fwd
    assert sum(name == "aten::addmm" for name, _ in fwd) == (3 if bias else 0)
    # the copy census: no copy_ / clone of an (M, N) tensor anywhere in forward and backward. Only for the torch
    # impl without bias or dropout: on CPU addmm(bias, ...) broadcasts the bias by a copy into the output (CUDA
    # adds it in cuBLASLt's epilogue), the dropout path casts the bool mask, and the interpreter copies Triton's
    # results back into torch tensors.
    if impl == "torch" and not bias and p == 0:
        copies = [(name, shapes) for name, shapes in fwd + bwd if name in ("aten::copy_", "aten::clone")
                  and shapes and len(shapes[0]) == 2 and shapes[0][0] == 33]
        assert not copies, copies


def test_packed_dropout_mask_is_the_documented_philox_draw():
    """lora_dropout_mask (the kernels' keep function) against Philox-4x32-7 in plain Python: column k of row m is
    the 16-bit half (k % 2) of output word (k % 8) // 2 of the counter (k // 8, m, 0, 0), kept iff >= round(p 2^16).
    """
    def philox(seed, c, rounds=7):
        m32 = 0xFFFFFFFF
        c0, c1, c2, c3 = c
        k0, k1 = seed & m32, seed >> 32
        for _ in range(rounds):
            c0, c1, c2, c3 = (((0xCD9E8D57 * c2) >> 32) ^ c1 ^ k0, (0xCD9E8D57 * c2) & m32,
                              ((0xD2511F53 * c0) >> 32) ^ c3 ^ k1, (0xD2511F53 * c0) & m32)
            k0, k1 = (k0 + 0x9E3779B9) & m32, (k1 + 0xBB67AE85) & m32
        return c0, c1, c2, c3

    seed, M, K, p = 987654, 6, 45, 0.3
    got = lora_dropout_mask(torch.tensor([seed], dtype=torch.int32), (M, K), p)
    want = torch.tensor([[(philox(seed, (k // 8, m, 0, 0))[(k % 8) // 2] >> (16 * (k % 2)) & 0xFFFF)
                          >= round(p * 2 ** 16) for k in range(K)] for m in range(M)])
    assert torch.equal(got, want)


def test_lora_group_rejects_bad_input():
    x, ws, _, As, Bs, _ = _case(5, 8, (8,), (4,), torch.float32, False)
    with pytest.raises(ValueError, match="shapes do not line up"):
        lora_group(x, ws, [As[0][:, :4]], Bs, 1.0)
    with pytest.raises(ValueError, match="must be frozen"):
        lora_group(x, [ws[0].clone().requires_grad_(True)], As, Bs, 1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        lora_group(x, ws, As, Bs, 1.0, 1.0)
    with pytest.raises(ValueError, match="A on meta"):  # a kernel would read another device's pointer
        lora_group(x, ws, [As[0].to("meta")], Bs, 1.0)
    with pytest.raises(ValueError, match="not on x's device"):
        lora_group(x, ws, As, Bs, 1.0, biases=[torch.zeros(ws[0].shape[0], device="meta")])
    x, ws, bs, As, Bs, _ = _case(3, 8, [4], [2], torch.float32, True)
    with pytest.raises(ValueError, match="base biases must be frozen"):  # a trainable bias would never train
        lora_group(x, ws, As, Bs, 1.0, biases=[b.requires_grad_() for b in bs])


# ----------------------------------------------------------------------------------------------
# Compile checks (sm_90 / sm_80, no spills)
# ----------------------------------------------------------------------------------------------

def _variants():
    import llm2vec_kernels.lora as L

    out = []
    # both launch-config regimes (sum of ranks <= 64: 3 x 16; > 64: 3 x 32), with and without dropout, in bf16
    # (fp16 compiles to the same code), and the fp32 path with dropout
    cases = [(torch.bfloat16, "*bf16", n, d) for n in (48, 96) for d in (False, True)]
    cases.append((torch.float32, "*fp32", 48, True))
    for dt, ty, n, drop in cases:
        prec = dot_precision(dt)
        bm, bk, w, st = L.launch_config("down", n, dt, drop)
        out.append((L._lora_down_kernel, dict(
            x_ptr=ty, a_ptr=ty, h_ptr=ty, seed_ptr="*i32", M="i32", K="i32", N="i32", stride_xm="i32",
            stride_xk="i32", stride_an="i32", stride_ak="i32", stride_hm="i32", stride_hn="i32",
            drop_thresh="i32", scale="fp32"), dict(HAS_DROPOUT=drop, BLOCK_M=bm, BLOCK_N=L._block_n(n),
                                                 BLOCK_K=bk, PRECISION=prec), w, st, f"down {dt} N{n} d{drop}"))
        bm, bk, w, st = L.launch_config("grad_a", n, dt, drop)
        out.append((L._lora_grad_a_kernel, dict(
            x_ptr=ty, g_ptr=ty, part_ptr="*fp32", seed_ptr="*i32", M="i32", K="i32", N="i32",
            rows_per_split="i32", stride_xm="i32", stride_xk="i32", stride_gm="i32", stride_gn="i32",
            stride_ps="i32", stride_pn="i32", stride_pk="i32", drop_thresh="i32"),
            dict(HAS_DROPOUT=drop, BLOCK_M=bm, BLOCK_N=L._block_n(n), BLOCK_K=bk, PRECISION=prec), w, st,
            f"grad_a {dt} N{n} d{drop}"))
        bm, bk, w, st = L.launch_config("grad_x", n, dt, drop)
        out.append((L._lora_grad_x_kernel, dict(
            gx_ptr=ty, g_ptr=ty, a_ptr=ty, seed_ptr="*i32", M="i32", K="i32", N="i32", stride_gxm="i32",
            stride_gxk="i32", stride_gm="i32", stride_gn="i32", stride_an="i32", stride_ak="i32",
            drop_thresh="i32", scale="fp32"), dict(HAS_DROPOUT=drop, BLOCK_M=bm, BLOCK_N=L._block_n(n),
                                                 BLOCK_K=bk, PRECISION=prec), w, st,
            f"grad_x {dt} N{n} d{drop}"))
    return out


_NOT_DIVISIBLE = {"M", "N", "K", "rows_per_split", "drop_thresh"}
# contiguous operands: the runtime specialises these strides (== 1) into constants, so the report does too
_UNIT_STRIDES = {"stride_xk", "stride_ak", "stride_hn", "stride_gn", "stride_pk", "stride_gxk"}


def _compile_report(arch):
    import tests.triton_compile as tc

    rows = []
    for fn, sig, ce, warps, stages, tag in _variants():
        ce = {**ce, **{a: 1 for a in sig if a in _UNIT_STRIDES}}
        sig = {a: t for a, t in sig.items() if a not in _UNIT_STRIDES}
        divisible = [a for a in sig if a not in _NOT_DIVISIBLE and sig[a] != "fp32"]
        res = tc.compile_for_gpu(fn, sig, ce, arch=arch, num_warps=warps, num_stages=stages, divisible=divisible)
        rows.append(dict(kernel=tag, arch=arch, registers=res.registers, spills=res.spills, shared=res.shared_bytes))
    return rows


@pytest.mark.compile_check("lora")
def test_lora_kernels_compile_for_sm90_and_sm80_without_spills():
    # one process per architecture, in parallel
    rows = job_rows("lora")
    assert len(rows) == 2 * len(_variants())
    limit = {90: 227 * 1024, 80: 163 * 1024}
    for r in rows:
        print(f"{r['kernel']:40s} sm_{r['arch']} regs={r['registers']:3d} spills={r['spills']:4d} shared={r['shared']}")
        assert r["spills"] == 0 and r["registers"] <= 255 and r["shared"] <= limit[r["arch"]], r


@pytest.mark.gpu
def test_gpu_check():
    from llm2vec_kernels.gpu_check.lora import gpu_check

    rows = gpu_check()
    bad = [r for r in rows if not r["ok"]]
    assert rows and not bad, bad


def test_gpu_check_rehearsal_on_cpu():
    """The GPU self-check's logic, on tiny cases in the interpreter (fp16: bf16 dots are wrong there), the wide rank
    tile (summed rank over 64) among them. Every GPU case fits the Triton path's rank tile (a summed rank of 192
    made one raise on the GPU)."""
    from llm2vec_kernels.gpu_check.lora import GPU_CHECK_CASES, gpu_check
    from llm2vec_kernels.lora import MAX_BLOCK_N, _block_n

    assert all(_block_n(len(outs) * r) <= MAX_BLOCK_N for _, _, _, outs, r, _, _ in GPU_CHECK_CASES)
    assert any(_block_n(len(outs) * r) > 64 for _, _, _, outs, r, _, _ in GPU_CHECK_CASES)
    rows = gpu_check(device="cpu", cases=[("qkv", 37, 64, (64, 16, 16), 8, 0.1, True), ("down", 20, 96, (32,), 4, 0.0,
                                                                                       False),
                                          ("wide", 9, 32, (16, 8, 8), 24, 0.0, False)], dtype=torch.float16)
    assert [r["case"] for r in rows] == ["qkv", "down", "wide"]
    assert all(r["ok"] and 0 < r["max_err"] < 0.05 for r in rows), rows


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_an_empty_batch_has_empty_outputs_and_zero_gradients(impl):
    """M = 0 rows (an empty micro-batch slice): the backward's reshape(M, -1) raised on both paths."""
    from llm2vec_kernels.lora import lora_group

    g = torch.Generator().manual_seed(0)
    x = torch.zeros(0, 16, requires_grad=True)
    ws = [torch.randn(n, 16, generator=g) for n in (8, 4)]
    As = [torch.randn(2, 16, generator=g).requires_grad_() for _ in ws]
    Bs = [torch.randn(w.shape[0], 2, generator=g).requires_grad_() for w in ws]
    outs = lora_group(x, ws, As, Bs, scaling=2.0, impl=impl)
    assert [tuple(o.shape) for o in outs] == [(0, 8), (0, 4)]
    sum(o.sum() for o in outs).backward()
    assert x.grad.shape == (0, 16) and all((a.grad == 0).all() and (b.grad == 0).all() for a, b in zip(As, Bs))


@pytest.mark.compile_check("lora_sass")
def test_packed_dropout_compile_costs_at_most_10_sass_per_element():
    """LoRA's keep function (philox_keep8) costs <= 10 SASS instructions per element on sm_90, a quarter or less
    of one Philox call per element (philox_keep); the dropout kernels stay spill-free (tests.lora_dropout_sass)."""
    rows = job_rows("lora_sass")
    keep = next(r for r in rows if r["what"] == "keep function")
    print(rows)
    assert keep["per_element_philox_keep8"] <= 10
    assert keep["per_element_philox_keep8"] <= keep["per_element_philox_keep"] / 4
    for r in rows[1:]:
        assert r["spills"] == 0, r


def test_every_launch_enters_its_inputs_device(monkeypatch):
    """Forward (down) and backward (grad A, grad X) each launch on their input's device, not the current one."""
    from .helpers import record_launch_devices

    seen = record_launch_devices(monkeypatch)
    x, ws, bs, As, Bs, gys = _case(5, 16, [8, 4], [2, 2], torch.float32, False)
    out = lora_group(x.requires_grad_(True), ws, [a.requires_grad_(True) for a in As],
                     [b.requires_grad_(True) for b in Bs], 1.0, 0.0, impl="triton")
    n_fwd = len(seen)
    sum((o * g).sum() for o, g in zip(out, gys)).backward()
    assert n_fwd >= 1 and len(seen) >= n_fwd + 2 and all(t.shape[0] == 5 for t in seen)


def test_a_summed_rank_wider_than_one_tile_takes_the_torch_path(monkeypatch):
    """The kernels hold a group's summed rank in one tile of at most MAX_BLOCK_N columns: past it "auto" (here as on
    a CUDA tensor) computes on the torch path, and an explicit "triton" is refused in one line."""
    from llm2vec_kernels import _backend

    from .helpers import record_launch_devices

    x, ws, bs, As, Bs, gys = _case(3, 16, [8, 8, 8], [64, 64, 64], torch.float16, False)
    with pytest.raises(ValueError, match=r"summed rank \(192\) in one tile, at most 128"):
        lora_group(x, ws, As, Bs, 0.5, impl="triton")
    monkeypatch.setattr(_backend, "_on_cuda", lambda t: True)  # "auto" reads these CPU tensors as CUDA ones
    seen = record_launch_devices(monkeypatch)
    out = lora_group(x, ws, As, Bs, 0.5)
    assert seen == []  # no kernel launched
    for o, ref in zip(out, lora_group(x, ws, As, Bs, 0.5, impl="torch")):
        assert torch.equal(o, ref)  # the torch path itself
    x, ws, bs, As, Bs, gys = _case(3, 16, [8, 8, 8], [32, 32, 32], torch.float16, False)  # 96: one 128 tile
    lora_group(x, ws, As, Bs, 0.5)
    assert seen  # the kernels ran


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_backward_computes_only_the_gradients_autograd_asks_for(impl, p, monkeypatch):
    """needs_input_grad: the first layer's input (frozen embeddings) gets no grad x, so no product of x's shape
    runs in its backward; frozen A and B get no products of theirs. What is computed equals the full backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    M, K, outs, ranks = 11, 24, (40, 8), (4, 4)  # K differs from every N_i and sum r: x's shape is its own
    x, ws, bs, As, Bs, gys = _case(M, K, outs, ranks, torch.float32, False)

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # the shape of every product computed
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
                self.shapes.append(tuple(out.shape))
            return out

    def run(x_grad, lora_grad):
        x_ = x.clone().requires_grad_(x_grad)
        As_ = [a.clone().requires_grad_(lora_grad) for a in As]
        Bs_ = [b.clone().requires_grad_(lora_grad) for b in Bs]
        torch.manual_seed(3)
        y = lora_group(x_, ws, As_, Bs_, 2.0, p, impl=impl)
        with Shapes() as seen:
            torch.autograd.backward(y, gys)
        return [t.grad for t in (x_, *As_, *Bs_)], seen.shapes

    from llm2vec_kernels import lora as L

    kernels = []  # the Triton backward launchers called (impl="triton")
    for name in ("_grad_x_", "_grad_a"):
        monkeypatch.setattr(L, name, lambda *a, _f=getattr(L, name), _n=name: kernels.append(_n) or _f(*a))
    full, full_shapes = run(True, True)
    assert kernels == ([] if impl == "torch" else ["_grad_a", "_grad_x_"])
    del kernels[:]
    no_x, no_x_shapes = run(False, True)
    assert kernels == ([] if impl == "torch" else ["_grad_a"])
    del kernels[:]
    no_lora, no_lora_shapes = run(True, False)
    assert kernels == ([] if impl == "torch" else ["_grad_x_"])
    assert (M, K) in full_shapes and (M, K) not in no_x_shapes  # no grad x at all
    assert no_x[0] is None and all(torch.equal(a, b) for a, b in zip(no_x[1:], full[1:]))
    lora_shapes = {*((n, r) for n, r in zip(outs, ranks)), *([(sum(ranks), K)] if impl == "torch" else [])}
    assert lora_shapes <= set(full_shapes) and not lora_shapes & set(no_lora_shapes)
    assert all(g is None for g in no_lora[1:]) and torch.equal(no_lora[0], full[0])

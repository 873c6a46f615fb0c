"""Counting half of the CPU proxy (benchmarks/bench_step_ops.py): kernel launches, device->host syncs and ZeRO-3
hooks of one optimizer step, run on real tiny-width tensors.

A launch is an ATen op that is neither a view nor a bare allocation or reshape (NO_KERNEL) and that touches a
device tensor, or a Triton launch (intercepted by TritonLaunches: counted, not executed). gpu_like_ops makes the
CPU build dispatch what CUDA dispatches (one native_dropout; on meta tensors the fused SDPA a GPU picks).
"""
import collections
import contextlib

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakTensorKeyDictionary
from triton.runtime.interpreter import InterpretedFunction

from benchmarks.harness import wrapped_methods

try:
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    # DeepSpeed's per-parameter gradient hooks: the work each one launches is counted apart (hook_launches)
    GRAD_HOOKS = [(BF16_Optimizer, "_update_hp_grad"),
                  (DeepSpeedZeroOptimizer, "reduce_ready_partitions_and_remove_grads"),
                  (DeepSpeedZeroOptimizer_Stage3, "reduce_ready_partitions_and_remove_grads")]
except Exception:  # no DeepSpeed: no ZeRO-3 or gradient hooks to count
    PartitionedParameterCoordinator, GRAD_HOOKS = None, []


ATEN = torch.ops.aten
# ops that launch no kernel: allocations, reshapes of storage, lifts, detach / alias, and the scalar read (a sync)
NO_KERNEL = {ATEN.empty.memory_format, ATEN.empty_strided.default, ATEN.empty_like.default, ATEN.new_empty.default,
             ATEN.new_empty_strided.default, ATEN.resize_.default, ATEN.set_.source_Storage_storage_offset,
             ATEN.set_.source_Tensor, ATEN.set_.default, ATEN.lift_fresh.default, ATEN._local_scalar_dense.default,
             ATEN.detach.default, ATEN.alias.default, ATEN._unsafe_view.default}
# ops whose result the host waits for (device -> host)
SYNC_OPS = {ATEN._local_scalar_dense.default, ATEN.nonzero.default, ATEN.masked_select.default, ATEN._unique2.default,
            ATEN.unique_dim.default, ATEN.unique_consecutive.default}


class TritonLaunches:
    """Replace the interpreter's launcher: record (kernel module, name, args) and skip execution.

    A skipped kernel leaves its outputs as whatever the allocator handed out: often zeros, sometimes bits that
    read as inf or NaN. Values do not matter to a census, but control flow that reads them does: DeepSpeed's
    stage-0 bf16 optimizer checks every gradient for inf / NaN and skips the whole step (no norm, no AdamW, no
    copy-back) on the first bad one, so an unsanitised count was sometimes a skipped step, and its size varied
    between runs. Every floating tensor a skipped kernel was handed therefore gets its non-finite entries
    zeroed and is clamped to +-1e3 (finite inputs of a tiny model are far inside that, so they do not change),
    outside any dispatch mode so that this costs no counted launch.
    """

    def __init__(self):
        self.calls = []
        self.sink = None  # a CostMode that wants each launch's cost

    @contextlib.contextmanager
    def active(self):
        orig = InterpretedFunction.run
        rec = self

        def run(fn_self, *args, grid, warmup, **kwargs):
            if warmup:
                return None
            fn = getattr(fn_self, "fn", None)
            name, module = getattr(fn, "__name__", "?"), getattr(fn, "__module__", "?")
            rec.calls.append(name)
            if rec.sink is not None:
                rec.sink.triton(module, name, args)
            else:
                _sanitise(args)
            return None

        InterpretedFunction.run = run
        try:
            yield self
        finally:
            InterpretedFunction.run = orig


def _sanitise(args):
    with _disable_current_modes():
        for a in args:
            if isinstance(a, torch.Tensor) and a.is_floating_point() and not a.is_meta and a.numel():
                # .data: no autograd record and no version bump (these tensors may be saved for backward)
                a.data.nan_to_num_(0.0, 0.0, 0.0).clamp_(-1e3, 1e3)


@contextlib.contextmanager
def gpu_like_ops(meta=False):
    """Dispatch what CUDA dispatches: dropout as one aten::native_dropout (the CPU build decomposes it into
    bernoulli_ / div_ / mul); on meta tensors SDPA as the fused op a GPU picks (flash without a mask,
    memory-efficient with one) rather than the math decomposition."""
    orig_dropout, orig_sdpa = F.dropout, F.scaled_dot_product_attention

    def dropout(x, p=0.5, training=True, inplace=False):
        if not training or p == 0.0:
            return x
        return torch.ops.aten.native_dropout(x, p, True)[0]

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, **kw):
        if not q.is_meta:
            return orig_sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                             enable_gqa=enable_gqa, **kw)
        if k.shape[1] != q.shape[1] and not enable_gqa:  # with enable_gqa the fused kernels read K/V per group
            g = q.shape[1] // k.shape[1]
            k, v = (t.repeat_interleave(g, dim=1) for t in (k, v))
        if attn_mask is None:
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False,
                                                                      scale=scale)[0]
        # a view over the heads (stride 0), as SDPA hands it to the kernel: step_cost reads it at its storage, the
        # (B, 1, S, S) mask's bytes, not (B, H, S, S)'s
        bias = attn_mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, dropout_p, is_causal,
                                                                      scale=scale)[0]

    F.dropout = dropout
    torch.nn.modules.dropout.F.dropout = dropout
    if meta:
        F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.dropout = orig_dropout
        torch.nn.modules.dropout.F.dropout = orig_dropout
        F.scaled_dot_product_attention = orig_sdpa


def zero_hook_counter(counts):
    """Count DeepSpeed ZeRO-3's fetch_sub_module / release_sub_module calls into counts['zero_hooks']."""
    def counting(fn):
        def wrapper(*a, **kw):
            counts["zero_hooks"] += 1
            return fn(*a, **kw)
        return wrapper

    targets = [(PartitionedParameterCoordinator, n) for n in ("fetch_sub_module", "release_sub_module")] \
        if PartitionedParameterCoordinator else []
    return wrapped_methods(targets, counting)


class OpCensus(TorchDispatchMode):
    """Counts launches (per op name) and device->host syncs; see bench_step_ops' docstring for what counts.

    A tensor is host-side when a factory op made it with at most one element (the seed draws) or from Python
    data (lift_fresh), or when every tensor it was computed from is host-side: its ops launch nothing on a GPU.
    """

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.syncs = collections.Counter()
        self.count_syncs = False
        self.host = WeakTensorKeyDictionary()
        self.in_hook = 0  # > 0 inside a DeepSpeed gradient hook (grad_hook_scope)
        self.hook_ops = collections.Counter()  # the launches of those hooks, also in ops

    def is_host(self, t):
        return t in self.host

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        out = func(*args, **kwargs)
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if ins:
            host = all(self.is_host(t) for t in ins) or func is torch.ops.aten.lift_fresh.default
        else:  # factory op: seed draws are one-element CPU tensors
            host = all(t.numel() <= 1 for t in outs)
        if host:
            for t in outs:
                self.host[t] = True
            return out
        if func in SYNC_OPS and self.count_syncs:
            self.syncs[str(func.overloadpacket)] += 1
        if (func.namespace == "aten" and not func.is_view and func not in NO_KERNEL) or \
                func.namespace not in ("aten", "prim"):  # the latter: c10d collectives (ZeRO gathers / reductions)
            self.ops[str(func.overloadpacket)] += 1
            if self.in_hook:
                self.hook_ops[str(func.overloadpacket)] += 1
        return out

    def tolist(self, t):
        """Tensor.tolist while patched_tolist is on: a read of a device tensor is a sync."""
        if self.count_syncs and not self.is_host(t):
            self.syncs["tolist"] += 1
        return _TOLIST(t)


_TOLIST = torch.Tensor.tolist


@contextlib.contextmanager
def patched_tolist(mode):
    """.tolist() does not dispatch: route it through mode.tolist so that device reads count as syncs."""
    def tolist(t):
        return mode.tolist(t)

    torch.Tensor.tolist = tolist
    try:
        yield
    finally:
        torch.Tensor.tolist = _TOLIST


def grad_hook_scope(mode):
    """Mark DeepSpeed's per-parameter gradient hooks (GRAD_HOOKS) so that mode counts their launches apart."""
    def marking(fn):
        def wrapper(*a, **kw):
            mode.in_hook += 1
            try:
                return fn(*a, **kw)
            finally:
                mode.in_hook -= 1
        return wrapper

    return wrapped_methods(GRAD_HOOKS, marking)


def count_step(path, batch, launches):
    """Launch census, syncs and ZeRO hooks of one optimizer step; hook_launches: the launches of DeepSpeed's
    gradient hooks during forward + backward (part of launches)."""
    mode = OpCensus()
    counts = {"zero_hooks": 0}
    n0, skipped0 = len(launches.calls), path.skipped_steps()
    for state in path.opt.state.values():  # AdamW's step counters live on the host on a GPU too (not capturable)
        if isinstance(state.get("step"), torch.Tensor):
            mode.host[state["step"]] = True
    with zero_hook_counter(counts), grad_hook_scope(mode), patched_tolist(mode), mode:
        mode.count_syncs = True
        path.forward_backward(batch)
        fb_ops, fb_syncs, fb_triton = collections.Counter(mode.ops), collections.Counter(mode.syncs), \
            len(launches.calls)
        fb_hooks = collections.Counter(mode.hook_ops)
        path.optimizer_step()
    census = mode.ops + collections.Counter(f"triton:{k}" for k in launches.calls[n0:])
    opt_census = mode.ops - fb_ops  # the optimizer step launches no Triton kernel
    return {"launches": sum(census.values()), "syncs": sum(fb_syncs.values()), "zero_hooks": counts["zero_hooks"],
            "census": dict(census.most_common()), "sync_ops": dict(fb_syncs),
            "optimizer_launches": sum(opt_census.values()) + len(launches.calls) - fb_triton,
            "optimizer_syncs": sum((mode.syncs - fb_syncs).values()),
            "optimizer_census": dict(opt_census.most_common()),
            "hook_launches": sum(fb_hooks.values()), "hook_census": dict(fb_hooks.most_common()),
            "skipped_steps": path.skipped_steps() - skipped0}

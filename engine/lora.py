"""Swap PEFT's LoRA linear layers for fused, group-wise ones (``llm2vec_kernels.lora.lora_group``), in place.

How q/k/v (and gate/up) get fused without copying any architecture's attention or MLP forward:
the modeling code still calls ``q_proj(x)``, ``k_proj(x)``, ``v_proj(x)`` one after the other with the
*same* tensor ``x``. The projections of one parent module that share an input form a group, and each
member's class is swapped for a subclass of PEFT's ``lora.Linear`` whose forward asks the group first:

* the first member called computes every member's output in one ``lora_group`` call (one read of ``x``
  for the low-rank path, one dropout mask, scaling folded; each output written by its base GEMM, the
  low-rank product then added in place with ``addmm_``: see llm2vec_kernels/lora.py) and parks its siblings'
  outputs in the group, keyed by the identity of ``x``;
* a sibling called next with that same ``x`` takes its parked output; anything else (another input,
  a member called twice) computes afresh, so a model that calls them differently stays correct.

Activation checkpointing re-runs the parent's forward, so the same call sequence happens again.
Members that share no input (o_proj, down_proj) are groups of one: still one fused op each, as is a projection a
family already computes in one Linear (Phi3's qkv_proj and gate_up_proj, which the default targets name through
``engine.modeling.lora_targets``): its input is read once, by that one call.

Parameters, names and shapes are untouched (only ``__class__`` changes), so the saved adapter is a
plain PEFT adapter and ``PeftModel.from_pretrained`` loads it.

Dropout semantics differ from PEFT's: PEFT drops the q, k and v inputs with three independent
masks, the fused group uses one mask for all members of the group (as LoRA's dropout-on-the-shared
input would read). With dropout off both give the same outputs and gradients (tests/test_lora_engine.py).
On the Triton path the keep probability is quantised to 2**-16 (llm2vec_kernels._backend.philox_keep8).

Falls back to PEFT's own forward, per call, when the fused op does not apply: adapters disabled or
merged, several active adapters, a LoRA variant (DoRA), a trainable base weight, or parameters
partitioned by ZeRO-3 (their storage exists only while DeepSpeed gathers them for their own module).
"""
import torch

from llm2vec_kernels.lora import MAX_BLOCK_N, fits_one_tile, lora_group

from .config import ConfigError

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _Group:
    def __init__(self, members, impl):
        self.members, self.impl = members, impl
        self._x, self._parked = None, {}

    def take(self, mod, x):
        if self._x is x and id(mod) in self._parked:
            out = self._parked.pop(id(mod))
            if not self._parked:
                self._x = None
            return out
        return None

    def run(self, mod, x):
        self._x, self._parked = None, {}
        members = self.members if all(_usable(m) for m in self.members) and _same_setup(self.members) else [mod]
        adapter = mod.active_adapters[0]
        drop = mod.lora_dropout[adapter]
        p = float(drop.p) if isinstance(drop, torch.nn.Dropout) and drop.training else 0.0
        base = [m.base_layer for m in members]
        outs = lora_group(
            x, [b.weight for b in base], [m.lora_A[adapter].weight for m in members],
            [m.lora_B[adapter].weight for m in members], mod.scaling[adapter], p,
            biases=[b.bias for b in base] if any(b.bias is not None for b in base) else None, impl=self.impl)
        if len(members) > 1:
            self._x = x
            self._parked = {id(m): o for m, o in zip(members, outs) if m is not mod}
        return outs[members.index(mod)]


def _usable(m):
    if m.disable_adapters or m.merged or len(m.active_adapters) != 1:
        return False
    a = m.active_adapters[0]
    if a not in m.lora_A or a in getattr(m, "lora_variant", {}) or getattr(m, "fan_in_fan_out", False):
        return False
    if getattr(m.lora_B[a], "bias", None) is not None:  # PEFT's lora_bias: a term the fused op does not add
        return False
    base = m.base_layer
    if type(base) is not torch.nn.Linear or base.weight.requires_grad:
        return False
    params = [base.weight, m.lora_A[a].weight, m.lora_B[a].weight] + ([base.bias] if base.bias is not None else [])
    return not any(hasattr(p, "ds_id") for p in params)  # ZeRO-3 partitioned: let PEFT's forward run the hooks


def _same_setup(members):
    keys = set()
    for m in members:
        a = m.active_adapters[0]
        keys.add((a, m.base_layer.in_features, float(m.scaling[a]), float(getattr(m.lora_dropout[a], "p", 0.0)),
                  m.lora_dropout[a].training))
    return len(keys) == 1


class FusedLoraLinear:
    """Mixin placed in front of PEFT's ``lora.Linear`` (see ``fuse_lora``)."""

    def forward(self, x, *args, **kwargs):
        group = self._llm2vec_group
        if args or kwargs or not _usable(self):
            return super().forward(x, *args, **kwargs)
        out = group.take(self, x)
        return out if out is not None else group.run(self, x)


_CLASSES = {}


def _fused_class(cls):
    if cls not in _CLASSES:
        _CLASSES[cls] = type("Fused" + cls.__name__, (FusedLoraLinear, cls), {})
    return _CLASSES[cls]


def _check_triton_rank(where, names, members):
    """``fused_ops=triton`` holds a group's summed rank in one tile: a wider group is a config error now, before
    the weights load (``engine.train.check_targets_offline`` fuses on the meta model) or the engine starts,
    rather than at the first forward. ``auto`` takes the torch path for such a group instead."""
    ranks = sum(m.lora_A[m.active_adapters[0]].out_features for m in members)
    if not fits_one_tile(ranks):
        raise ConfigError(f"model.fused_ops=triton holds a LoRA group's summed rank in one tile of at most "
                          f"{MAX_BLOCK_N}: {'+'.join(names)} of {where} ({len(members)} x lora.r) "
                          f"sums to {ranks}; use model.fused_ops=auto (the torch path for that group; under ZeRO-3 "
                          f"PEFT's own forward runs anyway) or a lora.r of at most {MAX_BLOCK_N // len(members)}")


def set_fused_impl(model, impl):
    """Set the ``impl`` of every group :func:`fuse_lora` made in ``model`` (the groups it chose stay). The dry run
    fuses as the run does (``model.fused_ops=triton`` checks the kernels' rank limit), then runs its meta forward
    with "auto", which takes the torch path on meta tensors: same shapes, nothing launched."""
    for m in model.modules():
        group = getattr(m, "_llm2vec_group", None)
        if group is not None:
            group.impl = impl


def fuse_lora(model, impl="auto"):
    """Group and swap every PEFT ``lora.Linear`` of ``model`` in place; returns {"groups": n, "layers": n}."""
    from peft.tuners.lora import Linear as LoraLinear

    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"model.fused_ops must be auto, triton or torch, got {impl!r}")
    n_groups = n_layers = 0
    for parent_name, parent in list(model.named_modules()):
        taken = set()
        children = dict(parent.named_children())
        for names in GROUPS + tuple((n,) for n in children):
            members = [children[n] for n in names if n in children and isinstance(children[n], LoraLinear)
                       and n not in taken]
            if not members or (len(names) > 1 and len(members) != len(names)):
                continue
            if len(members) > 1 and not _same_setup(members):
                continue  # different scaling / dropout / input: each one becomes its own group below
            if impl == "triton":
                _check_triton_rank(parent_name.removeprefix("base_model.model."), names, members)
            group = _Group(members, impl)
            for n in names:
                taken.add(n)
            for m in members:
                if not isinstance(m, FusedLoraLinear):
                    m.__class__ = _fused_class(type(m))
                m._llm2vec_group = group
                n_layers += 1
            n_groups += 1
    return {"groups": n_groups, "layers": n_layers}

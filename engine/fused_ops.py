"""Put the fused elementwise kernels (llm2vec_kernels.rms_norm / rope / glu) into a loaded HF decoder.

One switch, ``model.fused_ops`` (auto | triton | torch), resolved per call like ``model.attention``
(``llm2vec_kernels.set_default_impl("fused_ops", ...)``; auto = Triton on CUDA tensors, torch elsewhere).
``apply_fused_ops(model, impl)`` patches by family, from the ``fused_ops`` entry of
``engine.bidirectional.SUPPORTED_ARCHITECTURES``:

* RMSNorm modules (each decoder layer's norms listed in the table, Qwen3's q/k norms, Gemma2's pre/post
  feed-forward norms, and the final norm): their instance ``forward`` is replaced by one that calls
  ``llm2vec_kernels.rms_norm`` (Llama or Gemma form). The module, its weight and its hooks stay as they are, so
  PEFT, DeepSpeed ZeRO-3 (which gathers the weight in the module's pre-forward hook) and gradient
  checkpointing see no difference.
* Gated MLPs: the instance ``forward`` becomes ``down_proj(glu(gate_proj(x), up_proj(x)))``, or for an MLP
  with one ``gate_up_proj`` (Phi3: x [W_gate; W_up]^T = [gate | up], halves of its last dim)
  ``down_proj(glu(*gate_up_proj(x).chunk(2, -1)))``. The projections are looked up at call time, so LoRA layers
  added later by PEFT are used.
* RoPE: transformers 5 has no per-module hook for it. Each attention module calls the function
  ``apply_rotary_pos_emb`` of its modeling module (``modeling_llama`` ...), looked up as a module global
  at call time; that global is the smallest public-enough seam, so it is replaced there by a wrapper. The
  wrapper is process-wide for that family (like the attention interface registration); it calls the
  original function whenever the fused ops resolve to torch or the call is not the standard form, which
  includes a partial rotary embedding (``partial_rotary_factor`` < 1: cos and sin narrower than a head, the
  rest of the head passed through), as Phi-4-mini's; the kernel rotates whole heads. The original function
  stays picklable under another route (``_OriginalRope``), and so do the patched modules (their forwards are
  partials of this module's functions): a patched model can be sent to worker processes.

Whenever the ops resolve to "torch" (impl="torch", or "auto" on CPU) the patched forwards call the
modules' original forwards, so that path is exactly transformers' code. impl="torch" patches nothing.

Residual add + RMSNorm is not fused, by design. A fused ``h = r + x; y = norm(h)`` kernel (one read of r and x,
one write of h and y, instead of an add pass and a norm pass) needs both operands of the add at the norm. In
HF's decoder layers (transformers 5: ``LlamaDecoderLayer.forward`` and its Mistral / Qwen2 / Qwen3 / Gemma
copies) the add is a bare tensor expression in the layer's own forward, ``hidden_states = residual +
hidden_states`` between ``self.self_attn(...)`` / ``self.mlp(...)`` and the next norm call, and the norm
module is called with the sum alone. No module, hook or module global sits between the two: a forward hook
on the norm sees only the sum (the add has already run), and a hook on the attention / MLP output cannot
take the add over (the layer adds the residual again). Gemma2 puts a post-norm of the attention output
between them (``residual + post_attention_layernorm(attn)``), which changes the pattern again. The only seam
is the decoder layer's ``forward`` itself, i.e. a copy of HF's forward per family, which this module does
not do (a transformers release that changes the layer would silently diverge from our copy). So the adds
stay in transformers' code; the norms and the gated MLPs above are what is fused.
"""
import functools
import importlib
import sys
import types

import torch

import llm2vec_kernels
from llm2vec_kernels._backend import resolve_impl

from .bidirectional import SUPPORTED_ARCHITECTURES

# HF activation names -> llm2vec_kernels.glu activations
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
_TAG = "_llm2vec_fused"
_RMS_MAX_H = importlib.import_module("llm2vec_kernels.rms_norm").MAX_H


def _use_triton(x):
    return resolve_impl("fused_ops", None, x) == "triton"


def _norm_forward(self, hidden_states):
    if not _use_triton(hidden_states):
        return self._llm2vec_orig_forward(hidden_states)
    return llm2vec_kernels.rms_norm(hidden_states, self.weight, self._llm2vec_eps, gemma=self._llm2vec_gemma, impl="triton")


def _mlp_forward(self, x):
    if not _use_triton(x):
        return self._llm2vec_orig_forward(x)
    return self.down_proj(llm2vec_kernels.glu(self.gate_proj(x), self.up_proj(x), self._llm2vec_act, impl="triton"))


def _gate_up_mlp_forward(self, x):
    if not _use_triton(x):
        return self._llm2vec_orig_forward(x)
    gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [gate | up], as the family's own forward splits it
    return self.down_proj(llm2vec_kernels.glu(gate, up, self._llm2vec_act, impl="triton"))


def _patch_forward(module, fn, kind, **attrs):
    if getattr(module, _TAG, None) is not None:
        return False
    for k, v in attrs.items():
        setattr(module, k, v)
    module._llm2vec_orig_forward = module.forward
    # partial(fn, module), not a bound method: a bound method pickles as getattr(module, "_norm_forward"), which
    # the module does not have, so a patched model could not be sent to a worker process (engine.multi_device)
    module.forward = functools.partial(fn, module)
    setattr(module, _TAG, kind)
    return True


def _patch_norm(module, form, skipped):
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    weight = getattr(module, "weight", None)
    if eps is None or not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        raise TypeError(f"fused_ops: {type(module).__name__} does not look like an RMSNorm (weight + eps)")
    if weight.numel() > _RMS_MAX_H:
        skipped.add(f"RMSNorm wider than {_RMS_MAX_H}")
        return False
    return _patch_forward(module, _norm_forward, "rms_norm", _llm2vec_eps=float(eps), _llm2vec_gemma=form == "gemma")


class _OriginalRope:
    """pickle's route to transformers' own ``apply_rotary_pos_emb`` of a modeling module, in whichever process
    loads: ``getattr(_ORIGINAL_ROPE, "transformers:models:llama:modeling_llama")`` (the module path, ":" for ".")
    is that module's function, or what _patch_rope's wrapper wraps where the wrapper holds its name.

    pickle sends a function as (module, qualified name) and checks that the name still leads to it. Once the
    wrapper held transformers' name, the original failed that check, and so did every object that keeps it:
    transformers 5.2 (``use_kernelized_func``) sets it as each attention module's ``rotary_fn``, so after one model
    of a family was fused no model of that family, fused or not, could be sent to a multi-device encode's workers.
    _patch_rope names the original by this route instead; a fresh worker resolves it to its own unpatched function."""

    def __getattr__(self, key):
        if key.startswith("__"):
            raise AttributeError(key)
        fn = importlib.import_module(key.replace(":", ".")).apply_rotary_pos_emb
        return fn.__wrapped__ if getattr(fn, _TAG, None) is not None else fn


_ORIGINAL_ROPE = _OriginalRope()


def _patch_rope(modeling_module):
    mod = sys.modules[modeling_module]
    orig = getattr(mod, "apply_rotary_pos_emb", None)
    if orig is None:
        raise TypeError(f"fused_ops: {modeling_module} has no apply_rotary_pos_emb")
    if getattr(orig, _TAG, None) is not None:
        return False

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        standard = (not args or args == (1,)) and kwargs.get("unsqueeze_dim", 1) == 1 and len(kwargs) <= 1
        whole = cos.shape[-1] == q.shape[-1]  # a partial rotary embedding's cos covers the first dims only
        if standard and whole and q.dim() == 4 and cos.dim() == 3 and cos.dtype == q.dtype and _use_triton(q):
            return llm2vec_kernels.rope(q, k, cos, sin, impl="triton")
        return orig(q, k, cos, sin, *args, **kwargs)

    setattr(apply_rotary_pos_emb, _TAG, "rope")
    apply_rotary_pos_emb.__wrapped__ = orig
    mod.apply_rotary_pos_emb = apply_rotary_pos_emb
    if isinstance(orig, types.FunctionType):  # (the kernels package's module-like wrapper pickles by its own rule)
        orig.__module__, orig.__qualname__ = __name__, "_ORIGINAL_ROPE." + modeling_module.replace(".", ":")
    return True


def _unwrap(model):
    base = model
    while hasattr(base, "get_base_model") and base is not base.get_base_model():
        base = base.get_base_model()
    return base


def _get(module, dotted):
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def fused_ops_spec(config):
    """The table entry for this model's family, or None when the family has no fused ops."""
    return SUPPORTED_ARCHITECTURES.get(getattr(config, "model_type", None), {}).get("fused_ops")


def glu_activation(config):
    """The ``llm2vec_kernels.glu`` activation that computes this model's gated MLP as transformers does, or None
    where none does: the MLP then keeps transformers' forward on every path. transformers builds the MLP's act_fn
    from the config attribute the family's ``act_key`` names (Gemma: ``hidden_act``, Gemma2: ``hidden_activation``),
    and only silu and tanh-approximated GELU have a kernel. Exact GELU, a(g) = g Phi(g) = 0.5 g (1 + erf(g / sqrt 2)),
    has none: transformers 5.2 and 5.17 run Gemma-1's released ``hidden_act="gelu"`` as that (5.25's GemmaConfig
    maps it to ``gelu_pytorch_tanh``). apply_fused_ops and the memory plan (engine.memory.layer_shape) both ask this,
    so the plan costs the MLP that runs."""
    spec = fused_ops_spec(config)
    return None if spec is None else _ACTIVATIONS.get(getattr(config, spec["act_key"], None))


def apply_fused_ops(model, impl="auto"):
    """Patch a loaded model (or a PEFT wrapper of one) in place; returns counts of what was patched.

    Sets the process default for "fused_ops" to ``impl``. Idempotent: patched modules are skipped.
    """
    llm2vec_kernels.set_default_impl("fused_ops", impl)
    counts = {"rms_norm": 0, "glu": 0, "rope": 0, "skipped": set()}
    if impl == "torch":
        return counts
    base = _unwrap(model)
    spec = fused_ops_spec(base.config)
    if spec is None:
        counts["skipped"].add(f"family {getattr(base.config, 'model_type', None)!r} has no fused ops")
        return _report(counts)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base.model
    act = glu_activation(base.config)
    if act is None:
        counts["skipped"].add(f"MLP activation {getattr(base.config, spec['act_key'], None)!r} has no fused kernel")
    rope_modules = set()
    for layer in decoder.layers:
        for path in spec["layer_norms"]:
            counts["rms_norm"] += _patch_norm(_get(layer, path), spec["norm"], counts["skipped"])
        if act is not None:
            mlp = layer.mlp
            if all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
                forward = _mlp_forward
            elif all(hasattr(mlp, n) for n in ("gate_up_proj", "down_proj")):
                forward = _gate_up_mlp_forward
            else:
                raise TypeError(f"fused_ops: {type(mlp).__name__} is not a gated MLP (gate/up/down or gate_up/down "
                                f"projections)")
            counts["glu"] += _patch_forward(mlp, forward, "glu", _llm2vec_act=act)
        if spec["rope"]:
            rope_modules.add(type(layer.self_attn).__module__)
    counts["rms_norm"] += _patch_norm(decoder.norm, spec["norm"], counts["skipped"])
    for name in sorted(rope_modules):
        _patch_rope(name)
        counts["rope"] += 1
    return _report(counts)


def _report(counts):
    if not torch.distributed.is_available() or not torch.distributed.is_initialized() or \
            torch.distributed.get_rank() == 0:
        msg = (f"fused ops ({llm2vec_kernels.get_default_impl('fused_ops')}): {counts['rms_norm']} RMSNorm, "
               f"{counts['glu']} gated MLP, RoPE in {counts['rope']} modeling module(s)")
        if counts["skipped"]:
            msg += "; not fused: " + "; ".join(sorted(counts["skipped"]))
        print("[engine]", msg, flush=True)
    return counts

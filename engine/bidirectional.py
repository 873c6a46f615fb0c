"""One generic switch that makes a decoder-only model attend bidirectionally.

It works through transformers' public extension points only:

* ``AttentionInterface.register(ATTN_NAME, _attention)``: every attention layer of every supported
  family calls ``_attention(module, q, k, v, attention_mask, dropout=, scaling=, sliding_window=,
  softcap=, **kwargs)``; we route that to ``llm2vec_kernels.flash_attention`` (non-causal), or where it is faster
  to torch SDPA / flash-attn (``llm2vec_kernels/attention/dispatch.py`` decides).
* ``AttentionMaskInterface.register(ATTN_NAME, _padding_mask)``: mask construction returns the 2-D
  padding mask (or None) instead of a causal 4-D mask, so nothing causal survives and no dense
  (B, 1, S, S) mask is ever built.

Inputs can arrive three ways: packed varlen (batch 1 with ``cu_seq_lens_q``/``max_length_q`` kwargs,
as the engine always calls it: no work is spent on padding anywhere in the model), padded with a
2-D mask (unpadded per layer here), or dense without padding.

The per-architecture table below lists what each family needs; anything else is refused with a
clear error, since a family whose attention module ignores the interface would silently stay causal.
"""
import contextlib
import importlib.util

import torch

import llm2vec_kernels
from llm2vec_kernels.attention import dispatch as attn_dispatch

ATTN_NAME = "llm2vec_bidirectional"

# Fused elementwise ops per family (engine/fused_ops.py): "norm" is the RMSNorm form ("llama": weight * n in
# the input dtype; "gemma": n * (1 + weight), rounded once), "layer_norms" the RMSNorm modules of a decoder layer
# (dotted paths), "act_key" the config attribute naming the gated MLP's activation; RoPE goes through the
# modeling module's apply_rotary_pos_emb. The final norm (decoder.norm) is fused too.
_LLAMA_NORMS = ("input_layernorm", "post_attention_layernorm")
_FUSED_LLAMA = {"norm": "llama", "layer_norms": _LLAMA_NORMS, "act_key": "hidden_act", "rope": True}

# "fused_projections": {module: the Llama projections it holds}, for a family whose Linear computes several of
# Llama's at once, their outputs concatenated in that order along the last dim: Phi3's qkv_proj is
# x [W_q; W_k; W_v]^T = [q | k | v], its gate_up_proj [gate | up]. LoRA targets named the Llama way resolve to these
# modules (engine.modeling.lora_targets), set_attention_dropout finds the attention by them, and the memory plan
# costs what their outputs' views keep alive (engine.memory.layer_shape).
_PHI3_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}

# model_type -> notes on what the switch must honour for that family.
SUPPORTED_ARCHITECTURES = {
    "llama": {"fused_ops": _FUSED_LLAMA},
    "mistral": {"sliding_window": True, "fused_ops": _FUSED_LLAMA},
    "qwen2": {"sliding_window": True, "fused_ops": _FUSED_LLAMA},
    "qwen3": {"sliding_window": True, "fused_ops": dict(
        _FUSED_LLAMA, layer_norms=_LLAMA_NORMS + ("self_attn.q_norm", "self_attn.k_norm"))},
    "gemma": {"fused_ops": {"norm": "gemma", "layer_norms": _LLAMA_NORMS, "act_key": "hidden_act", "rope": True}},
    "gemma2": {"sliding_window": True, "attn_softcap": True, "final_softcap": True, "fused_ops": {
        "norm": "gemma", "layer_norms": _LLAMA_NORMS + ("pre_feedforward_layernorm", "post_feedforward_layernorm"),
        "act_key": "hidden_activation", "rope": True}},
    "phi3": {"sliding_window": True, "fused_projections": _PHI3_PROJECTIONS, "fused_ops": _FUSED_LLAMA},
}


def fused_projections(model_type):
    """{fused module name: the Llama projections it holds} of a family ({} for one with separate projections or
    not in the table)."""
    return SUPPORTED_ARCHITECTURES.get(model_type, {}).get("fused_projections", {})


def _every_fused_projection():
    """{fused module name: the Llama projections it holds} over every family of the table."""
    return {name: parts for spec in SUPPORTED_ARCHITECTURES.values()
            for name, parts in spec.get("fused_projections", {}).items()}


def lora_target_parts(target_modules):
    """The Llama projections ``lora.target_modules`` adapts on whichever family, sorted, each once: a fused module's
    name (``qkv_proj``) stands for its parts in every family that has it, so ``[qkv_proj, o_proj]`` and
    ``[q_proj, k_proj, v_proj, o_proj]`` (the same adapter on Phi3) are one setting; order never mattered to PEFT."""
    parts = _every_fused_projection()
    return sorted({x for name in target_modules for x in parts.get(name, (name,))})


class UnsupportedArchitectureError(ValueError):
    pass


def check_architecture(config):
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported for bidirectional conversion; supported: "
            f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}")
    return SUPPORTED_ARCHITECTURES[model_type]


def _cu_from_mask(mask2d):
    # mask2d: (B, S) bool -> token indices into the flattened (B*S) layout, cu_seqlens (B+1,) int32, max len
    lengths = mask2d.sum(dim=1, dtype=torch.int32)
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=mask2d.device)
    cu[1:] = torch.cumsum(lengths, 0)
    idx = mask2d.flatten().nonzero().squeeze(1)
    return idx, cu, int(lengths.max().item()) if lengths.numel() else 0


def _cu_from_positions(position_ids):
    """Sequences packed into one row told only by restarting ``position_ids`` (transformers'
    DataCollatorWithFlattening without its flash-attn kwargs): their cu_seqlens (int32) and the longest, or None
    for one sequence (a row whose positions never restart after its first token). Host syncs in every layer: only
    calls that pass neither cu_seq_lens nor a padding mask with one row come here (the engine passes cu_seq_lens)."""
    pos = position_ids.reshape(-1)
    starts = (pos == 0).nonzero().squeeze(1)
    if starts.numel() < 2 or int(starts[0]) != 0:
        return None
    cu = torch.cat([starts, starts.new_tensor([pos.numel()])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


_OPTIONS = {"deterministic": True, "as_if_grad": None, "shapes_only": False}


@contextlib.contextmanager
def shapes_only_attention():
    """Attention calls on the meta device inside return their output's shape only (q's with v's head dim): the dry
    run's meta forward wants shapes, and the exact torch path it would take there loops over every sequence of
    every layer (seconds at a 7B shape). Off the meta device, and outside, nothing changes (the step proxy costs
    the torch path's ops on meta)."""
    prev, _OPTIONS["shapes_only"] = _OPTIONS["shapes_only"], True
    try:
        yield
    finally:
        _OPTIONS["shapes_only"] = prev


def attention_gradient_reach(model):
    """{id(attention module): whether a backward through ``model`` computes that layer's q / k / v gradients}: a
    trainable parameter before the layer (embeddings, earlier layers) or in its input norm or q / k / v side (not
    o_proj, whose gradient needs no attention backward). LoRA on the MLP only leaves layer 0's attention without."""
    from .modeling import decoder_of

    dec = decoder_of(model)
    trains = lambda mod: any(p.requires_grad for p in mod.parameters()) if mod is not None else False  # noqa: E731
    upstream, reach = trains(getattr(dec, "embed_tokens", None)), {}
    for layer in getattr(dec, "layers", []):
        attn = getattr(layer, "self_attn", None)
        if attn is None:
            continue
        qkv = any(p.requires_grad for n, p in attn.named_parameters() if not n.startswith("o_proj."))
        reach[id(attn)] = upstream or qkv or trains(getattr(layer, "input_layernorm", None))
        upstream = upstream or trains(layer)
    if not reach:
        raise ValueError(f"no decoder layers with self_attn under {type(model).__name__}: pass the (PEFT) model")
    return reach


@contextlib.contextmanager
def dispatch_as_if_backward(model):
    """Attention calls of ``model`` inside choose the backend a backward pass would get, though none follows:
    gradient caching's first (no-grad) pass then embeds with the kernels its second pass backpropagates through (on
    sm_90 a no-grad call may go to SDPA or flash-attn and the deterministic backward's to Triton: different
    rounding). Per layer, as the backward would (:func:`attention_gradient_reach`)."""
    prev, _OPTIONS["as_if_grad"] = _OPTIONS["as_if_grad"], attention_gradient_reach(model)
    try:
        yield
    finally:
        _OPTIONS["as_if_grad"] = prev


def set_deterministic_attention(flag):
    """False lets the Triton backward accumulate dQ with atomics (see llm2vec_kernels.flash_attention)."""
    _OPTIONS["deterministic"] = bool(flag)


def _draw_seed():
    # From torch's CPU RNG so that activation checkpointing and gradient caching, which replay the RNG
    # state, replay the same dropout pattern.
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def _flash_attn_available():
    if "flash_attn" not in _OPTIONS:
        _OPTIONS["flash_attn"] = importlib.util.find_spec("flash_attn") is not None
    return _OPTIONS["flash_attn"]


def _flash_attn_varlen(q, k, v, cu, max_len, scale, deterministic):
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, dropout_p=0.0, softmax_scale=scale,
                                  causal=False, deterministic=deterministic)


def window_binds(window, max_len):
    """Whether a sliding window hides some key from some query of a ``max_len``-token sequence. A query at i sees
    the keys with |i - j| <= window, as in transformers' bidirectional sliding-window mask (what an export loads
    with) and flash-attn's ``window_size=(window, window)`` (llm2vec's bidirectional Mistral), so only sequences
    of more than window + 1 tokens are cut."""
    return window is not None and max_len > window + 1


def _attention_call(q, k, v, max_len, dropout, window, softcap, layout, as_if=None):
    """What llm2vec_kernels.attention.dispatch decides on for this call (host-side facts only)."""
    # as_if: what a backward would need here, for a forward without one (dispatch_as_if_backward)
    needs_grad = as_if if as_if is not None else torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad)
    return attn_dispatch.AttentionCall(
        impl=llm2vec_kernels.get_default_impl("attention"), device_type=q.device.type,
        arch=attn_dispatch.device_arch(q), dtype=q.dtype, head_dim=q.shape[-1],
        layout="varlen" if "cu_seqlens" in layout else ("padded" if "seqlens" in layout else "dense"),
        dropout=dropout, needs_grad=needs_grad, deterministic=_OPTIONS["deterministic"], softcap=softcap is not None,
        window=window_binds(window, max_len), flash_attn=_flash_attn_available())


def _attend(q, k, v, max_len, scale, dropout, window, softcap, as_if=None, **layout):
    # layout: cu_seqlens= / max_seqlen= for packed q (T, Hq, D), k/v (T, Hkv, D); or seqlens= for a
    # right-padded q (B, S, Hq, D), k/v (B, S, Hkv, D). max_len: the longest sequence (decides the window).
    if _OPTIONS["shapes_only"] and q.device.type == "meta":
        return q.new_empty(q.shape[:-1] + (v.shape[-1],))
    seed = _draw_seed() if dropout > 0 else None
    if window_binds(window, max_len):
        # The Triton kernel has no banded masks: take the exact torch path (soft-capping included).
        return llm2vec_kernels.flash_attention_reference(
            q, k, v, scale=scale, dropout_p=dropout, seed=seed, window=window, softcap=softcap, **layout)
    # By speed (llm2vec_kernels/attention/dispatch.py): SDPA for dense dropout-free batches, flash-attn varlen for packed
    # ones when installed, where that is faster and keeps the determinism asked for; the Triton kernel otherwise.
    call = _attention_call(q, k, v, max_len, dropout, window, softcap, layout, as_if)
    runners = {"sdpa": lambda q_, k_, v_: attn_dispatch.sdpa_attention(q_, k_, v_, scale)}
    if call.flash_attn and "cu_seqlens" in layout:
        runners["flash_attn"] = lambda q_, k_, v_: _flash_attn_varlen(
            q_, k_, v_, layout["cu_seqlens"], max_len, scale, _OPTIONS["deterministic"])
    runners["triton"] = lambda q_, k_, v_: llm2vec_kernels.flash_attention(
        q_, k_, v_, scale=scale, dropout_p=dropout, seed=seed, deterministic=_OPTIONS["deterministic"],
        softcap=softcap, **layout)
    backend = attn_dispatch.select_backend(call, runners, q, k, v, max_len)
    if backend in ("sdpa", "flash_attn"):
        return runners[backend](q, k, v)
    return llm2vec_kernels.flash_attention(q, k, v, scale=scale, dropout_p=dropout, seed=seed,
                                   deterministic=_OPTIONS["deterministic"], softcap=softcap, **layout)


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
               softcap=None, **kwargs):
    # query: (B, Hq, S, D), key/value: (B, Hkv, S, D) -> output (B, S, Hq, D), no weights
    B, Hq, S, D = query.shape
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, S, H, D)
    reach = _OPTIONS["as_if_grad"]
    as_if = None if reach is None else reach.get(id(module), True)
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None and attention_mask is None and B == 1 and S > 1 and kwargs.get("position_ids") is not None:
        packed = _cu_from_positions(kwargs["position_ids"])  # else dense attention would mix the sequences
        if packed is not None:
            cu, kwargs["max_length_q"] = packed
    if cu is not None:
        if B != 1:
            raise ValueError("packed varlen attention expects batch size 1")
        max_len = int(kwargs.get("max_length_q") or S)
        out = _attend(q[0], k[0], v[0], max_len, scaling, dropout, sliding_window, softcap, as_if=as_if,
                      cu_seqlens=cu.to(torch.int32), max_seqlen=max_len)
        return out.unsqueeze(0), None
    if attention_mask is not None and attention_mask.dim() == 2:
        m = attention_mask.bool()
        lens = m.sum(dim=1, dtype=torch.int32)
        prefix = torch.arange(S, device=m.device)[None, :] < lens[:, None]
        all_real, right_padded = torch.stack([m.all(), (m == prefix).all()]).tolist()  # one host sync
        if not all_real and right_padded:
            # right padding: the kernels read the padded batch in place (seqlens=), no unpad / repad copies
            return _attend(q, k, v, S, scaling, dropout, sliding_window, softcap, as_if=as_if, seqlens=lens), None
        if not all_real:  # left or ragged padding: unpad to varlen, then repad
            idx, cu, max_len = _cu_from_mask(m)
            flat = lambda t: t.reshape(B * S, t.shape[2], D).index_select(0, idx)  # noqa: E731
            o = _attend(flat(q), flat(k), flat(v), max_len, scaling, dropout, sliding_window, softcap, as_if=as_if,
                        cu_seqlens=cu, max_seqlen=max_len)
            out = q.new_zeros(B * S, Hq, D).index_copy(0, idx, o)
            return out.view(B, S, Hq, D), None
    if attention_mask is not None and attention_mask.dim() == 4:
        raise ValueError("the bidirectional attention path takes 2-D padding masks, not 4-D masks")
    return _attend(q, k, v, S, scaling, dropout, sliding_window, softcap, as_if=as_if), None  # dense, no padding


def _padding_mask(batch_size, q_length=None, kv_length=None, q_offset=0, kv_offset=0, mask_function=None,
                  attention_mask=None, **kwargs):
    # Ignore the causal mask_function: bidirectional means "every real token sees every real token". Only
    # kv_length is read, and it may be absent: transformers 5.2 and 5.3 pass no q_length (5.4 on do).
    if attention_mask is None:
        return None
    if kv_length is not None:
        attention_mask = attention_mask[:, -kv_length:]
    return None if bool(attention_mask.all()) else attention_mask


_registered = False


def register():
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, _attention)
    AttentionMaskInterface.register(ATTN_NAME, _padding_mask)
    _registered = True


def set_attention_dropout(model, p):
    """Dropout on attention probabilities in every attention layer (active only in train mode). A dropout that
    reaches fewer attention layers than the model has decoder layers is refused: SimCSE's views would silently
    be the same forward (an attention module this code does not recognise). An attention module is one with an
    ``attention_dropout`` and a query projection: ``q_proj``, or a family's fused module that holds it (Phi3's
    ``qkv_proj``, from the table's ``fused_projections``)."""
    query = {"q_proj"} | {name for name, parts in _every_fused_projection().items() if "q_proj" in parts}
    n = 0
    for mod in model.modules():
        if hasattr(mod, "attention_dropout") and any(hasattr(mod, name) for name in query):
            mod.attention_dropout = float(p)
            n += 1
    model.config.attention_dropout = float(p)
    layers = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    if p and layers and n != layers:
        raise UnsupportedArchitectureError(
            f"model.attention_dropout={p:g} reaches {n} of the {layers} attention layers of "
            f"{type(model).__name__} (attention modules with a {' or '.join(sorted(query))} and an "
            f"attention_dropout): this family's attention is not one the engine sets dropout on; use "
            f"model.attention_dropout=0 and lora.dropout")
    return n


def make_bidirectional(model):
    """Switch a loaded HF decoder (or a PEFT wrapper of one) to bidirectional attention in place."""
    register()
    base = model
    while hasattr(base, "get_base_model") and base is not base.get_base_model():
        base = base.get_base_model()
    check_architecture(base.config)
    if hasattr(base, "set_attn_implementation"):
        base.set_attn_implementation(ATTN_NAME)
    else:  # older transformers
        base.config._attn_implementation = ATTN_NAME
    for cfg in {id(c): c for c in (base.config, getattr(base.config, "text_config", None)) if c is not None}.values():
        cfg._attn_implementation = ATTN_NAME
        cfg.is_causal = False
    for mod in base.modules():
        if hasattr(mod, "is_causal"):
            mod.is_causal = False
    return model


def is_bidirectional(model):
    cfg = model.config
    return getattr(cfg, "_attn_implementation", None) == ATTN_NAME

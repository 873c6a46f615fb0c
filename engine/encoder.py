"""The encoder users came for: load a trained LLM2Vec model and ``encode`` texts.

    from engine import Encoder
    enc = Encoder.from_pretrained("outputs/smollm2-135m-simcse")          # a run's output dir
    emb = enc.encode(["a sentence", "another"])                           # float32 (N, H) numpy array

``from_pretrained`` accepts: a training run's output dir (its ``best/`` adapter, the one the run selected by dev
score, when it kept one, else ``adapter/``; ``adapter="last"`` / ``"best"`` choose) or one of those folders
(base model, earlier adapters and pooling come from ``engine_encoder.json``); a PEFT adapter folder or hub id whose
``adapter_config.json`` names its base, recursively (the layout of published LLM2Vec checkpoints: base <-
MNTP adapter <- supervised/SimCSE adapter, with ``llm2vec_config.json`` for pooling); a folder written by
``python -m engine.export`` (pooling and prompt from its sentence-transformers files); or a plain HF model
(used as is, made bidirectional). It takes llm2vec's arguments too (``peft_model_name_or_path``,
``torch_dtype``, ``device_map``, ``pooling_mode``, ``doc_max_length``, ``skip_instruction``, model kwargs).

The model is loaded without its LM head (``AutoModel``) and every adapter of the chain is merged into the
base weights (LoRA ``W += scale * B @ A`` in fp32, then cast back).
"""
import json
import logging
import os
import re
from contextlib import contextmanager

import torch

from .encoding import CHAT_WRAP_BY_BASE, CHAT_WRAPS, encode_texts, instruction_prefix, truncate_words
from .refs import hub_id_of, kind, not_found

logger = logging.getLogger(__name__)

_LLM2VEC_POOLING = {"mean": "mean", "weighted_mean": "weighted_mean", "eos_token": "eos", "last_token": "last",
                    "bos_token": "bos"}
_ST_POOLING = {"mean": "mean", "weightedmean": "weighted_mean", "lasttoken": "eos", "cls": "bos"}
DEFAULT_MAX_LENGTH = 512  # inference max tokens when the model folder names none
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def resolve_ref(name, what="model"):
    """A local folder for ``name``: a local path as is, a hub id through ``huggingface_hub`` (its cache and
    ``HF_HUB_OFFLINE`` are honoured)."""
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        return os.path.abspath(path)
    if kind(name) != "hub":
        raise FileNotFoundError(not_found(name, what))
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name)
    except Exception as e:  # offline without a cached copy, a missing repo, ...
        raise FileNotFoundError(f"{what} {name!r} is not a local folder and could not be fetched from the "
                                f"hub ({type(e).__name__}: {e})") from e


def _settings_folder(name):
    """A local folder holding ``name``'s metadata files (sentence-transformers modules and pooling, llm2vec's and
    the engine's JSON): the folder itself, or for a hub id its JSON files alone through ``huggingface_hub`` (an
    export pushed to the hub keeps its pooling, normalisation and prompts; no weights are fetched here). None when
    neither is there (offline without a cached copy: the weights' load then says so)."""
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        return os.path.abspath(path)
    if kind(name) != "hub":
        return None
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, allow_patterns=["*.json", "*/*.json"])
    except Exception as e:
        logger.debug("no metadata of %s (%s: %s)", name, type(e).__name__, e)
        return None


def _is_adapter(name):
    """Whether ``name`` (folder or hub id) is a PEFT adapter, without downloading model weights."""
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, "adapter_config.json"))
    if kind(name) != "hub":
        return False
    try:
        from huggingface_hub import hf_hub_download

        hf_hub_download(name, "adapter_config.json")
        return True
    except Exception:
        return False


def _llm2vec_settings(folder):
    """Pooling, max_length, doc_max_length and skip_instruction from a folder's ``llm2vec_config.json``, each
    type-checked here (ValueError naming the file and field), before any weights load."""
    s = {}
    p = os.path.join(folder, "llm2vec_config.json")
    if os.path.isfile(p):
        lc = _read_json(p)
        if not isinstance(lc, dict):
            raise ValueError(f"{p}: expected a JSON object, got {type(lc).__name__}")

        def bad(field, want):
            return ValueError(f"{p}: {field} must be {want}, got {lc[field]!r}")

        if "pooling_mode" in lc:
            if not isinstance(lc["pooling_mode"], str):
                raise bad("pooling_mode", f"a string (one of {sorted(_LLM2VEC_POOLING)})")
            s["pooling"] = _LLM2VEC_POOLING.get(lc["pooling_mode"], lc["pooling_mode"])
        for field, none_ok in (("max_length", False), ("doc_max_length", True)):
            if field in lc:
                v = lc[field]
                if not (v is None and none_ok) and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                    raise bad(field, "a positive integer" + (" or null" if none_ok else ""))
                s[field] = v
        if "skip_instruction" in lc:
            if not isinstance(lc["skip_instruction"], bool):
                raise bad("skip_instruction", "true or false")
            s["skip_instruction"] = lc["skip_instruction"]
    return s


def _engine_text_settings(folder):
    """The chat wrap and the default instruction a folder written by ``engine.LLM2Vec.save`` records
    (``engine_text.json``; folders saved before it recorded the instruction have none)."""
    p = os.path.join(folder, "engine_text.json")
    if not os.path.isfile(p):
        return {}
    saved = _read_json(p)
    return {"chat": saved.get("chat"), **({"instruction": saved["instruction"]} if "instruction" in saved else {})}


def _st_settings(folder):
    """Pooling, normalisation, max length, prompts and default prompt of a sentence-transformers folder (an
    export)."""
    s = {}
    try:
        modules = _read_json(os.path.join(folder, "modules.json"))
    except (OSError, ValueError):
        return s
    for m in modules:
        cfg = os.path.join(folder, m.get("path", ""), "config.json")
        if m.get("type", "").endswith("Pooling") and os.path.isfile(cfg):
            mode = _read_json(cfg).get("pooling_mode", "mean")
            s["pooling"] = _ST_POOLING.get(mode if isinstance(mode, str) else mode[0], "mean")
        if m.get("type", "").endswith("Normalize"):
            s["normalize"] = True
    ex = os.path.join(folder, "engine_export.json")
    if os.path.isfile(ex):
        s["chat"] = _read_json(ex).get("chat")
    stc = os.path.join(folder, "config_sentence_transformers.json")
    if os.path.isfile(stc):
        c = _read_json(stc)
        if c.get("prompts"):
            s["prompts"] = dict(c["prompts"])
        name = c.get("default_prompt_name")
        if name:
            s["instruction"] = (c.get("prompts") or {}).get(name, "")
    tc = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(tc) and isinstance(_read_json(tc).get("model_max_length"), int):
        s["max_length"] = _read_json(tc)["model_max_length"]
    return s


class ModelPathError(ValueError):
    """A model path that names no model: missing, empty, an unfinished run, or a folder of something else."""


RUN_ADAPTERS = {"best": "best", "last": "adapter"}  # which adapter of a training run folder: its sub-folder
_MODEL_FILES = ("adapter_config.json", "config.json", "engine_encoder.json", "modules.json")


def _no_model_files(path):
    return os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in _MODEL_FILES)


def is_run_folder(path):
    """Whether ``path`` is a training run's ``output_dir``: ``config.yaml`` or ``checkpoints/`` in it (a run writes
    them before its adapters), and it is no adapter or model folder itself."""
    return _no_model_files(path) and (os.path.isfile(os.path.join(path, "config.yaml")) or
                                      os.path.isdir(os.path.join(path, "checkpoints")))


def _holds_run_adapters(path):
    """A run folder, or a folder holding ``adapter/`` or ``best/`` adapters as a run does (a copied run)."""
    return is_run_folder(path) or has_run_adapters(path)


def has_run_adapters(path):
    """Whether ``path`` is no model folder and holds ``adapter/`` or ``best/`` adapters, as a run does."""
    return _no_model_files(path) and any(
        os.path.isfile(os.path.join(path, d, "adapter_config.json")) for d in RUN_ADAPTERS.values())


def run_folder(path):
    """The run's ``output_dir`` for a run folder or one of its adapter folders (``adapter/``, ``best/``), else None."""
    p = os.path.abspath(os.path.expanduser(path))
    if os.path.basename(p) in RUN_ADAPTERS.values() and is_run_folder(os.path.dirname(p)):
        return os.path.dirname(p)
    return p if is_run_folder(p) else None


def _latest_checkpoint_adapter(run):
    tags = sorted(t for t in os.listdir(os.path.join(run, "checkpoints"))
                  if os.path.isfile(os.path.join(run, "checkpoints", t, "adapter", "adapter_config.json"))) \
        if os.path.isdir(os.path.join(run, "checkpoints")) else []
    return os.path.join(run, "checkpoints", tags[-1], "adapter") if tags else None


def select_run_adapter(run, adapter=None):
    """The adapter folder of training run ``run`` and a line saying which: ``best/`` (highest dev score, what the
    run selected) when it kept one, else ``adapter/`` (the last step); ``adapter="best"`` / ``"last"`` insist."""
    if adapter not in (None, *RUN_ADAPTERS):
        raise ModelPathError(f"adapter={adapter!r}: use 'best' or 'last'")
    have = {k: os.path.join(run, d) for k, d in RUN_ADAPTERS.items()
            if os.path.isfile(os.path.join(run, d, "adapter_config.json"))}
    which = adapter or ("best" if "best" in have else "last")
    if which not in have:
        if not have:
            ckpt = _latest_checkpoint_adapter(run)
            hint = f"; its newest checkpoint's adapter is {ckpt}" if ckpt else ""
            raise ModelPathError(f"{run} is a training run without a final adapter (it has not finished or it "
                                 f"failed): re-run its training command to resume it{hint}")
        other = "last" if which == "best" else "best"
        raise ModelPathError(f"{run} has no {RUN_ADAPTERS[which]}/ adapter (adapter={which!r}); it has "
                             f"{RUN_ADAPTERS[other]}/ (adapter={other!r})")
    folder = have[which]
    if which == "best":
        meta = os.path.join(folder, "engine_best.json")
        score = _read_json(meta) if os.path.isfile(meta) else {}
        line = (f"{run}: using best/ (step {score.get('step', '?')}, dev Spearman "
                f"{_fmt(score.get('spearman'))}), the adapter the run selected; adapter='last' uses adapter/")
    else:
        line = f"{run}: using adapter/ (the last step)" + ("" if "best" not in have else
                                                            "; adapter='best' uses best/, the run's selection")
    return folder, line


def _fmt(x):
    return f"{x:.2f}" if isinstance(x, (int, float)) else "?"


def check_model_path(name_or_path):
    """A clear ModelPathError for a local path that holds no model (hub ids and the engine's model aliases pass:
    the hub or ``engine.assets`` answers for them)."""
    k = kind(name_or_path)
    if k in ("alias", "hub"):
        return  # engine.assets or the hub answers for it (engine.refs: ``outputs/x`` beside outputs/ is local)
    if k == "missing":
        raise ModelPathError(not_found(name_or_path))
    path = os.path.expanduser(name_or_path)
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ModelPathError(f"{name_or_path} is a file, not a model folder (a .gguf file or a folder is "
                                 f"expected)")
        return
    if not os.path.isdir(path):
        raise ModelPathError(f"{name_or_path} is not a folder (a dangling link?)")
    if any(os.path.isfile(os.path.join(path, f)) for f in _MODEL_FILES) or _holds_run_adapters(path) or \
            any(f.endswith(".gguf") for f in os.listdir(path)):
        return
    if not os.listdir(path):
        raise ModelPathError(f"{name_or_path} is an empty folder, not a model (a training run that failed before "
                             f"writing anything leaves one: delete it and re-run)")
    raise ModelPathError(f"{name_or_path} is not a model or a training run: it holds no config.json (model), "
                         f"adapter_config.json (adapter) or adapter/ (run output_dir)")


def _prior_adapter(recorded):
    """A folder for an adapter a run trained on top of, as its engine_encoder.json records it
    (``engine.checkpoint.write_adapter``): a local adapter by its absolute path, a published one (llm2vec's
    ``McGill-NLP/...-mntp``) by its hub id, fetched through huggingface_hub's cache like any hub adapter."""
    if not os.path.isabs(recorded) and kind(recorded) == "hub":
        return resolve_ref(recorded, "adapter")
    return os.path.abspath(recorded)


def resolve_chain(name_or_path, peft_model_name_or_path=None, adapter=None):
    """Where the weights come from: a dict with ``base`` (hub id or folder of the base weights), ``base_id`` (the
    root base's hub id where known: it selects llm2vec's chat wrapping), ``adapters`` (local folders, base first),
    ``random_init`` / ``gguf_file`` (engine test runs), ``tokenizer`` (a folder, or None for the base's),
    ``settings`` (pooling, max_length, instruction, ... from the folders' metadata; the top adapter wins) and
    ``selected`` (for a training run folder: which of its adapters, ``select_run_adapter``; logged)."""
    check_model_path(name_or_path)
    path = os.path.expanduser(name_or_path)
    selected = None
    if _holds_run_adapters(path):  # a training run's output dir: its best/ or adapter/
        path, selected = select_run_adapter(os.path.abspath(path), adapter)
        logger.info(selected)
    elif adapter is not None:
        raise ModelPathError(f"adapter={adapter!r} applies to a training run folder; {name_or_path} is not one")
    info = {"base": None, "base_id": None, "adapters": [], "random_init": None, "gguf_file": None,
            "tokenizer": None, "settings": {}, "engine_meta": None, "selected": selected}
    meta_path = os.path.join(path, "engine_encoder.json")
    if os.path.isfile(meta_path):
        meta = _read_json(meta_path)
        info.update(base=meta.get("base_model") or None, random_init=meta.get("random_init"),
                    gguf_file=meta.get("gguf_file"), tokenizer=os.path.abspath(path), engine_meta=meta,
                    adapters=[_prior_adapter(a) for a in meta.get("prior_adapters", [])] + [os.path.abspath(path)])
        missing = [a for a in info["adapters"] if not os.path.isfile(os.path.join(a, "adapter_config.json"))]
        if missing:
            raise FileNotFoundError(f"{meta_path} names adapters that are gone: {missing} (export the run with "
                                    f"`python -m engine.export` to get a folder that can move)")
        info["settings"] = {"pooling": meta.get("pooling", "mean"), "instruction": meta.get("instruction", ""),
                            "train_max_length": meta.get("max_length"), "bidirectional": meta.get("bidirectional", True)}
    else:
        chain, settings, cur = [], {}, name_or_path if not os.path.isdir(path) else path
        for _ in range(10):
            if not _is_adapter(cur):
                break
            folder = resolve_ref(cur, "adapter")
            chain.insert(0, folder)
            settings = {**_llm2vec_settings(folder), **_engine_text_settings(folder), **settings}
            base = _read_json(os.path.join(folder, "adapter_config.json")).get("base_model_name_or_path")
            if not base:
                raise ValueError(f"{folder}/adapter_config.json does not name base_model_name_or_path")
            cur = base
        else:
            raise ValueError(f"adapter chain deeper than 10 at {name_or_path}")
        info["base"], info["adapters"] = cur, chain
        base_folder = _settings_folder(cur)
        if base_folder is not None:
            settings = {**_llm2vec_settings(base_folder), **_engine_text_settings(base_folder),
                        **_st_settings(base_folder), **settings}
        info["settings"] = settings
        top = chain[-1] if chain else None
        if top and os.path.isfile(os.path.join(top, "tokenizer_config.json")):
            info["tokenizer"] = top
    if peft_model_name_or_path:
        extra = resolve_chain(peft_model_name_or_path)
        # llm2vec: the supervised adapter's own chain (it names the MNTP repo as its base) is already loaded
        own = [a for a in extra["adapters"] if a not in info["adapters"]]
        info["adapters"] = info["adapters"] + own
        info["settings"] = {**info["settings"], **extra["settings"]}
        if extra["engine_meta"] is not None:  # the top adapter's record: the chat wrap it trained with (or none)
            info["engine_meta"] = extra["engine_meta"]
        if extra["tokenizer"] and not info["tokenizer"]:
            info["tokenizer"] = extra["tokenizer"]
    info["base_id"] = hub_id_of(info["base"])
    return info


def _positive_int(name, value, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _pooling_mode(name):
    """The engine's pooling mode ``name`` names (llm2vec's names too: ``eos_token`` is ``eos``); ValueError for
    another, said before a model loads rather than at its first encode."""
    from .pooling import POOLING_MODES

    mode = _LLM2VEC_POOLING.get(name, name)
    if mode not in POOLING_MODES:
        raise ValueError(f"unknown pooling {name!r}; expected one of {list(POOLING_MODES)} (or llm2vec's "
                         f"{sorted(set(_LLM2VEC_POOLING) - set(POOLING_MODES))})")
    return mode


def recorded_chat(info):
    """The chat wrap a checkpoint records: (found, wrap). An engine run records the wrap it trained with
    (``engine_encoder.json`` "chat", absent = trained unwrapped), an export the wrap it encodes with; a published
    llm2vec checkpoint records none (found False)."""
    meta = info.get("engine_meta")
    if meta is not None:
        return True, meta.get("chat")
    s = info.get("settings", {})
    if "chat" in s:
        return True, s["chat"]
    return False, None


def chat_for(info, chat="auto"):
    """The wrap to encode with: ``auto`` follows the checkpoint's record, and guesses from the base's hub id
    (:data:`encoding.CHAT_WRAP_BY_BASE`, llm2vec's own rule) only for checkpoints without one; None / "none"
    disables it; a name forces it (with a warning when it contradicts the record)."""
    found, rec = recorded_chat(info)
    if chat == "auto":
        return rec if found else CHAT_WRAP_BY_BASE.get(info.get("base_id") or "")
    chat = None if chat in (None, "none") else chat
    if chat is not None and chat not in CHAT_WRAPS:
        raise ValueError(f"unknown chat wrapping {chat!r}; expected auto, none or one of {sorted(CHAT_WRAPS)}")
    if found and chat != rec:
        logger.warning("chat=%r overrides the wrap this model was trained / exported with (%r)", chat, rec)
    return chat


def resolve_dtype(dtype, device_type):
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        from .modeling import torch_dtype

        return torch_dtype("auto", device_type)
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}: use auto, bf16, fp16 or fp32 (or a torch.dtype)")
    return table[dtype]


def load_encoder_model(info, dtype=torch.float32, device_map=None, bidirectional=True, tokenizer_check=None,
                       **model_kwargs):
    """(bare decoder without LM head, tokenizer) for a ``resolve_chain`` result, adapters merged.
    ``tokenizer_check(tok)``: called once the tokenizer has loaded, before the weights do (a 7B's minutes)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from .bidirectional import check_architecture, make_bidirectional
    from .config import ModelConfig
    from .modeling import (ModelLoadError, decoder_of, load_model, load_tokenizer, load_weights, loading,
                           merge_loras, resolve_model_path)

    if info["random_init"]:  # an engine test run on a random tiny model: rebuild it exactly as training did
        mcfg = ModelConfig(name_or_path=info["base"] or "", random_init=info["random_init"],
                           tokenizer=info["tokenizer"], dtype="fp32", bidirectional=False)
        full, tok = load_model(mcfg, "cpu", bidirectional=False)
        if tokenizer_check is not None:
            tokenizer_check(tok)
        model = decoder_of(full).to(dtype)
        del full
    else:
        path, gguf = resolve_model_path(info["base"], info["gguf_file"])
        kw = dict(model_kwargs)
        if gguf:
            kw["gguf_file"] = gguf
        if device_map is not None:
            kw["device_map"] = device_map
        # The tokenizer first: a folder without one fails in a moment, not after the weights have loaded.
        if info["tokenizer"]:
            tok = loading(f"the tokenizer in {info['tokenizer']}", AutoTokenizer.from_pretrained, info["tokenizer"])
        else:
            tok = load_tokenizer(ModelConfig(name_or_path=info["base"], gguf_file=info["gguf_file"]))
        if tokenizer_check is not None:
            tokenizer_check(tok)
        if bidirectional:  # an architecture the engine cannot make bidirectional fails before the weights load
            check_architecture(loading(f"the model config of {info['base']!r}", AutoConfig.from_pretrained, path,
                                        **({"gguf_file": gguf} if gguf else {})))
        try:  # a corrupt or truncated weights file (SafetensorError, ...) is one ModelLoadError line, as in training
            model = load_weights(f"the base model {info['base']!r}", AutoModel.from_pretrained, path, dtype=dtype,
                                 **kw)  # and weights missing from the checkpoint refused, never random
        except ModelLoadError as e:
            if isinstance(e.__cause__, OSError):  # not cached offline, no such repo, no weights in the folder
                raise FileNotFoundError(f"base model {info['base']!r} could not be loaded: {e.__cause__}") from e
            raise
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if info["adapters"]:
        merge_loras(model, info["adapters"])  # the chain in one rounding per weight
    if bidirectional:
        if info["random_init"]:  # the other path checked the config before its weights loaded
            check_architecture(model.config)
        make_bidirectional(model)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model.eval(), tok


def _device_list(device):
    return list(device) if isinstance(device, (list, tuple)) else None


def split_devices(model):
    """The devices of a model that a device map spread over more than one (accelerate's ``hf_device_map``, which
    ``device_map=`` sets), else None. Such a model is never moved whole: its layers' placement is the point."""
    placed = getattr(model, "hf_device_map", None) or {}
    devs = sorted({f"cuda:{v}" if isinstance(v, int) else str(v) for v in placed.values()})
    return devs if len(devs) > 1 else None


def _home(model):
    """The device a model's inputs go to: that of its first weight not offloaded (a device map that offloads to
    disk leaves the offloaded ones on ``meta``, and accelerate's hooks bring each in), else the CPU."""
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


def _placement(model, here, device, who):
    """Where ``model`` (now on ``here``, the device its inputs go to) runs when asked for ``device``: that device,
    moved there, unless a device map split it. A split model stays where it is for ``device`` None or the bare
    type of its first device (``"cuda"`` for one on cuda:0 and cuda:1, as llm2vec's default asks); any other
    device is a ValueError, since moving it whole undoes the split (and may not fit)."""
    if device is None:
        return here
    target = torch.device(device)
    split = split_devices(model)
    if split is None or target == here:
        return target
    if target.type == here.type and target.index is None:
        return here
    raise ValueError(f"{who}: the model is split across {split} by its device_map, so device={str(device)!r} would "
                     f"move it whole; leave device out (its inputs go to {here}), or load it without device_map")


_ATTENTION = ("auto", "triton", "torch")


@contextmanager
def _attention(impl):
    """The attention kernel ``impl`` while the block runs, the process-wide default it replaced afterwards: each
    Encoder encodes with its own, whichever was loaded last (None: the default, untouched)."""
    import llm2vec_kernels

    if impl is None:
        yield
        return
    before = llm2vec_kernels.get_default_impl("attention")
    llm2vec_kernels.set_default_impl("attention", impl)
    try:
        yield
    finally:
        llm2vec_kernels.set_default_impl("attention", before)


class Encoder:
    def __init__(self, model, tokenizer, pooling="mean", max_length=DEFAULT_MAX_LENGTH, instruction="", device=None,
                 doc_max_length=None, skip_instruction=True, chat=None, normalize=False, attention=None):
        """``attention``: the attention kernel this encoder's ``encode`` runs (auto, triton or torch), set around
        each call and restored after it; None follows the process-wide default (``llm2vec_kernels``), as a
        training run sets it."""
        if chat is not None and chat not in CHAT_WRAPS:
            raise ValueError(f"unknown chat wrapping {chat!r}; expected one of {sorted(CHAT_WRAPS)} or None")
        pooling = _pooling_mode(pooling)
        _positive_int("max_length", max_length)
        _positive_int("doc_max_length", doc_max_length, allow_none=True)
        if attention is not None and attention not in _ATTENTION:
            raise ValueError(f"unknown attention {attention!r}; expected one of {list(_ATTENTION)}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.pooling, self.max_length, self.default_instruction = pooling, max_length, instruction
        self.doc_max_length, self.skip_instruction, self.chat = doc_max_length, skip_instruction, chat
        self.normalize, self.attention = normalize, attention
        here = _home(model)
        self.device = _placement(model, here, device, "Encoder")
        if self.device != here:  # the weights go where the inputs will (a device_map model names its first device)
            self.model.to(self.device)
        self.last_stats = {}

    @classmethod
    def from_pretrained(cls, base_model_name_or_path, peft_model_name_or_path=None, *, pooling=None,
                        pooling_mode=None, max_length=None, doc_max_length=None, skip_instruction=None, device=None,
                        device_map=None, dtype="auto", torch_dtype=None, bidirectional=None, enable_bidirectional=None,
                        attention="auto", chat="auto", instruction=None, merge_peft=True, adapter=None, **model_kwargs):
        """llm2vec's signature plus the engine's options; ``model_kwargs`` go to ``AutoModel.from_pretrained``.

        ``chat="auto"`` follows the wrap the checkpoint records (an engine run: the one it trained with, none
        if it recorded none; an export: the one it encodes with) and, only for checkpoints without a record
        (published llm2vec ones), llm2vec's Instruct wrapping for the bases it names
        (``encoding.CHAT_WRAP_BY_BASE``); None / "none" disables it, or name a style from ``encoding.CHAT_WRAPS``.
        ``merge_peft`` must stay True: the encoder always folds adapters into the weights. A training run folder
        loads its ``best/`` adapter when it kept one (logged), ``adapter="last"`` its ``adapter/``.
        """
        if merge_peft is not True:
            raise TypeError("Encoder.from_pretrained: merge_peft=False is not supported (adapters are always merged "
                            "into the weights); engine.LLM2Vec keeps llm2vec's default")
        _positive_int("max_length", max_length, allow_none=True)
        for p in (pooling, pooling_mode):
            if p is not None:
                _pooling_mode(p)
        info = resolve_chain(base_model_name_or_path, peft_model_name_or_path, adapter=adapter)
        s = info["settings"]
        if isinstance(device_map, (str, torch.device)) and str(device_map) != "auto":
            device, device_map = device_map, None
        dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dt = resolve_dtype(torch_dtype if torch_dtype is not None else dtype, dev.type)
        if bidirectional is None:
            bidirectional = enable_bidirectional if enable_bidirectional is not None else s.get("bidirectional", True)
        if attention not in _ATTENTION:  # applied around each encode (Encoder.encode), not process-wide
            raise ValueError(f"unknown attention {attention!r}; expected one of {list(_ATTENTION)}")
        model, tok = load_encoder_model(info, dt, device_map=device_map, bidirectional=bidirectional, **model_kwargs)
        if device_map is None:
            model.to(dev)
        else:
            dev = None  # where the device map put it: Encoder takes its inputs' device from the model
        chat = chat_for(info, chat)
        pool = pooling or (_LLM2VEC_POOLING.get(pooling_mode, pooling_mode) if pooling_mode else None)
        enc = cls(model, tok, pooling=pool or s.get("pooling", "mean"),
                  max_length=max_length or s.get("max_length") or DEFAULT_MAX_LENGTH,
                  instruction=s.get("instruction", "") if instruction is None else instruction, device=dev,
                  doc_max_length=doc_max_length if doc_max_length is not None else s.get("doc_max_length"),
                  skip_instruction=skip_instruction if skip_instruction is not None else s.get("skip_instruction", True),
                  chat=chat, normalize=s.get("normalize", False), attention=attention)
        enc.train_max_length = s.get("train_max_length")
        enc.folder_prompts = s.get("prompts")  # an export's sentence-transformers prompts
        enc.source = {k: info[k] for k in ("base", "base_id", "adapters", "random_init", "gguf_file", "engine_meta",
                                           "selected")}
        return enc

    @property
    def prompts(self):
        """sentence-transformers' prompts, as that library loads them from the same folder: an export's own
        (``config_sentence_transformers.json``), else :func:`engine.task_instructions.mteb_prompts` of the default
        instruction (llm2vec's task prompts; ``query`` the default instruction, ``document`` none)."""
        from .task_instructions import mteb_prompts

        prompts = {**mteb_prompts(self.default_instruction), **(getattr(self, "folder_prompts", None) or {})}
        if self.default_instruction:  # from_pretrained(instruction=...) overrides the folder's
            prompts["query"] = instruction_prefix(self.default_instruction)
        return prompts

    def _split_inputs(self, sentences, instruction):
        """texts, per-text instructions: ``[[instruction, text], ...]`` (llm2vec) or plain strings."""
        texts, instrs = [], []
        for i, s in enumerate(sentences):
            if isinstance(s, str):
                texts.append(s)
                instrs.append(None)
            elif isinstance(s, (list, tuple)) and len(s) == 2 and all(isinstance(x, str) for x in s):
                instrs.append(s[0])
                texts.append(s[1])
            else:
                raise TypeError(f"encode: input {i} is {type(s).__name__} {str(s)[:60]!r}; expected a string or an "
                                f"[instruction, text] pair of strings")
        if isinstance(instruction, (list, tuple)):
            if len(instruction) != len(texts):
                raise ValueError(f"encode: {len(instruction)} instructions for {len(texts)} texts")
            glob = list(instruction)
        elif instruction is None or isinstance(instruction, str):
            glob = [instruction] * len(texts)
        else:
            raise TypeError(f"encode: instruction is {type(instruction).__name__}; expected a string or one per text")
        instrs = [i if i is not None else g for i, g in zip(instrs, glob)]
        for what, seq in (("input", texts), ("instruction", instrs)):
            for k, x in enumerate(seq):
                if x is not None and not isinstance(x, str):
                    raise TypeError(f"encode: {what} {k} is {type(x).__name__}; expected a string")
                if x and _SURROGATE.search(x):
                    raise ValueError(f"encode: {what} {k} contains a lone surrogate code point "
                                     f"(U+{ord(_SURROGATE.search(x).group()):04X}), which is not valid text: decode "
                                     f"your bytes with errors='replace' or fix the source")
        return texts, instrs

    def encode(self, sentences, prompt_name=None, prompt=None, batch_size=32, show_progress_bar=None,
               convert_to_numpy=True, convert_to_tensor=False, device=None, normalize_embeddings=False, *,
               instruction=None, normalize=None, max_length=None, padding_side="right", precision="float32"):
        """(N, H) float32 embeddings, numpy by default (a tensor with ``convert_to_tensor=True``), in input order.

        sentence-transformers' arguments: ``prompt`` (an instruction string) or ``prompt_name`` (a key of
        ``self.prompts``), ``batch_size``, ``show_progress_bar`` (None: on for more than 1000 texts),
        ``convert_to_numpy`` / ``convert_to_tensor``, ``normalize_embeddings``, ``device`` (a list such as
        ``["cuda:0", "cuda:1"]`` runs one process per device). ``instruction`` is the engine's name for
        ``prompt`` (one string or one per text); ``[[instruction, text], ...]`` inputs work as in llm2vec.
        Instructions are attended but not pooled. Any other keyword is a TypeError.
        Truncated / empty-after-instruction counts land in ``self.last_stats`` (and a warning).
        """
        if precision not in ("float32", None):
            raise ValueError(f"encode: precision={precision!r} is not supported (float32 only)")
        if prompt is not None and instruction is not None:
            raise ValueError("encode: give prompt= or instruction=, not both")
        if prompt_name is not None:
            if prompt is not None or instruction is not None:
                raise ValueError("encode: give prompt_name= or prompt=/instruction=, not both")
            if prompt_name not in self.prompts:
                raise ValueError(f"encode: unknown prompt_name {prompt_name!r}; this model has {sorted(self.prompts)}")
            instruction = self.prompts[prompt_name]
        elif prompt is not None:
            instruction = prompt
        _positive_int("batch_size", batch_size)
        _positive_int("max_length", max_length, allow_none=True)
        if padding_side not in ("left", "right"):
            raise ValueError(f"encode: padding_side={padding_side!r}; expected 'left' or 'right'")
        if isinstance(device, (list, tuple)) and not device:
            raise ValueError("encode: device=[] names no device; give a device, a list of devices, or None")
        if isinstance(sentences, (dict, set, frozenset, bytes, bytearray)) or not (
                isinstance(sentences, str) or hasattr(sentences, "__iter__")):
            raise TypeError(f"encode: sentences is {type(sentences).__name__}; expected a string or a list of strings "
                            f"(or of [instruction, text] pairs)")
        single = isinstance(sentences, str)
        items = [sentences] if single else list(sentences)
        if not items:
            raise ValueError("encode: empty list of texts")
        texts, instrs = self._split_inputs(items, instruction)
        instrs = [self.default_instruction if i is None else i for i in instrs]
        stats = {"truncated": 0, "empty": 0, "doc_truncated": 0, "doc_cut_to_tokens": 0}
        if self.doc_max_length:
            texts, stats["doc_truncated"] = truncate_words(self.tokenizer, texts, self.doc_max_length, stats)
        if show_progress_bar is None:
            show_progress_bar = len(texts) > 1000
        devices = _device_list(device)
        kw = dict(pooling=self.pooling, max_len=max_length or self.max_length, batch_size=batch_size,
                  padding_side=padding_side, chat=self.chat, skip_instruction=self.skip_instruction)
        if devices and len(devices) > 1:
            from .multi_device import encode_multi_device

            split = split_devices(self.model)
            if split:
                raise ValueError(f"encode: the model is split across {split} by its device_map; device={devices} "
                                 f"would copy it whole to each device; leave device out, or load it without "
                                 f"device_map")

            with _attention(self.attention):  # the workers take this encoder's kernel
                emb = encode_multi_device(self, texts, instrs, devices, kw, stats, show_progress_bar)
        else:
            model = self.model
            if devices or device is not None:
                target = _placement(self.model, self.device, devices[0] if devices else device, "encode")
                if target != self.device:
                    self.model.to(target)
                    self.device = target
            with _attention(self.attention):
                emb = encode_texts(model, self.tokenizer, texts, instruction=instrs, device=self.device,
                                   show_progress_bar=show_progress_bar, stats=stats, **kw)
        self.last_stats = stats
        if stats["truncated"] or stats["doc_truncated"] or stats["empty"]:
            logger.warning("encode: %d of %d texts truncated to %d tokens, %d cut to doc_max_length=%s tokens (%d of "
                           "them, with no whole word within it, to their first tokens), %d blank (embedded by their "
                           "EOS token)", stats["truncated"], len(texts), kw["max_len"], stats["doc_truncated"],
                           self.doc_max_length, stats["doc_cut_to_tokens"], stats["empty"])
        if normalize_embeddings or normalize or (normalize is None and self.normalize):
            # in place, as torch.nn.functional.normalize computes it: no second (N, H) copy
            emb.div_(emb.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        if single:
            emb = emb[0]
        if convert_to_tensor or not convert_to_numpy:
            return emb
        return emb.numpy() if emb.dtype == torch.float32 else emb.float().numpy()  # fp32 already: no copy

    def similarity(self, a, b):
        """Cosine of every row of ``a`` with every row of ``b``: an (N, M) tensor, as
        ``sentence_transformers.util.cos_sim`` (a 1-D embedding is one row). Unit rows in fp32 (bf16 would round
        the dot products), then one matrix product: no N x M x H intermediate."""
        a = torch.nn.functional.normalize(torch.atleast_2d(torch.as_tensor(a)).float(), dim=-1)
        b = torch.nn.functional.normalize(torch.atleast_2d(torch.as_tensor(b)).float(), dim=-1)
        return a @ b.to(a.device).T

"""Typed run configuration: YAML files mapped onto dataclasses, with ``key=value`` overrides.

    cfg = load_config("configs/smollm2-135m/mntp.yaml", ["max_steps=20", "lora.r=8", "data=a.txt"])

Unknown keys are errors that name the key and suggest close matches. The DeepSpeed dict is built
from the config (``deepspeed_config``); nothing is left as "auto".
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import typing
from dataclasses import dataclass, field

import yaml

from .chat import CHAT_SETTINGS

STAGES = ("mntp", "simcse", "supervised")
RESUME_MODES = ("auto", "never", "must", "force")
RECOMPUTE_POLICIES = ("auto", "full", "selective", "none")
# (YAML 1.1 reads on/off in a file as booleans: an override means the same)
RECOMPUTE_ALIASES = {"true": "full", "1": "full", "yes": "full", "on": "full",
                     "false": "none", "0": "none", "no": "none", "off": "none"}


class ConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    name_or_path: str = ""  # hub id, local HF folder, GGUF folder/file, or an alias such as "smollm2-135m"
    gguf_file: typing.Optional[str] = None  # GGUF file name inside name_or_path (or a full path)
    tokenizer: typing.Optional[str] = None  # defaults to the model's own
    random_init: typing.Optional[dict] = None  # transformers config kwargs (with model_type): random weights, tests only
    dtype: str = "auto"  # auto (bf16 on CUDA from Ampere, fp16 on older GPUs, fp32 on CPU) | bf16 | fp16 | fp32
    bidirectional: bool = True
    attention: str = "auto"  # attention kernel: auto (Triton on CUDA, torch on CPU) | triton | torch
    loss: str = "auto"  # masked-CE / contrastive kernels: auto | triton | torch
    fused_ops: str = "auto"  # fused decoder-layer ops (LoRA projections, RMSNorm, RoPE, GLU): auto (Triton on CUDA, torch on CPU) | triton | torch
    attention_dropout: float = 0.0  # dropout on attention probabilities (SimCSE uses 0.3)
    # false: the Triton backward adds dQ with fp32 atomics (fewer matmuls, run-to-run bitwise differences,
    # so resumed runs match to rounding rather than exactly)
    deterministic_attention: bool = True
    # recompute policy: auto (least recompute that fits the memory plan; full on CPU) | full | selective (keep GEMM
    # and attention outputs, recompute elementwise ops) | none; true/false are read as full/none
    gradient_checkpointing: str = "auto"
    adapters: typing.List[str] = field(default_factory=list)  # earlier stages' adapters, merged in order
    trust_remote_code: bool = False


@dataclass
class LoraConfig:
    enabled: bool = True  # false: full fine-tuning, for --dry-run's memory plan only (a run refuses it)
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: typing.List[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@dataclass
class MNTPConfig:
    mask_prob: float = 0.2
    scheme: str = "bert"  # bert: 80% mask token / 10% random / 10% unchanged;  all: always the mask token
    mask_token: str = "_"  # "_" (a blank token), "eos", "<mask>" (added to the vocab), or any single token
    z_loss: float = 0.0
    # true: documents (stripped lines, blank ones dropped) joined with EOS and cut into max_seq_len blocks, each
    # block starting with the encoder's special prefix (llm2vec's run_mntp.py also concatenates and cuts at 512, but
    # tokenises each raw line with its BOS and newline and joins them with no EOS); false: one row per document
    # (special prefix, the text cut to fit, EOS), padded: the rows look as encode() sees a text
    pack: bool = True


@dataclass
class ContrastiveConfig:
    # InfoNCE temperature; unset: 0.05 for SimCSE (llm2vec's SimCSE scale 20), 0.02 for supervised (llm2vec's
    # default loss scale 50 = 1 / 0.02)
    temperature: typing.Optional[float] = None
    # supervised stage only: infonce (query, positive, hard negatives) | cosent | angle (graded scores: every
    # STS-style pair with its score; engine/losses.py)
    loss: str = "infonce"
    loss_scale: float = 20.0  # cosent/angle: lambda = 1/tau on cosine (and angle) differences (CoSENT, AnglE use 20)
    angle_weights: typing.List[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])  # angle: w_cos, w_ibn, w_angle
    positive_min_score: float = 4.0  # angle's in-batch-negative term: pairs scoring >= this are positives
    pooling: str = "mean"  # mean | weighted_mean | eos | last | bos
    max_len: int = 128  # query / sentence max tokens
    doc_max_len: typing.Optional[int] = None  # positives/negatives; defaults to max_len
    instruction: str = ""  # default instruction for queries when the data has none
    num_hard_negatives: int = 1
    gather_across_ranks: bool = True
    grad_cache_chunk: int = 0  # >0: gradient caching with this many texts per chunk
    mask_false_negatives: bool = False  # infonce: a copy of a query's positive text is no negative of it (README)
    source_homogeneous_batches: bool = True
    # chat wrap of every text (query, positive, negatives): auto (llm2vec's: its supervised stage wraps the Instruct
    # bases it names, SimCSE never) | none | llama3 | inst | gemma2 | qwen2 (engine/chat.py CHAT_WRAPS); the
    # run records it and inference follows the record
    chat: str = "auto"


@dataclass
class TrainConfig:
    stage: str = "mntp"
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    mntp: MNTPConfig = field(default_factory=MNTPConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    data: typing.List[str] = field(default_factory=list)  # local files or hf:NAME[:CONFIG[:SPLIT]]
    eval_data: typing.List[str] = field(default_factory=list)
    max_samples: int = 0  # >0: use only the first N documents/examples (quick runs)
    output_dir: str = "outputs/run"
    max_seq_len: int = 512  # MNTP's block / text length (contrastive stages cut texts at contrastive.max_len)
    batch_size: int = 32  # global batch per optimizer step
    micro_batch_size: int = 4  # per rank per forward
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_betas: typing.List[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    # linear | cosine (decay to 0 at max_steps) | constant | constant_with_warmup (warmup_steps, then the peak LR)
    lr_schedule: str = "linear"
    max_steps: int = 1000
    # the step at which linear/cosine reach 0; 0 means max_steps. llm2vec's HF Trainer decays over its epochs
    # and stops early (stop_after_n_steps), so its LR at the last step is still near the peak
    lr_decay_steps: int = 0
    # the same horizon counted in epochs of the training data (llm2vec's num_train_epochs), resolved to steps once
    # the data is read: ceil(epochs x global batches per epoch); 0 means unset. Set one of the two, not both
    lr_decay_epochs: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    log_every: int = 1
    eval_every: int = 0
    eval_batches: int = 20
    eval_sts_pairs: int = 500  # an STS eval_data file: score N pairs, genres in turn (dev Spearman, best/ selection)
    save_every: int = 0  # 0: save only at the end
    keep_checkpoints: int = 2
    logger: str = "csv"  # csv | tensorboard | both: metrics.csv is always written; tensorboard and both add TensorBoard
    # auto: stage 0 (replicated base, data parallel) when the base + planned activations fit one device's memory,
    # else ZeRO-3; or 0 | 1 | 2 | 3 explicitly. See engine/memory.py.
    zero_stage: str = "auto"
    # GiB per rank the memory plan may use; 0 = ask the device (GPU: its memory; CPU: host RAM / local ranks)
    memory_budget_gb: float = 0.0
    offload_optimizer: bool = False
    offload_params: bool = False
    progress_bar: bool = True
    # auto: resume a checkpoint in output_dir only if it is the same run (same fingerprint), else refuse;
    # never: refuse an output_dir that holds a previous run (checkpoints, adapter/, best/, metrics.csv); must: refuse
    # to start without a checkpoint; force: resume the newest checkpoint even if the run differs (the new config's
    # schedule is applied), or start over in a folder whose run left no checkpoint
    resume: str = "auto"
    max_nonfinite_steps: int = 3  # stop (exit 3) after this many non-finite steps in a row


# A number in JSON and YAML 1.2 that PyYAML (YAML 1.1) leaves a string: an exponent without a dot or without a sign
# (1e-06, 1.0e5). Typed keys convert it anyway; an untyped mapping's values (model.random_init) are read by this.
_EXP_NUMBER = re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$")


def _yaml12_numbers(value):
    """An untyped mapping's values (recursively; keys untouched): exponent numbers PyYAML left as strings -> float."""
    if isinstance(value, dict):
        return {k: _yaml12_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_yaml12_numbers(v) for v in value]
    if isinstance(value, str) and _EXP_NUMBER.match(value.strip()):
        return float(value)
    return value


def _optional_of(tp):
    """X for ``Optional[X]``, else None."""
    if typing.get_origin(tp) is typing.Union:
        return [a for a in typing.get_args(tp) if a is not type(None)][0]
    return None


def _coerce(value, tp, key):
    inner = _optional_of(tp)
    if inner is not None:
        return None if value is None else _coerce(value, inner, key)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (list, typing.List):
        if isinstance(value, str):  # comma-separated items, in a file as in an override (a YAML list keeps commas)
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        return [_coerce(v, args[0], key) if args else v for v in value]
    if origin in (dict, typing.Dict) or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' expects a mapping, got {value!r}")
        return _yaml12_numbers(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):  # YAML's 0 / 1, read as the override's "0" / "1" are
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            return value.strip().lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"config key '{key}' expects true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            f = float(value)
        except ValueError:
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}") from None
        if not math.isfinite(f) or f != int(f):
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
        if abs(f) >= 2 ** 53:  # a float this large no longer holds every integer: read the digits themselves
            try:
                return int(str(value).strip())
            except ValueError:
                raise ConfigError(f"config key '{key}' expects an integer, got {value!r}") from None
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' expects a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}' expects a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, bool) and key == "model.gradient_checkpointing":  # true/false: RECOMPUTE_ALIASES
            return str(value).lower()
        if isinstance(value, bool):  # YAML 1.1 reads an unquoted yes/no/on/off/true/false as a boolean
            raise ConfigError(f"config key '{key}' expects a string, got the boolean {value!r}: quote it in YAML")
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
        return "" if value is None else str(value)
    return value


def _fields(cls):
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown(key, known, prefix, cls=None):
    if not isinstance(key, str):  # YAML reads `1:`, `null:` or 1.1's `on:` / `no:` as a number, None or a bool
        return ConfigError(f"config key {prefix}{key!r} is not a name (a {type(key).__name__}; quote it if meant) "
                           f"(valid: {', '.join(sorted(known))})")
    # a section's key given at this level (temperature= for contrastive.temperature): name it there first
    sections = [name for name, tp in (_fields(cls).items() if cls is not None else ())
                if dataclasses.is_dataclass(tp) and key in _fields(tp)]
    if sections:
        return ConfigError(f"unknown config key '{prefix}{key}'; did you mean "
                           f"{', '.join(repr(prefix + s + '.' + key) for s in sections)}?")
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(prefix + c) for c in close)}?" if close else ""
    return ConfigError(f"unknown config key '{prefix}{key}'{hint} (valid: {', '.join(sorted(known))})")


def _build(cls, raw, prefix=""):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {raw!r}")
    hints = _fields(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in hints:
            raise _unknown(key, list(hints), prefix, cls)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, prefix + key + ".")
        else:
            kwargs[key] = _coerce(value, tp, prefix + key)
    return cls(**kwargs)


def _set_dotted(raw, dotted, text, cls):
    """Apply the override ``dotted=text`` to the raw config mapping, reading ``text`` by the key's type
    (:func:`_override_value`); a whole section given as a YAML mapping is merged into the file's section, and so is a
    mapping key's (``model.random_init``) unless it names another ``model_type``."""
    parts = dotted.split(".")
    node, node_cls, prefix = raw, cls, ""
    for i, part in enumerate(parts):
        hints = _fields(node_cls)
        if part not in hints:
            raise _unknown(part, list(hints), prefix, node_cls)
        if i == len(parts) - 1:
            tp = hints[part]
            value = _yaml_value(dotted, text) if dataclasses.is_dataclass(tp) else _override_value(dotted, text, tp)
            old = node.get(part)
            if isinstance(value, dict) and isinstance(old, dict) and \
                    value.get("model_type", old.get("model_type")) == old.get("model_type"):
                value = _merged(old, value)  # another family's random_init replaces: its keys are the other's
            node[part] = value
            return
        if not dataclasses.is_dataclass(hints[part]):
            raise ConfigError(f"config key '{prefix}{part}' is not a section; cannot set '{dotted}'")
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
        node_cls, prefix = hints[part], prefix + part + "."


def _merged(base, update):
    """``base`` with ``update``'s keys set, nested mappings merged the same way (a section override keeps the
    file's other keys)."""
    out = dict(base)
    for k, v in update.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


_NULL = ("null", "~")


def _override_value(key, text, tp):
    """An override's text read by its key's type, not by YAML 1.1's guesses:

    * a string is the text as given (an instruction ending in ": ", ``[MASK]``, ``no``, ``*``), or a quoted YAML
      string (``''`` is empty);
    * a number or a boolean is read from the text by :func:`_coerce` (``010`` is 10, ``1:30`` and ``true`` are not
      numbers);
    * a list is a YAML flow list (``[a, b]``) or comma-separated items (``q_proj,v_proj``, ``0.9,0.98``);
    * a mapping (``model.random_init``) is YAML, merged into the file's mapping as a section's override is
      (``model.random_init={num_hidden_layers: 4}`` keeps the file's other keys; one naming another
      ``model_type`` replaces it: the file's keys belong to the other family);
    * ``null`` or ``~`` unsets an optional key.
    """
    stripped = text.strip()
    inner = _optional_of(tp)
    if inner is not None:
        if stripped.lower() in _NULL:
            return None
        tp = inner
    origin = typing.get_origin(tp)
    if tp is str:
        if len(stripped) >= 2 and stripped[0] == stripped[-1] and stripped[0] in "'\"":  # a quoted YAML string
            value = _yaml_value(key, stripped)
            if isinstance(value, str):
                return value
        return text
    if origin in (list, typing.List):
        if stripped.startswith("["):
            return _yaml_value(key, text)
        return [v.strip() for v in stripped.split(",") if v.strip()]
    if origin in (dict, typing.Dict) or tp is dict:
        return _yaml_value(key, text)
    return stripped


class _DuplicateKey(Exception):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping: PyYAML keeps the last silently, so a second
    ``lora:`` block at the bottom of a recipe would drop the first block's keys back to their defaults."""


def _unique_mapping(loader, node):
    seen = {}
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
            key = loader.construct_object(key_node)
            if key in seen:
                raise _DuplicateKey(f"key {key!r} appears twice in one mapping (lines {seen[key]} and "
                                    f"{key_node.start_mark.line + 1})")
            seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:map", _unique_mapping)


def safe_load_unique(stream):
    """``yaml.safe_load`` (plain data only) that raises on a repeated key (see :class:`_UniqueKeyLoader`)."""
    return yaml.load(stream, Loader=_UniqueKeyLoader)


def _yaml_value(key, text):
    try:
        return safe_load_unique(text) if text.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}={text!r}: the value is not valid YAML: {_yaml_error(e)}") from None
    except _DuplicateKey as e:
        raise ConfigError(f"override {key}={text!r}: {e}") from None
    except RecursionError:
        raise ConfigError(f"override {key}: the value is nested too deeply") from None


def parse_overrides(items):
    """[(key, text)] of ``key=value`` overrides; each text is read by its key's type in :func:`_set_dotted`."""
    out = []
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, value = item.split("=", 1)
        out.append((key.strip(), value))
    return out


def _yaml_error(e):
    mark = getattr(e, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    what = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
    return f"{what}{where}"


def _read_yaml(path):
    """The YAML document in ``path`` (plain data only: safe_load); ConfigError for anything else."""
    try:
        with open(path, encoding="utf-8") as f:
            return safe_load_unique(f) or {}
    except _DuplicateKey as e:
        raise ConfigError(f"config file {path}: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except yaml.constructor.ConstructorError as e:  # e.g. !!python/object: safe_load builds plain data only
        raise ConfigError(f"config file {path} holds a tag that is not plain data: {_yaml_error(e)}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_error(e)}") from None
    except RecursionError:
        raise ConfigError(f"config file {path} is nested too deeply") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory") from None
    except OSError as e:  # permission denied, an I/O error: one line naming the file and the reason
        raise ConfigError(f"config file {path} cannot be read: {e.strerror or e}") from None


def json_loads(text, where, error=ConfigError):
    """``json.loads(text)`` with one-line errors raised as ``error`` naming ``where``: invalid JSON, and JSON
    nested too deeply for the parser (100k brackets: a RecursionError). For data readers (engine.data) as much
    as for config files."""
    import json

    try:
        return json.loads(text)
    except RecursionError:
        raise error(f"{where}: JSON nested too deeply to parse") from None
    except json.JSONDecodeError as e:
        raise error(f"{where}: invalid JSON ({e.msg})") from None


def load_config(path=None, overrides=()):
    raw = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        raw = _read_yaml(path)
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    for key, text in parse_overrides(overrides):
        _set_dotted(raw, key, text, TrainConfig)
    cfg = _build(TrainConfig, raw)
    validate(cfg)
    check_output_dir(cfg.output_dir)
    return cfg


def check_model_names(cfg):
    """Every model name a run loads (base, tokenizer, prior adapters) read by :mod:`engine.refs`: one that is neither
    an alias, a local path nor a hub id is said now, before any folder, data or model (a random-init run would
    otherwise train and fail at its first checkpoint). A dry run does not call this: it plans configs whose prior
    adapters are made by earlier stages."""
    from . import refs

    m = cfg.model
    names = [("model.name_or_path", m.name_or_path), ("model.tokenizer", m.tokenizer)]
    names += [(f"model.adapters[{i}]", a) for i, a in enumerate(m.adapters or [])]
    for key, name in names:
        if name and refs.kind(name) == "missing":
            raise ConfigError(f"{key}: {refs.not_found(name)}")


def check_output_dir(path):
    """``output_dir`` must name a folder that exists or can be created: not '', a file, or a dangling link."""
    if not path or not path.strip():
        raise ConfigError("output_dir is empty: name the run's folder")
    if os.path.islink(path) and not os.path.exists(path):
        raise ConfigError(f"output_dir {path} is a symbolic link to {os.readlink(path)}, which does not exist")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"output_dir {path} is a file, not a folder")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):  # the nearest existing ancestor must be a folder we can create in
        if os.path.islink(parent):
            raise ConfigError(f"output_dir {path}: {parent} is a symbolic link to {os.readlink(parent)}, which "
                              f"does not exist")
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"output_dir {path}: {parent} is not a folder")


def false_negatives_error(c):
    """Why ``contrastive.mask_false_negatives`` cannot act with section ``c``'s loss (None where it can): it leaves
    copies of a query's positive out of InfoNCE's negatives, and a graded loss has no such positive."""
    if c.mask_false_negatives and c.loss != "infonce":
        return (f"contrastive.mask_false_negatives leaves copies of a query's positive out of InfoNCE's negatives; "
                f"contrastive.loss={c.loss} ranks scored pairs and has no such positive: set "
                f"contrastive.mask_false_negatives=false (or contrastive.loss=infonce)")
    return None


def stage_temperature(stage):
    """contrastive.temperature when the config leaves it unset: llm2vec's defaults, SimCSE scale 20, supervised 50."""
    return 0.02 if stage == "supervised" else 0.05


def validate(cfg: TrainConfig):
    if cfg.stage not in STAGES:
        raise ConfigError(f"stage must be one of {STAGES}, got {cfg.stage!r}")
    if not cfg.model.name_or_path and not cfg.model.random_init:
        raise ConfigError("model.name_or_path is required (or model.random_init for a random test model)")
    # "~" in a path from the YAML file is the user's home, as the shell makes it of a command-line override (a
    # literal "~" folder in the working directory is a trap)
    cfg.output_dir = os.path.expanduser(cfg.output_dir)
    cfg.data, cfg.eval_data = ([os.path.expanduser(p) for p in paths] for paths in (cfg.data, cfg.eval_data))
    cfg.model.adapters = [os.path.expanduser(p) for p in cfg.model.adapters]
    gc = cfg.model.gradient_checkpointing
    cfg.model.gradient_checkpointing = RECOMPUTE_ALIASES.get(str(gc).lower(), str(gc))
    cfg.zero_stage = str(cfg.zero_stage)
    for key, allowed in (("model.attention", ("auto", "triton", "torch")), ("model.loss", ("auto", "triton", "torch")),
                         ("model.fused_ops", ("auto", "triton", "torch")),
                         ("model.gradient_checkpointing", RECOMPUTE_POLICIES),
                         ("zero_stage", ("auto", "0", "1", "2", "3")),
                         ("model.dtype", ("auto", "bf16", "fp16", "fp32")),
                         ("lr_schedule", ("linear", "cosine", "constant", "constant_with_warmup")),
                         ("contrastive.loss", ("infonce", "cosent", "angle")),
                         ("logger", ("csv", "tensorboard", "both")),
                         ("mntp.scheme", ("bert", "all")),
                         ("contrastive.pooling", ("mean", "weighted_mean", "eos", "last", "bos")),
                         ("contrastive.chat", CHAT_SETTINGS)):
        obj = cfg
        for part in key.split("."):
            obj = getattr(obj, part)
        if obj not in allowed:
            raise ConfigError(f"{key} must be one of {allowed}, got {obj!r}")
    if cfg.resume not in RESUME_MODES:
        raise ConfigError(f"resume must be one of {RESUME_MODES}, got {cfg.resume!r}")
    c = cfg.contrastive
    if c.temperature is None:
        c.temperature = stage_temperature(cfg.stage)
        c._temperature_of_stage = True  # (not a field: --print-config prints it unset, see printable)
    if cfg.lora.enabled and not cfg.lora.target_modules:
        raise ConfigError("lora.target_modules is empty: name the projections to adapt (e.g. q_proj, v_proj)")
    if c.loss not in ("infonce", "cosent", "angle"):
        raise ConfigError(f"contrastive.loss must be one of ('infonce', 'cosent', 'angle'), got {c.loss!r}")
    if c.loss != "infonce" and cfg.stage != "supervised":
        raise ConfigError(f"contrastive.loss={c.loss} trains on scored pairs: use it with stage: supervised "
                          f"(stage {cfg.stage} uses infonce)")
    refused = false_negatives_error(c)
    if refused:
        raise ConfigError(refused)
    if len(c.angle_weights) != 3 or any(w < 0 for w in c.angle_weights) or not any(c.angle_weights):
        raise ConfigError(f"contrastive.angle_weights must be 3 non-negative weights (cos, ibn, angle), not all 0, "
                          f"got {c.angle_weights}")
    _check_numbers(cfg)


def _walk_numbers(obj, prefix=""):
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            yield from _walk_numbers(v, prefix + f.name + ".")
        elif isinstance(v, float) or (isinstance(v, list) and v and all(isinstance(x, float) for x in v)):
            yield prefix + f.name, v


# key: (low, high, low inclusive, high inclusive, what the error says); None means unbounded
_RANGES = {
    "learning_rate": (0.0, None, False, False, "a positive number"),
    "weight_decay": (0.0, None, True, False, ">= 0"),
    "max_grad_norm": (0.0, None, False, False, "> 0 (gradient clipping cannot be switched off)"),
    "mntp.mask_prob": (0.0, 1.0, False, False, "in (0, 1)"),
    "mntp.z_loss": (0.0, None, True, False, ">= 0"),
    "model.attention_dropout": (0.0, 1.0, True, False, "in [0, 1)"),
    "lora.dropout": (0.0, 1.0, True, False, "in [0, 1)"),
    "lora.alpha": (0, None, False, False, "positive"),
    "contrastive.temperature": (0.0, None, False, False, "a positive number"),
    "contrastive.loss_scale": (0.0, None, False, False, "a positive number"),
    "eval_sts_pairs": (1, None, True, False, ">= 1"),
    "batch_size": (1, None, True, False, ">= 1"),
    "micro_batch_size": (1, None, True, False, ">= 1"),
    "max_steps": (1, None, True, False, ">= 1"),
    "max_seq_len": (2, None, True, False, ">= 2"),
    "contrastive.max_len": (2, None, True, False, ">= 2"),
    "lora.r": (1, None, True, False, ">= 1"),
    "max_samples": (0, None, True, False, ">= 0 (0 keeps everything)"),
    "warmup_steps": (0, None, True, False, ">= 0"),
    "lr_decay_steps": (0, None, True, False, ">= 0 (0: decay over max_steps)"),
    "lr_decay_epochs": (0.0, None, True, False, ">= 0 (0: unset)"),
    "log_every": (1, None, True, False, ">= 1"),
    "eval_every": (0, None, True, False, ">= 0 (0: no periodic eval)"),
    "eval_batches": (1, None, True, False, ">= 1"),
    "save_every": (0, None, True, False, ">= 0 (0: save only at the end)"),
    "keep_checkpoints": (0, None, True, False, ">= 0 (0 keeps all)"),
    "seed": (0, 2 ** 63, True, False, ">= 0 and < 2**63 (torch.manual_seed's range)"),
    "max_nonfinite_steps": (1, None, True, False, ">= 1"),
    "memory_budget_gb": (0.0, None, True, False, ">= 0 (0: ask the device)"),
    "contrastive.num_hard_negatives": (0, None, True, False, ">= 0"),
    "contrastive.grad_cache_chunk": (0, None, True, False, ">= 0 (0: no gradient caching)"),
}


def _check_numbers(cfg):
    for key, v in _walk_numbers(cfg):  # every float (and list of floats) must be finite
        if any(not math.isfinite(x) for x in (v if isinstance(v, list) else [v])):
            raise ConfigError(f"{key} must be a finite number, got {v}")
    for key, (lo, hi, lo_inc, hi_inc, what) in _RANGES.items():
        obj = cfg
        for part in key.split("."):
            obj = getattr(obj, part)
        ok = (lo is None or (obj >= lo if lo_inc else obj > lo)) and (hi is None or (obj <= hi if hi_inc else obj < hi))
        if not ok:
            raise ConfigError(f"{key} must be {what}, got {obj}")
    if cfg.lr_decay_steps and cfg.lr_decay_epochs:
        raise ConfigError(f"set lr_decay_steps ({cfg.lr_decay_steps}) or lr_decay_epochs ({cfg.lr_decay_epochs:g}), "
                          f"not both: they are the same horizon, in steps or in epochs of the data (to replace "
                          f"one a config sets, add lr_decay_epochs=0 or lr_decay_steps=0)")
    c = cfg.contrastive
    if c.doc_max_len is not None and c.doc_max_len < 2:
        raise ConfigError(f"contrastive.doc_max_len must be >= 2 (or unset), got {c.doc_max_len}")
    if len(cfg.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.adam_betas):
        raise ConfigError(f"adam_betas must be two numbers in [0, 1), got {cfg.adam_betas}")
    if cfg.model.dtype == "fp16" and str(cfg.zero_stage) == "0":
        raise ConfigError(FP16_STAGE0)


# DeepSpeed (0.19) scales the loss in engine.backward only for its ZeRO optimizers: at stage 0 its fp16 optimizer
# (FP16_UnfusedOptimizer) still divides the gradients by the loss scale, so every update came out 2^16 times too
# small, with the clip never reached and small fp16 gradients underflowing. Stages 1-3 scale and unscale alike.
FP16_STAGE0 = ("model.dtype=fp16 needs zero_stage 1, 2, 3 or auto (which picks 1 for fp16): at stage 0 DeepSpeed's "
               "fp16 optimizer unscales gradients it never scaled, so every update would be 2^16 times too small")


def offload_warning(cfg: TrainConfig, stage):
    """A warning (or None) when offload_params is set but the ZeRO stage keeps whole parameters on every GPU, or
    offload_optimizer at stage 0: DeepSpeed offloads parameters only under ZeRO-3 and the optimizer state only under
    stages 1-3 (deepspeed_config leaves each setting out below its stages)."""
    if cfg.offload_params and int(stage) < 3:
        return (f"offload_params is set, but ZeRO stage {stage} keeps the parameters on the GPU: DeepSpeed offloads "
                f"them only under ZeRO-3 (zero_stage=3)")
    if cfg.offload_optimizer and int(stage) < 1:
        return ("offload_optimizer is set, but ZeRO stage 0 keeps the optimizer state on the GPU: DeepSpeed offloads "
                "it only under ZeRO stages 1-3 (zero_stage=1)")
    return None


def negatives_warning(cfg: TrainConfig, world_size: int):
    """A loud warning (or None) when a contrastive loss would see fewer in-batch negatives than the global batch:
    each loss covers one micro-batch (x ranks when gathered), so accumulation splits the batch's negatives."""
    if cfg.stage == "mntp":
        return None
    accum = grad_accum_steps(cfg, world_size)
    gathered = cfg.contrastive.gather_across_ranks or world_size == 1
    if accum == 1 and gathered:
        return None
    seen = cfg.micro_batch_size * (world_size if gathered else 1)
    fixes = [] if gathered else ["set contrastive.gather_across_ranks=true"]
    if accum > 1:
        fixes.append(f"set micro_batch_size={cfg.batch_size // world_size} with gradient caching "
                     f"(contrastive.grad_cache_chunk > 0 bounds the activation memory)")
    return (f"each contrastive loss sees the in-batch negatives of {seen} examples, not the global batch "
            f"of {cfg.batch_size} (micro_batch_size {cfg.micro_batch_size} x {world_size} rank(s), {accum} "
            f"accumulation steps{'' if gathered else ', gather_across_ranks off'}). For the whole batch "
            f"{' and '.join(fixes)}")


def eval_warning(cfg: TrainConfig):
    """A warning (or None) when ``eval_data`` is given but the run would not score it where ``engine.pick`` and
    ``best/`` need it: never (``eval_every`` 0, or above ``max_steps``), or not at the last step (``eval_every``
    not dividing ``max_steps``, which pick refuses). Not an error: a smoke run of a recipe config is short on
    purpose."""
    e, m = cfg.eval_every, cfg.max_steps
    if not cfg.eval_data:
        return None
    if not e:
        return "eval_data is set but eval_every is 0: the run never evaluates (no dev curve, no best/); set eval_every"
    if e > m:
        return (f"eval_every {e} > max_steps {m}: the run never evaluates eval_data (no dev curve, no best/); set "
                f"eval_every <= max_steps")
    if m % e:
        return (f"eval_every {e} does not divide max_steps {m}: the last evaluation is at step {m - m % e}, steps "
                f"{m - m % e + 1}-{m} are never scored, and engine.pick refuses a run with no score at its last step")
    return None


def dropout_warning(cfg: TrainConfig):
    """A warning (or None) when a SimCSE run has no dropout at all: its two views of a sentence are then the same
    forward, the positive pair is trivially identical, and the loss teaches nothing but to spread the batch apart."""
    if cfg.stage != "simcse":
        return None
    lora_dropout = cfg.lora.dropout if cfg.lora.enabled else 0.0
    if lora_dropout > 0 or cfg.model.attention_dropout > 0:
        return None
    return ("SimCSE with no dropout (model.attention_dropout 0 and no LoRA dropout): the two views of each sentence "
            "are the same forward, so each positive pair is identical; set model.attention_dropout (LLM2Vec uses "
            "0.3) or lora.dropout")


def grad_accum_steps(cfg: TrainConfig, world_size: int) -> int:
    """batch_size / (micro_batch_size x world_size); a ConfigError naming what keeps batch_size (the recipe's global
    batch) when they do not divide it: the micro-batch sizes that would, or that this many ranks cannot."""
    per_step = cfg.micro_batch_size * world_size
    if cfg.batch_size % per_step != 0:
        head = (f"batch_size {cfg.batch_size} is not divisible by micro_batch_size {cfg.micro_batch_size} x world "
                f"size {world_size} = {per_step}")
        if cfg.batch_size % world_size:
            ranks = [w for w in range(1, 2 * world_size + 1) if cfg.batch_size % w == 0]
            raise ConfigError(f"{head}: {world_size} ranks cannot share a batch of {cfg.batch_size} (rank counts "
                              f"that can, up to {2 * world_size}: {', '.join(map(str, ranks))}); run on one of "
                              f"those or change batch_size, which changes the recipe")
        per_rank = cfg.batch_size // world_size
        fits = [m for m in range(1, per_rank + 1) if per_rank % m == 0]
        raise ConfigError(f"{head}; to keep batch_size {cfg.batch_size}, micro_batch_size must divide "
                          f"{per_rank} (batch_size / world size): one of {', '.join(map(str, fits))}")
    return cfg.batch_size // per_step


ZERO3_REDUCE_BUCKET = 50_000_000  # elements; DeepSpeed's own default (stages 1 and 2) is 5e8
ZERO2_REDUCE_BUCKET = 500_000_000
BUCKET_ROUND = 1 << 20


def zero_reduce_bucket(stage, trainable_numel):
    """``reduce_bucket_size`` in elements: 5e8 at stages 1 and 2 (DeepSpeed's default), 5e7 at stage 3, cut to the
    trainable parameters rounded up to 2^20 when they are fewer (0: unknown, the plain figure).

    DeepSpeed 0.19 allocates a whole bucket whatever it holds: a contiguous gradient buffer of
    ``reduce_bucket_size`` elements on the ZeRO-1/2 optimizer (fp32 at stage 1 under bf16, whose gradients it
    accumulates in fp32; the parameters' dtype at stage 2) and on ZeRO-3. With LoRA every gradient fits one bucket
    of either size, so the cut changes no reduction and spares the buffer: 1.86 GiB of fp32 at stage 1 with
    ``offload_optimizer`` (which replaces the flat bf16 optimizer by ZeRO-1's), 0.93 GiB of bf16 at stage 2, for
    Mistral-7B's 42M LoRA parameters 0.16 and 0.08 GiB."""
    full = ZERO3_REDUCE_BUCKET if int(stage) == 3 else ZERO2_REDUCE_BUCKET
    if trainable_numel <= 0:
        return full
    return min(full, -(-int(trainable_numel) // BUCKET_ROUND) * BUCKET_ROUND)


def zero3_prefetch_bucket(layer_numel):
    """ZeRO-3's prefetch bucket in parameters: at least one decoder layer (the memory plan costs two alive)."""
    return max(50_000_000, int(layer_numel))


def deepspeed_config(cfg: TrainConfig, world_size: int, use_bf16: bool, use_fp16: bool = False, stage=None,
                     lora_max_numel: int = 0, layer_numel: int = 0, trainable_numel: int = 0) -> dict:
    """The DeepSpeed dict, fully resolved from the run config (no "auto").

    ``stage``: the ZeRO stage the memory plan chose (engine/memory.py); without it an explicit
    ``zero_stage`` is used and "auto" means 3 (the choice that needs no plan). Under ZeRO-3,
    ``lora_max_numel`` (largest LoRA tensor; 0 without LoRA, whose trainable base is sharded) keeps every LoRA
    tensor persistent, and ``layer_numel`` (parameters of one decoder layer) sizes the prefetch bucket to at least
    one layer. ``trainable_numel`` bounds the reduce bucket (:func:`zero_reduce_bucket`). Stage 1 in bf16
    accumulates gradients in fp32, which is what makes DeepSpeed pick its flat bf16 optimizer (one norm and
    one inf/NaN check per step; engine/memory.py says why stage 0 in bf16 is slower).
    """
    if stage is None:
        stage = 3 if str(cfg.zero_stage) == "auto" else int(cfg.zero_stage)
    zero = {"stage": int(stage)}
    if stage == 3:
        prefetch = zero3_prefetch_bucket(layer_numel)
        zero.update({
            "overlap_comm": True,
            "contiguous_gradients": True,
            "stage3_gather_16bit_weights_on_model_save": False,
            "stage3_param_persistence_threshold": max(10_000, int(lora_max_numel) + 1),
            "stage3_max_live_parameters": max(1_000_000_000, 2 * prefetch),
            "stage3_prefetch_bucket_size": prefetch,
        })
    if stage >= 1:
        zero["reduce_bucket_size"] = zero_reduce_bucket(stage, trainable_numel)
    if cfg.offload_optimizer and stage >= 1:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if cfg.offload_params and stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps(cfg, world_size),
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bool(use_bf16)},
        "fp16": {"enabled": bool(use_fp16)},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        # the engine's torch AdamW steps the offloaded fp32 state on the CPU (DeepSpeed otherwise refuses a client
        # optimizer with ZeRO-Offload): the LoRA state is small, so its CPU Adam is not the bottleneck
        **({"zero_force_ds_cpu_optimizer": False} if cfg.offload_optimizer and int(stage) >= 1 else {}),
        # bf16 gradients summed over the micro-batches (and over ranks, at stages 2 and 3) lose the small ones: every
        # stage accumulates in fp32 (stage 1: DeepSpeed's flat BF16_Optimizer; 2 and 3: their fp32 partitions)
        **({"data_types": {"grad_accum_dtype": "fp32"}} if int(stage) >= 1 and use_bf16 else {}),
    }


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def printable(cfg) -> str:
    """``--print-config``'s YAML: the config as resolved, except a value that is a default of the stage
    (contrastive.temperature unset), printed unset with its value in a comment, so that the printed file under
    another stage takes that stage's default as the source file would."""
    import yaml

    d = to_dict(cfg)
    note = ""
    if getattr(cfg.contrastive, "_temperature_of_stage", False):
        d["contrastive"]["temperature"] = None
        note = (f"# contrastive.temperature unset: the {cfg.stage} stage's default, {cfg.contrastive.temperature:g} "
                f"({stage_temperature('supervised'):g} for supervised, {stage_temperature('simcse'):g} otherwise)\n")
    return yaml.safe_dump(d, sort_keys=False) + note

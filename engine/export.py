"""Export a trained encoder to a self-contained, movable folder that standard tools load.

    python -m engine.export --model outputs/smollm2-135m-simcse --out exported/smollm2-simcse [--dtype bf16] [--normalize]

The folder holds: the merged weights (every adapter of the chain folded into the base) as safetensors, without
the LM head; ``config.json`` with ``"is_causal": false`` (transformers 5 then builds the Llama / Mistral /
Qwen2 / Qwen3 / Gemma2 attention bidirectionally, no custom code); the tokenizer; sentence-transformers modules
(Transformer declared text-only, Pooling with the trained mode and ``include_prompt: false``, optionally
Normalize); ``config_sentence_transformers.json`` with the instruction as the ``query`` prompt and cosine
similarity; ``engine_export.json`` (provenance, relative names only; the marker ``--overwrite`` looks for) and a
Hugging Face model card ``README.md`` (YAML metadata with a model-index of the measured dev score, the training
config and the eval figures the run recorded, rounded). Nothing in it names an absolute path.

A run folder exports its ``best/`` adapter when the run kept one (``--adapter last``: ``adapter/``). ``--out`` is
built in a temporary folder beside it and swapped in at the end (a failure removes it); ``check_output`` refuses
an ``--out`` that is or holds the model's folders, the current directory, a root, or (``--overwrite``) a folder
that is not an earlier export. Bad input: one line on stderr, exit 2, before the model loads.

    from sentence_transformers import SentenceTransformer
    m = SentenceTransformer("exported/smollm2-simcse")
    m.encode(["a sentence"]); m.encode(["a query"], prompt_name="query")
"""
import argparse
import csv
import json
import os
import shutil
import socket
import sys
import tempfile
import warnings

import torch

from . import assets, refs
from .cli import BAD_INPUT, ArgumentParser, disk_full_message, fail, missing_folders, positive_int, remove_empty
from .encoder import RUN_ADAPTERS
from .files import pid_alive, share_safetensors

# Serving engines that hard-code causal attention for these families ignore "is_causal": false.
CAUSAL_ONLY_SERVERS = {"llama": ["text-embeddings-inference"], "mistral": ["text-embeddings-inference"]}
_ST_POOLING = {"mean": "mean", "weighted_mean": "weightedmean", "eos": "lasttoken", "last": "lasttoken",
               "bos": "cls"}


# The oldest transformers that loads an export's tokenizer and builds its attention from ``"is_causal": false``;
# setup.py's floor, stated in every model card. Checked on an export, 2026-12-03: 4.57.6 cannot read the tokenizer
# and runs causally; 5.0.0 and 5.1.0 read it but run causally (a later token changes no earlier state); 5.2.0 is
# the first whose masks follow the config's is_causal (transformers PR #43705).
TRANSFORMERS_FLOOR = "5.2.0"
# Every export holds this file; --overwrite replaces only a folder that holds it (a folder this command wrote).
EXPORT_MARKER = "engine_export.json"
EXPORT_FORMAT = "llm2vec-engine-export/1"


class ExportError(ValueError):
    pass


def _is_path_key(key):
    """A key under which libraries record a local path (``_name_or_path``, ``name_or_path``, ``tokenizer_file``)."""
    k = str(key).lower()
    return k.endswith(("path", "_file", "_dir"))


def _strip_abs_paths(folder):
    """Drop absolute local paths that libraries write into JSON files (``_name_or_path`` and the like): only under
    path keys, so a prompt that starts with "/" (an instruction such as ``/no_think ...``) stays."""
    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()
                    if not (_is_path_key(k) and isinstance(v, str) and os.path.isabs(v) and os.sep in v)}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    for root, _, files in os.walk(folder):
        for f in files:
            if f.endswith(".json") and f != "tokenizer.json":
                p = os.path.join(root, f)
                with open(p) as fh:
                    data = json.load(fh)
                with open(p, "w") as fh:
                    json.dump(clean(data), fh, indent=2)


def _inside(p, q):
    """Whether the real path ``p`` is ``q`` or below it."""
    return p == q or p.startswith(q.rstrip(os.sep) + os.sep)


def _is_export(folder):
    try:
        with open(os.path.join(folder, EXPORT_MARKER)) as f:
            return str(json.load(f).get("format", "")).startswith(EXPORT_FORMAT.split("/")[0] + "/")
    except (OSError, ValueError, AttributeError):
        return False


def overlapping_folder(path, folders):
    """(how, folder) for the first of ``folders`` that the real path ``path`` is ("is"), lies inside ("is inside")
    or contains ("contains"), else None: writing or replacing ``path`` would touch that folder."""
    for q in sorted({os.path.realpath(os.path.expanduser(str(f))) for f in folders if f}):
        if _inside(path, q) or _inside(q, path):
            return ("is" if path == q else "is inside" if _inside(path, q) else "contains"), q
    return None


def check_output(out, protected=(), overwrite=False):
    """Refuse an ``out`` whose writing or replacing could destroy what this command did not write: an empty
    name, a link, a filesystem root, the current directory or a folder above it, any of the ``protected``
    folders (the model's run and adapter folders) or a folder inside or above one of them, and (with
    ``overwrite``) an existing path that is not an earlier export (no ``EXPORT_MARKER``). Raises ExportError."""
    if not out or not str(out).strip():
        raise ExportError("--out is empty: name the folder to write")
    if os.path.islink(out):
        raise ExportError(f"{out} is a symbolic link: name a folder, not a link")
    p = os.path.realpath(out)
    if os.path.dirname(p) == p:
        raise ExportError(f"{out} is a filesystem root: refusing to write an export there")
    cwd = os.path.realpath(os.getcwd())
    if _inside(cwd, p):
        where = "the current directory" if p == cwd else "a folder above the current directory"
        raise ExportError(f"{out} is {where}: refusing to replace it; name a folder of its own")
    clash = overlapping_folder(p, protected)
    if clash:
        how, q = clash
        raise ExportError(f"{out} {how} the model's folder {q}: export to a folder of its own")
    if os.path.lexists(out):
        if not overwrite:
            raise ExportError(f"{out} exists (pass --overwrite to replace an earlier export)")
        if not os.path.isdir(out):
            raise ExportError(f"{out} is a file, not an earlier export: refusing to replace it")
        if not _is_export(out):
            raise ExportError(f"{out} was not written by engine.export (no {EXPORT_MARKER} in it): refusing to "
                              f"replace it")
        extra = _entries_not_written(out)
        if extra:
            shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
            raise ExportError(f"{out} holds {len(extra)} entr{'y' if len(extra) == 1 else 'ies'} the export did not "
                              f"write ({shown}): refusing to replace it (move them out first)")


def _entries_not_written(folder):
    """The entries of an earlier export that it did not write itself (a ``.git``, someone's notes), which
    ``--overwrite`` would delete with it. An export records its entries in its marker (since this check exists)."""
    try:
        with open(os.path.join(folder, EXPORT_MARKER)) as f:
            written = json.load(f).get("files")
    except (OSError, ValueError, AttributeError):
        return []
    if not isinstance(written, list):  # an export from before the record: nothing to compare with
        return []
    return sorted(set(os.listdir(folder)) - set(written))


def _model_folders(model, info):
    """The local folders an export of ``model`` reads (and must never replace): the model path, its adapters,
    tokenizer and base, and the training run folders they belong to."""
    from .encoder import run_folder

    local = [os.path.expanduser(model)] if os.path.exists(os.path.expanduser(model)) else []
    local += [a for a in info["adapters"] if os.path.isdir(a)]
    local += [f for f in (info["tokenizer"], info["base"]) if f and os.path.isdir(os.path.expanduser(f))]
    return local + [r for r in map(run_folder, local) if r]


def _temp_beside(out):
    """A fresh temporary folder in ``out``'s parent (so that the final rename stays on one filesystem), and
    the parents created for it. Fails here, before any model loads, when that place cannot be written."""
    parent = os.path.dirname(os.path.abspath(out))
    created = missing_folders(parent)
    try:
        os.makedirs(parent, exist_ok=True)
        prefix = f".{os.path.basename(os.path.abspath(out))}.export-"
        _sweep_dead_temps(parent, prefix)
        tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
        with open(tmp + OWNER_SUFFIX, "w") as f:  # beside it, not in it: who builds it (a killed export's is swept)
            f.write(f"{socket.gethostname()} {os.getpid()}\n")
        umask = os.umask(0o22)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would become the export's mode
        return tmp, created
    except OSError as e:
        remove_empty(created)
        raise ExportError(f"cannot write {out}: {e.strerror or e} ({parent})") from e


OWNER_SUFFIX = ".owner"


def _sweep_dead_temps(parent, prefix):
    """Remove the temporary folders of earlier exports to the same ``out`` whose process is gone (killed: the out
    of memory killer at 7B, a SIGKILL), leaving tens of GB behind with nothing to remove them. Only those whose
    owner file names this host and a process that no longer exists: a live export, or one on another node
    sharing the filesystem, is left alone."""
    host = socket.gethostname()
    for name in os.listdir(parent):
        if not (name.startswith(prefix) and name.endswith(OWNER_SUFFIX)):
            continue
        owner = os.path.join(parent, name)
        try:
            with open(owner) as f:
                who, pid = f.read().split()
            pid = int(pid)
        except (OSError, ValueError):
            continue
        if who != host or pid_alive(pid):
            continue
        shutil.rmtree(owner[:-len(OWNER_SUFFIX)], ignore_errors=True)
        try:
            os.unlink(owner)
        except OSError:
            pass


def _drop_owner(tmp):
    try:
        os.unlink(tmp + OWNER_SUFFIX)
    except OSError:
        pass


def _exchange(a, b):
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        import ctypes

        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _swap_in(tmp, out):
    """Put the finished ``tmp`` at ``out``; an earlier export there is exchanged atomically, then removed."""
    if not os.path.lexists(out):
        os.rename(tmp, out)
    elif _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # now the earlier export
    else:  # two renames; the earlier export is put back if the second fails
        old = tmp + ".old"
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)


def _eval_figures(run, step=None):
    """Every eval_* figure of the run's metrics.csv (what the run measured): at ``step`` (the exported adapter's,
    for a best/ adapter), else the last value of each column. {column: (step, value)}."""
    path = os.path.join(run, "metrics.csv") if run else None
    if not path or not os.path.isfile(path):
        return {}
    last = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            if step is not None and str(row.get("step")) != str(step):
                continue
            for k, v in row.items():
                if k and k.startswith("eval_") and v not in (None, ""):
                    last[k] = (row.get("step"), v)
    return last


def _adapter_label(ref):
    """A hub id stays; a local adapter folder is named by its run and itself (``quick-simcse/best``): the export
    must not point at this machine, and ``best`` or ``adapter`` alone says nothing. A hub adapter reaches here as
    its huggingface_hub cache snapshot and is named by its hub id."""
    if not refs.is_local(ref):
        return ref
    hub_id = refs.snapshot_id(ref)
    if hub_id:
        return hub_id
    parts = refs.local_path(ref).split(os.sep)
    return "/".join(p for p in parts[-2:] if p)


def _base_names(info):
    """(label, hub id or None) of the base model. An engine alias is named as such, with the hub model its weights
    came from; a hub id, or a hub cache snapshot of one, is both; another local folder is its base name, with the
    hub id it says it came from (:func:`engine.refs.hub_id_of`, the id that chose the chat wrap) or none: the
    card's ``base_model`` must name a hub model or be left out. An engine test run on random weights
    (``model.random_init``) has no base model: only its architecture and tokenizer came from ``base``."""
    base = info["base"]
    if not base:
        return "random-init", None
    if info.get("random_init"):
        return f"random-init ({_base_names({**info, 'random_init': None})[0]} architecture)", None
    given = (info.get("engine_meta") or {}).get("base_model_name")
    alias = given if given and assets.is_alias(given) else assets.alias_of(base)
    if alias:
        return alias, refs.hub_id_of(alias)
    if not refs.is_local(base):
        return base, base
    return refs.snapshot_id(base) or os.path.basename(os.path.normpath(base)), refs.hub_id_of(base)


def _local_names(x):
    """The run config with absolute local paths replaced by ``<local>/basename`` (they mean nothing elsewhere)."""
    if isinstance(x, dict):
        return {k: _local_names(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_local_names(v) for v in x]
    if isinstance(x, str) and os.path.isabs(x):
        return "<local>/" + os.path.basename(os.path.normpath(x))
    return x


def _round(column, value):
    """A figure as the card shows it: Spearman / Pearson x100 to 2 decimals, anything else to 4 significant digits."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return value
    return round(v, 2) if ("spearman" in column or "pearson" in column) else float(f"{v:.4g}")


def _front_matter(meta, run, figures):
    """The Hugging Face card metadata: library, base model, pipeline, tags and a model-index of the STS scores
    the run measured (the dev Spearman of the exported adapter's step)."""
    import yaml

    card = {"library_name": "sentence-transformers", "pipeline_tag": "sentence-similarity",
            "tags": ["sentence-transformers", "feature-extraction", "sentence-similarity", "llm2vec", "llm2vec-engine"]}
    if meta.get("base_model_hub_id"):
        card["base_model"] = meta["base_model_hub_id"]
    metrics = [{"type": "cosine_spearman", "value": _round(k, v), "name": f"Spearman x100 (cosine), step {s}"}
               for k, (s, v) in sorted(figures.items()) if k == "eval_sts_spearman"]
    if metrics:
        data = _eval_data_name(run)
        card["model-index"] = [{"name": meta["name"], "results": [{
            "task": {"type": "STS", "name": "semantic textual similarity"},
            "dataset": {"name": f"{data} (the run's dev file)", "type": data}, "metrics": metrics}]}]
    return ["---", yaml.safe_dump(card, sort_keys=False).rstrip(), "---", ""]


def _eval_data_name(run):
    cfg = os.path.join(run, "config.yaml") if run else None
    if cfg and os.path.isfile(cfg):
        import yaml

        with open(cfg) as f:
            data = (yaml.safe_load(f) or {}).get("eval_data") or ["dev"]
        return os.path.basename(str(data[0] if isinstance(data, list) else data))
    return "dev"


def _base_line(meta):
    label, hub = meta["base_model"], meta.get("base_model_hub_id")
    weights = assets.ALIASES[label].get("weights") if assets.is_alias(label) else None
    said = ", ".join(x for x in (f"from {hub}" if hub and hub != label else None, weights) if x)
    return f"`{label}`" + (f" ({said})" if said else "")


def _model_card(meta, run, figures, st_prompts, best=None):
    lines = _front_matter(meta, run, figures)
    lines += [f"# {meta['name']}", "", "A text encoder trained with llm2vec-engine (LLM2Vec recipe: bidirectional "
             "attention, MNTP, then SimCSE / supervised contrastive), exported with `python -m engine.export`.", "",
             f"- base model: {_base_line(meta)}", f"- adapters merged: {', '.join(meta['adapters']) or 'none'}",
             f"- pooling: `{meta['pooling']}` (instruction tokens attended, not pooled)",
             f"- max length: {meta['max_length']} tokens" + (
                 f" (the model's doc_max_length, {meta['doc_max_length_not_applied']} tokens cut to whole words, is "
                 f"not applied: longer texts embed differently than with llm2vec-engine)"
                 if meta.get("doc_max_length_not_applied") else ""), f"- dtype: {meta['dtype']}",
             f"- instruction (prompt `query`): {st_prompts.get('query', '')!r}", "",
             "## Usage", "", "```python", "from sentence_transformers import SentenceTransformer",
             "model = SentenceTransformer(PATH)", "emb = model.encode([\"A man is playing a guitar.\"])", "```", "",
             "`transformers.AutoModel.from_pretrained(PATH)` is bidirectional (`is_causal: false` in config.json); "
             "pool it yourself as above.", "",
             f"Requires `transformers>={TRANSFORMERS_FLOOR}`: older versions load this folder with causal attention "
             "(they ignore `is_causal: false`) and cannot read its tokenizer.", ""]
    if best:
        lines += [f"The exported adapter is the run's best by dev Spearman: step {best.get('step')}, "
                  f"{_round('spearman', best.get('spearman'))}.", ""]
    if meta.get("causal_only_servers"):
        lines += [f"Not for {', '.join(meta['causal_only_servers'])}: it runs this architecture causally.", ""]
    lines += ["## Evaluation (recorded by the training run)", ""]
    if figures:
        lines += ["| metric | step | value |", "| --- | ---: | ---: |"]
        lines += [f"| {k} | {s} | {_round(k, v)} |" for k, (s, v) in sorted(figures.items())]
    else:
        lines += ["The run recorded no eval figures."]
    lines += ["", "## Training config", ""]
    cfg = os.path.join(run, "config.yaml") if run else None
    if cfg and os.path.isfile(cfg):
        import yaml

        with open(cfg) as f:
            text = yaml.safe_dump(_local_names(yaml.safe_load(f)), sort_keys=False)
        lines += ["Local paths are shown as `<local>/NAME`.", "", "```yaml", text.rstrip(), "```"]
    else:
        lines += ["No training config was found next to the model (not an engine run folder)."]
    return "\n".join(lines) + "\n"


def _content_revision(folder):
    """A revision for mteb's cache: the sha256 (first 12 hex digits) of the export's files, README and
    engine_export.json aside, so two different exports never share one."""
    import hashlib

    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(folder)):
        dirs.sort()
        for f in sorted(files):
            if f in ("README.md", "engine_export.json"):
                continue
            path = os.path.join(root, f)
            h.update(os.path.relpath(path, folder).encode())
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:12]


def export(model, out, dtype="fp32", normalize=None, max_length=None, overwrite=False, adapter=None,
           drop_chat_wrap=False, model_name=None, allow_mismatch=False):
    """Write the export folder; returns its metadata dict. A training run folder exports its ``best/`` adapter
    when it kept one (``adapter="last"``: ``adapter/``). Checked before any model loads: the model path, that the
    model can be expressed as sentence-transformers modules, and that ``out`` may be written (``check_output``).
    Built in a temporary folder beside ``out`` and swapped in at the end; any failure removes that folder.

    Prompts: llm2vec's MTEB task instructions keyed as mteb reads them (``engine.task_instructions``) plus the
    model's own instruction as ``query``. A model encoded with a chat wrap (the one its run trained with) cannot be
    expressed as sentence-transformers prompts (the wrap's tail follows the text): ExportError, unless
    ``drop_chat_wrap`` (the export then encodes unwrapped, which its metadata and card say).
    ``model_name``: the name mteb files results under (default ``llm2vec-engine/<out folder name>``).
    A weighted_mean model with an instruction: ExportError (sentence-transformers weighs a prompted text's tokens
    otherwise, so its embeddings would differ from engine.Encoder's), unless ``allow_mismatch``
    (``--allow-mismatch``; the MTEB wrapper then files its scores under a revision of its own)."""
    from .encoder import chat_for, resolve_chain

    info = resolve_chain(model, adapter=adapter)
    s = info["settings"]
    pooling = s.get("pooling", "mean")
    if pooling not in _ST_POOLING:
        raise ExportError(f"pooling {pooling!r} has no sentence-transformers equivalent")
    chat = chat_for(info, "auto")
    if chat and not drop_chat_wrap:
        raise ExportError(f"this model encodes with the {chat!r} chat wrap (the one it was trained with), which "
                          f"sentence-transformers prompts cannot express (the wrap's tail follows the text); the "
                          f"export would embed differently. Use engine.Encoder, or pass drop_chat_wrap=True "
                          f"(--drop-chat-wrap) to export it unwrapped anyway")
    if s.get("bidirectional") is False:
        raise ExportError("this model was trained and encodes with causal attention (model.bidirectional: false); "
                          "the export writes a bidirectional encoder (is_causal: false), which would embed "
                          "differently. Use engine.Encoder for this model")
    if pooling == "weighted_mean" and s.get("instruction") and not allow_mismatch:
        raise ExportError(f"weighted_mean pooling with the instruction {s['instruction']!r}: sentence-transformers "
                          f"weighs a prompted text's tokens by their position in the whole sequence, the engine by "
                          f"their rank among the text's tokens, so the export would embed differently from "
                          f"engine.Encoder. Use engine.Encoder, or pass allow_mismatch=True (--allow-mismatch) to "
                          f"export it anyway")
    if s.get("skip_instruction") is False:
        raise ExportError("skip_instruction=False (instruction tokens pooled) has no sentence-transformers "
                          "equivalent with prompts")
    check_output(out, _model_folders(model, info), overwrite)
    tmp, created = _temp_beside(out)
    if info["selected"]:
        print(info["selected"], file=sys.stderr)
    try:
        meta = _write_export(model, info, tmp, out, dtype, normalize, max_length, chat, model_name)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _drop_owner(tmp)
        remove_empty(created)
        raise
    _drop_owner(tmp)
    return meta


def _write_export(model, info, tmp, out, dtype, normalize, max_length, chat, model_name):
    """The export's files, into ``tmp``; ``chat``: the wrap the model encodes with, dropped here (checked and
    allowed by ``export``)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    from .encoder import DEFAULT_MAX_LENGTH, load_encoder_model, resolve_dtype, run_folder
    from .encoding import TEXT_FORMAT
    from .task_instructions import mteb_prompts

    s = info["settings"]
    pooling = s.get("pooling", "mean")
    # None: as the model is (an export exported again keeps its Normalize module; a run has none); True/False: add
    # it or leave it out
    normalize = bool(s.get("normalize")) if normalize is None else bool(normalize)
    dt = resolve_dtype(dtype, "cpu")
    # Loaded in the export's dtype when the base is stored in it (a bf16 7B: 15 GB of host memory, not 30 + 15):
    # the adapters merge in fp32 with one rounding (merge_loras), so the bits are those of an fp32 load and cast.
    load_dt = dt if dt != torch.float32 and _stored_dtype(info) == dt else torch.float32
    # the engine reads and pools an appended EOS (engine.encoding.tokenize_for_encoding): the exported tokenizer
    # appends it too, set (or refused) before the weights load
    enc_model, tok = load_encoder_model(info, load_dt, bidirectional=False, tokenizer_check=_append_eos)
    enc_model = enc_model.to(dt)
    for cfg in {id(c): c for c in (enc_model.config, getattr(enc_model.config, "text_config", None)) if c}.values():
        cfg.is_causal = False
        cfg.use_cache = False
    max_len = max_length or s.get("max_length") or DEFAULT_MAX_LENGTH
    tok.model_max_length = max_len
    instruction = s.get("instruction", "") or ""
    prompts = mteb_prompts(instruction)
    if chat:
        warnings.warn(f"exporting without the {chat!r} chat wrap the model was trained with: sentence-transformers "
                      f"embeddings of this folder will differ from engine.Encoder's")
    doc_max = s.get("doc_max_length")
    doc_max = doc_max if doc_max and doc_max < max_len else None
    if doc_max:
        warnings.warn(f"doc_max_length {doc_max}: engine.Encoder cuts a longer text to whole words (llm2vec's rule), "
                      f"which sentence-transformers cannot; the export cuts at max_length {max_len} tokens, so texts "
                      f"longer than {doc_max} tokens embed differently from engine.Encoder's (shorter ones agree)")
    if pooling == "weighted_mean":
        warnings.warn("weighted_mean: sentence-transformers weighs a prompted text's tokens by their position in the "
                      "whole sequence, the engine (as llm2vec) by their rank among the pooled tokens: with a prompt "
                      "(the instruction, an mteb task's) the export's embeddings differ from engine.Encoder's "
                      "(without one they agree); the MTEB wrapper files its scores under a revision of its own")
    model_type = enc_model.config.model_type
    servers = CAUSAL_ONLY_SERVERS.get(model_type, [])
    if servers:
        warnings.warn(f"{model_type}: {', '.join(servers)} hard-codes causal attention for this architecture and would "
                      f"serve this bidirectional encoder wrongly; use sentence-transformers, transformers or vLLM")

    # The weights and the tokenizer are written once, where sentence-transformers keeps its Transformer module's
    # (the folder's root); its own save of that module then writes only the module's config (below).
    enc_model.save_pretrained(tmp, safe_serialization=True)
    # the engine keeps a long text's head and pads on the right (engine.encoding): a base tokenizer saved with left
    # truncation (alignment-handbook's models) made sentence-transformers keep the tail, the instruction cut off
    tok.truncation_side = tok.padding_side = "right"
    tok.save_pretrained(tmp)
    del enc_model
    # Text-only: sentence-transformers 6 would otherwise route plain strings through the tokenizer's chat template.
    transformer = Transformer(tmp, modality_config={"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
                              module_output_name="token_embeddings", model_kwargs={"dtype": dt})
    transformer.save = lambda path, *a, **k: transformer.save_config(path)  # not the weights a second time
    dim = transformer.get_embedding_dimension() if hasattr(transformer, "get_embedding_dimension") else \
        transformer.auto_model.config.hidden_size
    # bos pooling is the sequence's first token (the engine's rule), which include_prompt=True keeps
    modules = [transformer, Pooling(dim, pooling_mode=_ST_POOLING[pooling], include_prompt=pooling == "bos")]
    if normalize:
        modules.append(Normalize())
    st = SentenceTransformer(modules=modules, prompts=prompts, default_prompt_name="query" if instruction else None,
                             similarity_fn_name="cosine", device="cpu")
    st.save(tmp)
    top = info["adapters"][-1] if info["adapters"] else None
    run = run_folder(top) if top else run_folder(model)
    name = os.path.basename(os.path.normpath(out))
    base_label, base_hub = _base_names(info)
    meta = {"format": "llm2vec-engine-export/2", "name": name, "model_name": model_name or f"llm2vec-engine/{name}",
            "revision": _content_revision(tmp), "base_model": base_label, "base_model_hub_id": base_hub,
            "adapters": [_adapter_label(a) for a in info["adapters"]], "pooling": pooling, "instruction": instruction,
            "max_length": max_len, "dtype": str(dt).replace("torch.", ""), "normalize": bool(normalize),
            "chat": None, "chat_wrap_dropped": chat, "text_format": TEXT_FORMAT, "model_type": model_type,
            "causal_only_servers": servers, "doc_max_length_not_applied": doc_max}
    best = _best_of(top)
    with open(os.path.join(tmp, "README.md"), "w") as f:
        f.write(_model_card(meta, run, _eval_figures(run, best.get("step")), prompts, best))
    share_safetensors(tmp)  # safetensors writes 0600: an export handed to another account must be readable
    meta["files"] = sorted(set(os.listdir(tmp)) | {EXPORT_MARKER})  # what --overwrite may replace
    with open(os.path.join(tmp, EXPORT_MARKER), "w") as f:
        json.dump(meta, f, indent=2)
    _strip_abs_paths(tmp)
    return meta


def _stored_dtype(info):
    """The dtype the base's weights are stored in, as its config.json records it (``dtype`` / ``torch_dtype``);
    None where unknown (a GGUF file, an engine test run's random base, a config that names none)."""
    if info["random_init"] or info["gguf_file"] or not info["base"]:
        return None
    from transformers import AutoConfig

    from .modeling import resolve_model_path

    try:
        cfg = AutoConfig.from_pretrained(resolve_model_path(info["base"], None)[0])
    except (OSError, ValueError):
        return None
    d = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d, None)
    return d if isinstance(d, torch.dtype) else None


def _best_of(adapter_folder):
    """A best/ adapter's record (step, dev Spearman), or {} for any other adapter."""
    path = os.path.join(adapter_folder, "engine_best.json") if adapter_folder else None
    if not path or not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _append_eos(tok):
    """The engine appends (and pools) EOS after every text: make the exported tokenizer append it too."""
    from tokenizers import processors

    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    if backend is None:
        raise ExportError("the export needs a fast tokenizer to append EOS as the engine does")
    eos, eos_id = tok.eos_token, tok.eos_token_id
    if eos is None or eos_id is None:
        raise ExportError("the tokenizer has no EOS token, which the engine appends to every text")
    bos = [(tok.bos_token, tok.bos_token_id)] if tok("")["input_ids"][:1] == [tok.bos_token_id] and \
        tok.bos_token_id is not None else []
    single = " ".join([b for b, _ in bos] + ["$A", eos])
    pair = " ".join([b for b, _ in bos] + ["$A", eos, "$B:1", f"{eos}:1"])
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                           special_tokens=list({*bos, (eos, eos_id)}))


def main(argv=None):
    ap = ArgumentParser(prog="python -m engine.export", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="run output dir, adapter dir (or hub id), LLM2Vec-style checkpoint")
    ap.add_argument("--out", required=True, help="the folder to write (a new one, or an earlier export with "
                                                  "--overwrite)")
    ap.add_argument("--adapter", choices=sorted(RUN_ADAPTERS), default=None,
                    help="for a training run folder: best (the default when the run kept best/) or last (adapter/)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights dtype (default fp32)")
    ap.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                    help="add a Normalize module (unit-length embeddings), or leave out an export's own with "
                         "--no-normalize (default: as the model is)")
    ap.add_argument("--max-length", type=positive_int, default=None,
                    help="inference max tokens (default: the model's, else 512)")
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier export (only a folder holding "
                                                             f"{EXPORT_MARKER})")
    ap.add_argument("--drop-chat-wrap", action="store_true",
                    help="export a model trained with a chat wrap anyway, unwrapped (its embeddings then differ)")
    ap.add_argument("--allow-mismatch", action="store_true",
                    help="export a weighted_mean model trained with an instruction anyway (refused otherwise): "
                         "sentence-transformers weighs prompted tokens differently, so its embeddings of prompted "
                         "texts differ from engine.Encoder's (the MTEB wrapper files its scores apart)")
    args = ap.parse_args(argv)
    try:
        import sentence_transformers  # noqa: F401
    except ImportError:
        return fail("export needs sentence-transformers (pip install -e '.[export]')")
    from .modeling import ModelLoadError

    try:
        meta = export(args.model, args.out, args.dtype, args.normalize, args.max_length, args.overwrite, args.adapter,
                      drop_chat_wrap=args.drop_chat_wrap, allow_mismatch=args.allow_mismatch)
    except (ExportError, FileNotFoundError, ValueError, ModelLoadError) as e:
        return fail(e)
    except Exception as e:  # a full disk (OSError, or safetensors' own error), an unwritable folder: named, nothing
        full = disk_full_message(e, args.out)  # half-written left (export removes its temporary folder)
        if full:
            print(full, file=sys.stderr)
            return BAD_INPUT
        if isinstance(e, OSError):
            return fail(f"could not write {args.out}: {e}")
        raise
    print(json.dumps({"out": args.out, **meta}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

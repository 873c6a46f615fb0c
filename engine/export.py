"""Export a trained encoder to a self-contained, movable folder that standard tools load.

    python -m engine.export --model outputs/smollm2-135m-simcse --out exported/smollm2-simcse [--dtype bf16] [--normalize]

The folder holds: the merged weights (every adapter of the chain folded into the base) as safetensors, without
the LM head; ``config.json`` with ``"is_causal": false`` (transformers 5 then builds the Llama / Mistral /
Qwen2 / Qwen3 / Gemma2 attention bidirectionally, no custom code); the tokenizer; sentence-transformers modules
(Transformer declared text-only, Pooling with the trained mode and ``include_prompt: false``, optionally
Normalize); ``config_sentence_transformers.json`` with the instruction as the ``query`` prompt and cosine
similarity; ``engine_export.json`` (provenance, relative names only) and a model card ``README.md`` with the
training config and the eval figures the run recorded. Nothing in it names an absolute path.

    from sentence_transformers import SentenceTransformer
    m = SentenceTransformer("exported/smollm2-simcse")
    m.encode(["a sentence"]); m.encode(["a query"], prompt_name="query")
"""
import argparse
import csv
import json
import os
import shutil
import sys
import warnings

import torch

# Serving engines that hard-code causal attention for these families ignore "is_causal": false.
CAUSAL_ONLY_SERVERS = {"llama": ["text-embeddings-inference"], "mistral": ["text-embeddings-inference"]}
_ST_POOLING = {"mean": "mean", "weighted_mean": "weightedmean", "eos": "lasttoken", "last": "lasttoken",
               "bos": "cls"}


class ExportError(ValueError):
    pass


def _strip_abs_paths(folder):
    """Drop absolute local paths that libraries write into JSON files (``_name_or_path`` and the like)."""
    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items() if not (isinstance(v, str) and os.path.isabs(v) and os.sep in v)}
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


def _run_dir(model_path):
    p = os.path.abspath(os.path.expanduser(model_path))
    if os.path.basename(p) == "adapter" and os.path.isfile(os.path.join(os.path.dirname(p), "config.yaml")):
        return os.path.dirname(p)
    return p if os.path.isfile(os.path.join(p, "config.yaml")) else None


def _eval_figures(run):
    """The last value of every eval_* column in the run's metrics.csv (what the run measured)."""
    path = os.path.join(run, "metrics.csv") if run else None
    if not path or not os.path.isfile(path):
        return {}
    last = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                if k and k.startswith("eval_") and v not in (None, ""):
                    last[k] = (row.get("step"), v)
    return last


def _public_name(ref):
    """A hub id stays; a local path becomes its base name (the folder must not point at this machine)."""
    if not ref:
        return None
    return ref if not os.path.isabs(os.path.expanduser(ref)) and not ref.startswith((".", "~")) else \
        os.path.basename(os.path.normpath(ref))


def _local_names(x):
    """The run config with absolute local paths replaced by ``<local>/basename`` (they mean nothing elsewhere)."""
    if isinstance(x, dict):
        return {k: _local_names(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_local_names(v) for v in x]
    if isinstance(x, str) and os.path.isabs(x):
        return "<local>/" + os.path.basename(os.path.normpath(x))
    return x


def _model_card(meta, run, figures, st_prompts):
    lines = [f"# {meta['name']}", "", "A text encoder trained with llm2vec-engine (LLM2Vec recipe: bidirectional "
             "attention, MNTP, then SimCSE / supervised contrastive), exported with `python -m engine.export`.", "",
             f"- base model: `{meta['base_model']}`", f"- adapters merged: {', '.join(meta['adapters']) or 'none'}",
             f"- pooling: `{meta['pooling']}` (instruction tokens attended, not pooled)",
             f"- max length: {meta['max_length']} tokens", f"- dtype: {meta['dtype']}",
             f"- instruction (prompt `query`): {st_prompts.get('query', '')!r}", "",
             "## Usage", "", "```python", "from sentence_transformers import SentenceTransformer",
             "model = SentenceTransformer(PATH)", "emb = model.encode([\"A man is playing a guitar.\"])", "```", "",
             "`transformers.AutoModel.from_pretrained(PATH)` is bidirectional (`is_causal: false` in config.json); "
             "pool it yourself as above.", ""]
    if meta.get("causal_only_servers"):
        lines += [f"Not for {', '.join(meta['causal_only_servers'])}: it runs this architecture causally.", ""]
    lines += ["## Evaluation (recorded by the training run)", ""]
    if figures:
        lines += ["| metric | step | value |", "| --- | ---: | ---: |"]
        lines += [f"| {k} | {s} | {v} |" for k, (s, v) in sorted(figures.items())]
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


def export(model, out, dtype="fp32", normalize=False, max_length=None, overwrite=False, drop_chat_wrap=False,
           model_name=None):
    """Write the export folder (atomically: built in ``out.tmp``, then renamed). Returns its metadata dict.

    Prompts: llm2vec's MTEB task instructions keyed as mteb reads them (``engine.task_instructions``) plus the
    model's own instruction as ``query``. A model encoded with a chat wrap (the one its run trained with) cannot be
    expressed as sentence-transformers prompts (the wrap's tail follows the text): ExportError, unless
    ``drop_chat_wrap`` (the export then encodes unwrapped, which its metadata and card say).
    ``model_name``: the name mteb files results under (default ``llm2vec-engine/<out folder name>``)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    from .encoder import DEFAULT_MAX_LENGTH, chat_for, load_encoder_model, resolve_chain, resolve_dtype
    from .encoding import TEXT_FORMAT
    from .task_instructions import mteb_prompts

    if os.path.exists(out) and not overwrite:
        raise ExportError(f"{out} exists (pass --overwrite to replace it)")
    info = resolve_chain(model)
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
    if chat:
        warnings.warn(f"exporting without the {chat!r} chat wrap the model was trained with: sentence-transformers "
                      f"embeddings of this folder will differ from engine.Encoder's")
    if s.get("skip_instruction") is False:
        raise ExportError("skip_instruction=False (instruction tokens pooled) has no sentence-transformers "
                          "equivalent with prompts")
    dt = resolve_dtype(dtype, "cpu")
    enc_model, tok = load_encoder_model(info, torch.float32, bidirectional=False)
    enc_model = enc_model.to(dt)
    for cfg in {id(c): c for c in (enc_model.config, getattr(enc_model.config, "text_config", None)) if c}.values():
        cfg.is_causal = False
        cfg.use_cache = False
    max_len = max_length or s.get("max_length") or DEFAULT_MAX_LENGTH
    tok.model_max_length = max_len
    _append_eos(tok)  # the engine reads and pools an appended EOS (engine.encoding.tokenize_for_encoding)
    instruction = s.get("instruction", "") or ""
    prompts = mteb_prompts(instruction)
    if pooling == "weighted_mean":
        warnings.warn("weighted_mean: sentence-transformers weighs a prompted text's tokens by their position in the "
                      "whole sequence, the engine (as llm2vec) by their rank among the pooled tokens: with a prompt "
                      "the export's embeddings differ from engine.Encoder's (without one they agree)")
    model_type = enc_model.config.model_type
    servers = CAUSAL_ONLY_SERVERS.get(model_type, [])
    if servers:
        warnings.warn(f"{model_type}: {', '.join(servers)} hard-codes causal attention for this architecture and would "
                      f"serve this bidirectional encoder wrongly; use sentence-transformers, transformers or vLLM")

    tmp = os.path.abspath(out).rstrip(os.sep) + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    hf_dir = os.path.join(tmp, "_hf")
    enc_model.save_pretrained(hf_dir, safe_serialization=True)
    tok.save_pretrained(hf_dir)
    del enc_model
    # Text-only: sentence-transformers 6 would otherwise route plain strings through the tokenizer's chat template.
    transformer = Transformer(hf_dir, modality_config={"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
                              module_output_name="token_embeddings", model_kwargs={"dtype": dt})
    dim = transformer.get_embedding_dimension() if hasattr(transformer, "get_embedding_dimension") else \
        transformer.auto_model.config.hidden_size
    # bos pooling is the sequence's first token (the engine's rule), which include_prompt=True keeps
    modules = [transformer, Pooling(dim, pooling_mode=_ST_POOLING[pooling], include_prompt=pooling == "bos")]
    if normalize:
        modules.append(Normalize())
    st = SentenceTransformer(modules=modules, prompts=prompts, default_prompt_name="query" if instruction else None,
                             similarity_fn_name="cosine", device="cpu")
    st.save(tmp)
    shutil.rmtree(hf_dir)
    run = _run_dir(model)
    name = os.path.basename(os.path.normpath(out))
    meta = {"format": "llm2vec-engine-export/2", "name": name, "model_name": model_name or f"llm2vec-engine/{name}",
            "revision": _content_revision(tmp), "base_model": _public_name(info["base"]) or "random-init",
            "adapters": [_public_name(a) for a in info["adapters"]], "pooling": pooling, "instruction": instruction,
            "max_length": max_len, "dtype": str(dt).replace("torch.", ""), "normalize": bool(normalize),
            "chat": None, "chat_wrap_dropped": chat, "text_format": TEXT_FORMAT, "model_type": model_type,
            "causal_only_servers": servers}
    with open(os.path.join(tmp, "engine_export.json"), "w") as f:
        json.dump(meta, f, indent=2)
    with open(os.path.join(tmp, "README.md"), "w") as f:
        f.write(_model_card(meta, run, _eval_figures(run), prompts))
    _strip_abs_paths(tmp)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(tmp, out)
    return meta


def _append_eos(tok):
    """The engine appends (and pools) EOS after every text: make the exported tokenizer append it too."""
    from tokenizers import processors

    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    if backend is None:
        raise ExportError("eos pooling needs a fast tokenizer to append EOS in the export")
    eos, eos_id = tok.eos_token, tok.eos_token_id
    bos = [(tok.bos_token, tok.bos_token_id)] if tok("")["input_ids"][:1] == [tok.bos_token_id] and \
        tok.bos_token_id is not None else []
    single = " ".join([b for b, _ in bos] + ["$A", eos])
    pair = " ".join([b for b, _ in bos] + ["$A", eos, "$B:1", f"{eos}:1"])
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                           special_tokens=list({*bos, (eos, eos_id)}))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="run output dir, adapter dir (or hub id), LLM2Vec-style checkpoint")
    ap.add_argument("--out", required=True, help="the folder to write")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights dtype (default fp32)")
    ap.add_argument("--normalize", action="store_true", help="add a Normalize module (unit-length embeddings)")
    ap.add_argument("--max-length", type=int, default=None, help="inference max tokens (default: the model's, else 512)")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--drop-chat-wrap", action="store_true",
                    help="export a model trained with a chat wrap anyway, unwrapped (its embeddings then differ)")
    args = ap.parse_args(argv)
    local = os.path.expanduser(args.model)
    if not os.path.exists(local) and (local.startswith((".", "/", "~")) or len(args.model.split("/")) != 2):
        print(f"error: model not found: {args.model} (neither a local folder nor a hub id)", file=sys.stderr)
        return 2
    try:
        import sentence_transformers  # noqa: F401
    except ImportError:
        print("error: export needs sentence-transformers (pip install -e '.[export]')", file=sys.stderr)
        return 2
    try:
        meta = export(args.model, args.out, args.dtype, args.normalize, args.max_length, args.overwrite,
                      drop_chat_wrap=args.drop_chat_wrap)
    except (ExportError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": args.out, **meta}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

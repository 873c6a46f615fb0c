"""The encoder users came for: load a trained LLM2Vec model and ``encode`` texts.

    from engine import Encoder
    enc = Encoder.from_pretrained("outputs/smollm2-135m-simcse")          # a run's output dir
    emb = enc.encode(["a sentence", "another"], instruction=None)         # float32 (N, H) tensor

``from_pretrained`` accepts: a training run's output dir or its ``adapter/`` folder (base model,
earlier adapters and pooling come from ``engine_encoder.json``); a PEFT adapter folder whose
``adapter_config.json`` names its base, recursively (the layout of published LLM2Vec checkpoints:
base <- MNTP adapter <- supervised/SimCSE adapter, with ``llm2vec_config.json`` for pooling); or a
plain HF model (used as is, made bidirectional). Adapters are merged into the base weights.
"""
import json
import os

import numpy as np
import torch

from .config import ModelConfig
from .encoding import encode_texts
from .modeling import load_model

_LLM2VEC_POOLING = {"mean": "mean", "weighted_mean": "weighted_mean", "eos_token": "eos", "last_token": "last",
                    "bos_token": "bos"}


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _resolve_chain(path, depth=0):
    """(base, [adapters base->top], settings) for an adapter folder, following base_model_name_or_path."""
    if depth > 8:
        raise ValueError(f"adapter chain too deep at {path}")
    acfg = os.path.join(path, "adapter_config.json")
    settings = {}
    llm2vec = os.path.join(path, "llm2vec_config.json")
    if os.path.isfile(llm2vec):
        lc = _read_json(llm2vec)
        if "pooling_mode" in lc:
            settings["pooling"] = _LLM2VEC_POOLING.get(lc["pooling_mode"], lc["pooling_mode"])
        if "max_length" in lc:
            settings["max_length"] = lc["max_length"]
    if not os.path.isfile(acfg):
        return path, [], settings
    base = _read_json(acfg).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{acfg} does not name base_model_name_or_path")
    if os.path.isdir(base) and os.path.isfile(os.path.join(base, "adapter_config.json")):
        root, chain, inner = _resolve_chain(base, depth + 1)
        return root, chain + [path], {**inner, **settings}
    return base, [path], settings


class Encoder:
    def __init__(self, model, tokenizer, pooling="mean", max_length=512, instruction="", device=None):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.pooling, self.max_length, self.default_instruction = pooling, max_length, instruction
        self.device = device or next(model.parameters()).device

    @classmethod
    def from_pretrained(cls, path_or_name, *, peft_model_name_or_path=None, pooling=None, max_length=None,
                        device=None, dtype="fp32", bidirectional=None, attention="auto"):
        path = path_or_name
        if os.path.isdir(os.path.join(path, "adapter")) and not os.path.isfile(os.path.join(path, "adapter_config.json")):
            path = os.path.join(path, "adapter")  # a training run's output dir
        meta_path = os.path.join(path, "engine_encoder.json")
        device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        settings = {}
        if os.path.isfile(meta_path):
            meta = _read_json(meta_path)
            mcfg = ModelConfig(name_or_path=meta["base_model"] or "", gguf_file=meta.get("gguf_file"),
                               random_init=meta.get("random_init"), tokenizer=path, dtype=dtype,
                               adapters=list(meta.get("prior_adapters", [])) + [path],
                               bidirectional=meta.get("bidirectional", True) if bidirectional is None else bidirectional,
                               attention=attention)
            settings = {"pooling": meta.get("pooling", "mean"), "max_length": meta.get("max_length", 512),
                        "instruction": meta.get("instruction", "")}
        elif os.path.isdir(path):
            base, chain, settings = _resolve_chain(path)
            mcfg = ModelConfig(name_or_path=base, dtype=dtype, adapters=chain,
                               bidirectional=True if bidirectional is None else bidirectional, attention=attention,
                               tokenizer=path if os.path.isfile(os.path.join(path, "tokenizer_config.json")) else None)
        else:
            mcfg = ModelConfig(name_or_path=path, dtype=dtype, attention=attention,
                               bidirectional=True if bidirectional is None else bidirectional)
        if peft_model_name_or_path:
            mcfg.adapters = list(mcfg.adapters) + [peft_model_name_or_path]
            _, _, extra = _resolve_chain(peft_model_name_or_path)
            settings.update(extra)
        import kernels

        kernels.set_default_impl("attention", attention)
        model, tok = load_model(mcfg, device.type)
        model.to(device)
        return cls(model, tok, pooling=pooling or settings.get("pooling", "mean"),
                   max_length=max_length or settings.get("max_length", 512),
                   instruction=settings.get("instruction", ""), device=device)

    def encode(self, texts, instruction=None, batch_size=32, normalize=False, max_length=None,
               show_progress_bar=False, convert_to_numpy=False, convert_to_tensor=True, padding_side="right",
               **kwargs):
        """float32 (N, H) embeddings; numpy with convert_to_numpy=True (sentence-transformers/MTEB style).

        ``instruction`` (one string, or one per text) is prepended and attended, but not pooled.
        """
        single = isinstance(texts, str)
        emb = encode_texts(self.model, self.tokenizer, [texts] if single else texts,
                           instruction=instruction if instruction is not None else self.default_instruction,
                           pooling=self.pooling, max_len=max_length or self.max_length, batch_size=batch_size,
                           device=self.device, padding_side=padding_side, show_progress_bar=show_progress_bar)
        if normalize or kwargs.get("normalize_embeddings"):
            emb = torch.nn.functional.normalize(emb, dim=-1)
        if single:
            emb = emb[0]
        if convert_to_numpy or not convert_to_tensor:
            return emb.numpy().astype(np.float32)
        return emb

    def similarity(self, a, b):
        return torch.nn.functional.cosine_similarity(torch.as_tensor(a)[:, None], torch.as_tensor(b)[None], dim=-1)

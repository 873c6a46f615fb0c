"""``LLM2Vec``: llm2vec's inference interface over the engine's encoder, for code written against llm2vec.

    import torch
    from engine import LLM2Vec
    l2v = LLM2Vec.from_pretrained("McGill-NLP/LLM2Vec-Meta-Llama-3-8B-Instruct-mntp",
                                  peft_model_name_or_path="McGill-NLP/LLM2Vec-Meta-Llama-3-8B-Instruct-mntp-supervised",
                                  device_map="cuda" if torch.cuda.is_available() else "cpu", torch_dtype=torch.bfloat16)
    q_reps = l2v.encode([[instruction, "how much protein should a female eat"]])   # a float32 torch.Tensor
    l2v.save("my-encoder", merge_before_save=True)

The signatures and defaults are llm2vec's (``LLM2Vec.from_pretrained(base, peft_model_name_or_path=None,
merge_peft=False, enable_bidirectional=True, pooling_mode=..., max_length=..., doc_max_length=...,
skip_instruction=..., **model kwargs)``, ``encode(sentences, batch_size=32, show_progress_bar=True,
convert_to_numpy=False, convert_to_tensor=False, device=None)``, ``save(output_path, merge_before_save=False,
save_config=True)``); ``engine.Encoder`` keeps sentence-transformers' conventions (numpy by default) instead.

As in llm2vec, ``encode`` gives a plain string no instruction (``["", text]``); a model's default instruction
(a run's, recorded by ``save``) is ``Encoder.encode``'s default, not this class's.

What differs from llm2vec, on purpose: texts are read with the engine's one rule
(``engine.encoding.tokenize_for_encoding``: the instruction ends in a newline, not a space, and an EOS token is
appended and pooled), so training, this class, ``Encoder`` and an exported folder embed identically; adapters are
folded into the weights for inference whatever ``merge_peft`` says (the embeddings are the same), and
``merge_peft=False`` only means ``save`` writes the adapter rather than full weights unless
``merge_before_save=True``, as in llm2vec. Model keywords other than those listed in :data:`MODEL_KWARGS` are a
TypeError rather than being passed on to transformers (which would silently store unknown ones in the config).
"""
import json
import os
import shutil
import socket

import torch

from .encoder import _LLM2VEC_POOLING, Encoder, resolve_chain, split_devices

ENCODER_KWARGS = ("pooling_mode", "max_length", "doc_max_length", "skip_instruction")
MODEL_KWARGS = ("torch_dtype", "dtype", "device_map", "max_memory", "offload_folder", "low_cpu_mem_usage")
_POOLING_NAMES = {v: k for k, v in _LLM2VEC_POOLING.items()}
# The chat wrap and default instruction a saved model encodes with (engine.encoder reads them)
ENGINE_TEXT_FILE = "engine_text.json"


def _check_kwargs(where, kwargs, allowed):
    bad = sorted(set(kwargs) - set(allowed))
    if bad:
        raise TypeError(f"{where}: unsupported keyword argument(s) {bad}; this drop-in supports {sorted(allowed)}")


def _run_above(path):
    """The nearest folder above ``path`` that is a training run's ``output_dir`` with its adapters or checkpoints
    in it (``adapter/`` or ``best/`` adapters, or ``config.yaml`` and ``checkpoints/``), else None."""
    from .encoder import _no_model_files, has_run_adapters

    a = os.path.dirname(path)
    while a != os.path.dirname(a):
        if has_run_adapters(a) or (_no_model_files(a) and os.path.isfile(os.path.join(a, "config.yaml"))
                                   and os.path.isdir(os.path.join(a, "checkpoints"))):
            return a
        a = os.path.dirname(a)
    return None


def _same_adapter_files(source, folder):
    """Whether ``folder`` holds exactly the adapter files a save copies from ``source`` (an earlier save of this
    adapter, or another rank's), byte for byte."""
    import filecmp

    if not source:
        return False
    names = [f for f in os.listdir(source) if f.startswith("adapter_") and os.path.isfile(os.path.join(source, f))]
    return bool(names) and all(os.path.isfile(os.path.join(folder, f)) and
                               filecmp.cmp(os.path.join(source, f), os.path.join(folder, f), shallow=False)
                               for f in names)


class LLM2Vec:
    """llm2vec's ``LLM2Vec`` over an ``engine.Encoder`` (``self.encoder``); ``model`` / ``tokenizer`` / ``config``
    and the four encoder settings are the attributes llm2vec has."""

    def __init__(self, encoder, pooling_mode="mean", max_length=512, doc_max_length=400, skip_instruction=True,
                 unmerged_adapter=None):
        if not isinstance(encoder, Encoder):
            raise TypeError("LLM2Vec(encoder, ...): build it with LLM2Vec.from_pretrained(...), or pass an engine.Encoder")
        self.encoder = encoder
        self.pooling_mode, self.max_length = pooling_mode, max_length
        self.doc_max_length, self.skip_instruction = doc_max_length, skip_instruction
        self._unmerged_adapter = unmerged_adapter
        self._sync()

    def _sync(self):
        e = self.encoder
        e.pooling = _LLM2VEC_POOLING.get(self.pooling_mode, self.pooling_mode)
        e.max_length, e.doc_max_length, e.skip_instruction = self.max_length, self.doc_max_length, self.skip_instruction

    @property
    def model(self):
        return self.encoder.model

    @property
    def tokenizer(self):
        return self.encoder.tokenizer

    @property
    def config(self):
        return self.encoder.model.config

    @classmethod
    def from_pretrained(cls, base_model_name_or_path, peft_model_name_or_path=None, merge_peft=False,
                        enable_bidirectional=True, **kwargs):
        """llm2vec's loader: the base (a hub id or folder, an MNTP checkpoint with its adapter beside it, an engine
        run or export), then ``peft_model_name_or_path``'s adapter; encoder settings from ``llm2vec_config.json``
        of the adapter (else the base), overridden by ``pooling_mode`` / ``max_length`` / ``doc_max_length`` /
        ``skip_instruction`` when given (not None)."""
        _check_kwargs("LLM2Vec.from_pretrained", kwargs, ENCODER_KWARGS + MODEL_KWARGS)
        if not isinstance(merge_peft, bool) or not isinstance(enable_bidirectional, bool):
            raise TypeError("LLM2Vec.from_pretrained: merge_peft and enable_bidirectional must be True or False")
        enc_args = {k: kwargs.pop(k) for k in ENCODER_KWARGS if kwargs.get(k) is not None}
        kwargs = {k: v for k, v in kwargs.items() if k in MODEL_KWARGS}
        if "pooling_mode" in enc_args and enc_args["pooling_mode"] not in _LLM2VEC_POOLING:
            raise ValueError(f"pooling_mode {enc_args['pooling_mode']!r} is not one of {sorted(_LLM2VEC_POOLING)}")
        dtype = kwargs.pop("torch_dtype", None)
        dtype = kwargs.pop("dtype", dtype)
        encoder = Encoder.from_pretrained(
            base_model_name_or_path, peft_model_name_or_path, dtype=dtype if dtype is not None else "auto",
            device_map=kwargs.pop("device_map", None), bidirectional=enable_bidirectional,
            pooling_mode=enc_args.get("pooling_mode"), max_length=enc_args.get("max_length"),
            doc_max_length=enc_args.get("doc_max_length"), skip_instruction=enc_args.get("skip_instruction"),
            **kwargs)
        info = resolve_chain(base_model_name_or_path, peft_model_name_or_path)
        s = info["settings"]
        # llm2vec's 400 cuts documents of an llm2vec checkpoint; an engine run or export records its own settings
        # (none), which Encoder and the export follow, so this class does too
        engine_made = info["engine_meta"] is not None or os.path.isfile(
            os.path.join(os.path.expanduser(str(base_model_name_or_path)), "engine_export.json"))
        settings = {
            "pooling_mode": enc_args.get("pooling_mode", _POOLING_NAMES.get(encoder.pooling, encoder.pooling)),
            "max_length": enc_args.get("max_length", s.get("max_length", 512)),
            "doc_max_length": enc_args.get("doc_max_length", s.get("doc_max_length", None if engine_made else 400)),
            "skip_instruction": enc_args.get("skip_instruction", s.get("skip_instruction", True)),
        }
        unmerged = None
        if peft_model_name_or_path is not None and not merge_peft:
            unmerged = resolve_chain(peft_model_name_or_path)["adapters"][-1]
        return cls(encoder, unmerged_adapter=unmerged, **settings)

    def encode(self, sentences, batch_size=32, show_progress_bar=True, convert_to_numpy=False,
               convert_to_tensor=False, device=None):
        """Embeddings of ``sentences`` (a string, strings, or ``[instruction, text]`` pairs): a float32 CPU
        ``torch.Tensor`` (N, H), or numpy with ``convert_to_numpy=True`` (``convert_to_tensor=True`` wins).
        As in llm2vec, a plain string is ``["", text]``: no instruction, not even the model's default one (which
        ``Encoder.encode`` applies), so ``encode(documents)`` embeds documents plain; a pair keeps its own."""
        self._sync()
        if device is None and not split_devices(self.encoder.model):  # a device_map split stays where it is
            device = "cuda" if torch.cuda.is_available() else "cpu"
        as_numpy = bool(convert_to_numpy) and not convert_to_tensor
        emb = self.encoder.encode(sentences, batch_size=batch_size, show_progress_bar=show_progress_bar,
                                  convert_to_numpy=False, convert_to_tensor=True, device=device, instruction="")
        if isinstance(sentences, str):
            emb = emb.unsqueeze(0)  # llm2vec treats a lone string as a list of one
        emb = emb.to(torch.float32).cpu()
        return emb.numpy() if as_numpy else emb

    def _check_save_target(self, output_path, merge_before_save=False):
        """A save writes into ``output_path`` in place (llm2vec's behaviour), so it must not be, hold or lie inside
        a folder this model was loaded from, nor be or lie inside a training run folder (its ``best/``,
        ``adapter/``, a checkpoint), nor hold another model's adapter (``adapter_config.json`` other than the one
        this save copies, or a run's ``engine_encoder.json``): full weights saved into a run make it a model folder
        (Encoder and the export would then load them instead of its best/ adapter), a save into another run's
        ``best/`` replaces the adapter that run selected, and an adapter saved onto its own folder fails half-way
        (copying a file onto itself). ValueError, before anything is written."""
        from .encoder import _holds_run_adapters, run_folder
        from .export import overlapping_folder

        src = getattr(self.encoder, "source", None) or {}
        folders = [f for f in [src.get("base"), *(src.get("adapters") or []), self._unmerged_adapter]
                   if f and os.path.isdir(os.path.expanduser(str(f)))]
        folders += [r for r in map(run_folder, folders) if r]
        p = os.path.realpath(os.path.expanduser(str(output_path)))
        clash = overlapping_folder(p, folders)
        if clash:
            how, q = clash
            raise ValueError(f"LLM2Vec.save: {output_path} {how} the folder the model was loaded from ({q}): "
                             f"save to a folder of its own")
        if os.path.isdir(p) and _holds_run_adapters(p):
            raise ValueError(f"LLM2Vec.save: {output_path} is a training run folder: save to a folder of its own")
        run = run_folder(p) or _run_above(p)
        if run:
            raise ValueError(f"LLM2Vec.save: {output_path} lies inside the training run folder {run}: save to a "
                             f"folder of its own")
        theirs = [f for f in ("engine_encoder.json", "adapter_config.json") if os.path.isfile(os.path.join(p, f))]
        if theirs and not (theirs == ["adapter_config.json"] and not merge_before_save and
                           _same_adapter_files(self._unmerged_adapter, p)):
            raise ValueError(f"LLM2Vec.save: {output_path} holds another model's {theirs[0]}: save to a folder of "
                             f"its own")

    def save(self, output_path, merge_before_save=False, save_config=True):
        """llm2vec's save: full (merged) weights and the tokenizer, or, for a model loaded with ``merge_peft=False``
        and saved without ``merge_before_save``, the adapter alone (load it back with ``peft_model_name_or_path``);
        ``save_config`` writes ``llm2vec_config.json`` with the four encoder settings. A new folder appears whole or
        not at all (written beside it, then renamed); an existing one is written in place, as llm2vec does."""
        from .files import sync_folder, sync_tree

        self._sync()
        self._check_save_target(output_path, merge_before_save)
        final = os.path.normpath(os.path.expanduser(str(output_path)))
        if os.path.exists(final):
            self._write(final, merge_before_save, save_config)
            return
        parent = os.path.dirname(os.path.abspath(final))
        os.makedirs(parent, exist_ok=True)
        tmp = f"{final}.tmp-{socket.gethostname()}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        try:
            self._write(tmp, merge_before_save, save_config)
            sync_tree(tmp)
            try:
                os.rename(tmp, final)
            except OSError:
                if not os.path.isdir(final):
                    raise
                # another process saved the same model there first (every rank of a script calling save()):
                # that folder stands, this copy is dropped
                shutil.rmtree(tmp, ignore_errors=True)
                return
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        sync_folder(parent)

    def _write(self, output_path, merge_before_save, save_config):
        if self._unmerged_adapter and not merge_before_save:
            for f in os.listdir(self._unmerged_adapter):
                if f.startswith("adapter_") and os.path.isfile(os.path.join(self._unmerged_adapter, f)):
                    shutil.copy2(os.path.join(self._unmerged_adapter, f), os.path.join(output_path, f))
        else:
            self.model.save_pretrained(output_path, safe_serialization=True)
        self.tokenizer.save_pretrained(output_path)
        with open(os.path.join(output_path, ENGINE_TEXT_FILE), "w") as f:  # what llm2vec_config.json cannot hold
            json.dump({"chat": self.encoder.chat, "instruction": self.encoder.default_instruction}, f, indent=2)
        if save_config:
            with open(os.path.join(output_path, "llm2vec_config.json"), "w") as f:
                json.dump({"pooling_mode": self.pooling_mode, "max_length": self.max_length,
                           "doc_max_length": self.doc_max_length, "skip_instruction": self.skip_instruction}, f,
                          indent=4)

"""MTEB 2.x for engine encoders: a wrapper mteb accepts, llm2vec's per-task instructions, an offline STS task.

    import mteb
    from engine.mteb_model import EngineMTEBModel, load_export, local_sts_task
    task = local_sts_task("data/stsbenchmark/sts-dev.csv", max_pairs=200)        # offline
    mteb.evaluate(EngineMTEBModel("outputs/smollm2-135m-simcse"), task)         # a run, adapter or export
    mteb.evaluate(load_export("exported/smollm2-simcse"), task)                 # the export in sentence-transformers

Both give the same score: every task gets its prompt from one dict (:func:`engine.task_instructions.mteb_prompts`,
llm2vec's 67 instructions keyed as mteb reads a model's ``prompts``), which the export carries in its
``config_sentence_transformers.json`` and this wrapper resolves with mteb's own lookup. Over an export, the wrapper
takes the export's recorded prompts and applies them as sentence-transformers does (:func:`export_prompt_for`), so
both paths embed every side of every task alike. Over a run or an adapter, a task the dict does not cover gets the
model's own instruction where an export's ``default_prompt_name`` would apply it (a task without a prompt type, for
a model trained with an instruction), else mteb's own instruction for it (``task_metadata.prompt``; never on the
documents of a retrieval or reranking task), which an export does not have: such a model is filed under its own
revision (``local-...``), never an export's.

mteb names a model's results (and its cache folder) after ``ModelMeta.name`` / ``revision``, and its cache hands
back a task's stored result by task name. This wrapper carries a real ``ModelMeta`` whose revision is a
fingerprint of what the model computes; a :func:`local_sts_task` over another file or ``max_pairs`` needs its own
``name=`` (or ``cache=None``, as ``engine.evaluate`` passes); a ``SentenceTransformer`` loaded from a local folder
has no name (sentence-transformers reads none from it), so load an export with :func:`load_export`, which names it
from its ``engine_export.json``.
"""
import json
import os

import numpy as np
import torch
from mteb.models.abs_encoder import AbsEncoder, get_prompt_name
from mteb.models.model_meta import ModelMeta
from mteb.types import PromptType

from .encoding import instruction_prefix
from .task_instructions import ASYMMETRIC_TYPES, LLM2VEC_TASKS, mteb_prompts

LOCAL_STS_NAME = "STSBenchmarkLocal"
# llm2vec's instruction per task name (plus the offline STS copy), for reference and overrides
TASK_INSTRUCTIONS = {name: instr for name, (_, instr) in LLM2VEC_TASKS.items()}
TASK_INSTRUCTIONS[LOCAL_STS_NAME] = TASK_INSTRUCTIONS["STSBenchmark"]


def mteb_own_instruction(task_metadata, prompt_type=None):
    """mteb's instruction for a task (``TaskMetadata.prompt``: a string, or one per prompt type), else ''. The
    documents of a retrieval or reranking task get '' (llm2vec encodes them plain; mteb's plain-string prompt is the
    query's)."""
    key = prompt_type.value if isinstance(prompt_type, PromptType) else prompt_type
    if key == PromptType.document.value and getattr(task_metadata, "type", None) in ASYMMETRIC_TYPES:
        return ""
    p = getattr(task_metadata, "prompt", None)
    if isinstance(p, dict):
        p = p.get(key or PromptType.query.value)
    return p if isinstance(p, str) else ""


def prompt_for(prompts, task_metadata, prompt_type=None):
    """The prompt text for one side of a task: the ``prompts`` entry mteb itself would pick
    (``get_prompt_name``); else, for a task mteb calls without a prompt type (classification, clustering, ...), the
    model's own ``query`` prompt, as sentence-transformers applies an export's ``default_prompt_name`` there; else
    mteb's own instruction for the task (as a prompt, newline-terminated)."""
    pt = PromptType(prompt_type) if isinstance(prompt_type, str) else prompt_type
    name = get_prompt_name(prompts, task_metadata, pt)
    if (name is not None and name == getattr(task_metadata, "name", None) and pt == PromptType.document
            and getattr(task_metadata, "type", None) in ASYMMETRIC_TYPES):
        return ""  # a task the caller's table added: its retrieval documents stay plain, as llm2vec's table's do
    if name is not None:
        return prompts[name]
    if pt is None and prompts.get("query"):
        return prompts["query"]
    return instruction_prefix(mteb_own_instruction(task_metadata, pt))


def export_prompt_for(prompts, task_metadata, prompt_type=None, default=""):
    """The prompt sentence-transformers applies to one side of a task for an export with these ``prompts`` and
    default prompt ``default`` (as mteb's ``SentenceTransformerEncoderWrapper`` calls it): the entry mteb's lookup
    picks, else ``encode_query``'s ``query`` prompt / ``encode_document``'s ``document`` (``passage``, ``corpus``)
    one, else the default prompt. Never mteb's own instruction: the export does not have it."""
    from mteb.models.abs_encoder import AbsEncoder

    pt = PromptType(prompt_type) if isinstance(prompt_type, str) else prompt_type
    valid = AbsEncoder.validate_task_to_prompt_name(prompts, raise_for_invalid_keys=False)[0] or {}
    name = get_prompt_name(valid, task_metadata, pt)
    if name is not None:
        return valid[name] or ""
    sides = {PromptType.query: ("query",), PromptType.document: ("document", "passage", "corpus")}
    for side in sides.get(pt, ()):
        if side in prompts:
            return prompts[side] or ""
    return default or ""


def with_subtasks(table):
    """``table`` (task name -> instruction) with each aggregate task's entry also under the tasks it is made of:
    mteb runs an aggregate (CQADupstackRetrieval) as those tasks, under their own names, so an entry under the
    aggregate's name alone would never be looked up. An entry a subtask has of its own wins."""
    import mteb

    out = {}
    for name, instr in (table or {}).items():
        try:
            task = mteb.get_task(name)
        except KeyError:  # not an mteb task name (the offline STS copy, a task type): kept as it is
            continue
        if task.is_aggregate:
            out.update({t.metadata.name: instr for t in task.metadata.tasks})
    out.update(table or {})
    return out


def instruction_for(task_metadata, prompt_type=None, table=None):
    """The prompt for one side of a task, from llm2vec's table (``table`` overrides / extends it)."""
    return prompt_for(mteb_prompts("", with_subtasks(table)), task_metadata, prompt_type)


class EngineMTEBModel(AbsEncoder):
    """An ``engine.Encoder`` as an mteb model. ``model``: a path / hub id (loaded with ``Encoder.from_pretrained``)
    or an ``Encoder``. ``instructions``: task name -> instruction, overrides / additions to llm2vec's table (an
    aggregate task's name covers the tasks it is made of). ``name`` / ``revision``: what mteb files (and caches)
    the results under. Default: an export's recorded name and revision (its content hash) when it is loaded as
    exported (no settings but ``dtype``; in another dtype than the export's, which computes other numbers, the
    revision gets that dtype appended: ``<hash>-bf16``; a weighted_mean export, whose prompted embeddings
    sentence-transformers computes otherwise, gets :data:`WEIGHTED_MEAN_TAG`); else
    ``llm2vec-engine/<folder name>`` and ``local-<fingerprint>`` (:func:`encoder_fingerprint`: the weights,
    settings and prompts), so mteb's result
    cache never hands one model's score to another (another adapter of the run, a retrained run in the same
    folder, another ``Encoder``)."""

    def __init__(self, model, revision=None, *, device=None, instructions=None, name=None, **encoder_kwargs):
        from .encoder import Encoder

        if isinstance(model, Encoder):
            self.encoder = model
            path = name or "engine-encoder"
        else:
            self.encoder = Encoder.from_pretrained(model, device=device, **encoder_kwargs)
            path = model
            recorded = export_identity(model)
            if recorded and not instructions and not set(encoder_kwargs) - {"dtype", "torch_dtype"}:
                name = name or recorded[0]  # as exported: its recorded identity, in the dtype it was run in
                if revision is None:
                    loaded = str(next(self.encoder.model.parameters()).dtype).replace("torch.", "")
                    same = loaded == export_dtype(model)
                    revision = recorded[1] if same else f"{recorded[1]}-{_DTYPE_TAGS.get(loaded, loaded)}"
                    if self.encoder.pooling == "weighted_mean":  # sentence-transformers weighs prompted texts
                        revision += WEIGHTED_MEAN_TAG  # otherwise: never the export's cache entry
        self.model = self.encoder
        folder_prompts = getattr(self.encoder, "folder_prompts", None)
        # over an export: its recorded prompts, applied as sentence-transformers applies them (export_prompt_for)
        self.as_export = folder_prompts is not None and not instructions
        if self.as_export:
            self.prompts = dict(folder_prompts)
            if self.encoder.default_instruction:  # from_pretrained(instruction=...) overrides the folder's
                self.prompts["query"] = instruction_prefix(self.encoder.default_instruction)
        else:
            self.prompts = mteb_prompts(self.encoder.default_instruction, with_subtasks(instructions))
        if revision is None:  # mteb caches results by (name, revision): the revision names what this model computes
            revision = "local-" + encoder_fingerprint(self.encoder, self.prompts)
        base = os.path.basename(os.path.normpath(str(path))) or "encoder"
        dec = self.encoder.model
        self.mteb_model_meta = ModelMeta(
            loader=None, name=name or f"llm2vec-engine/{base}", revision=revision, release_date=None,
            languages=None, n_parameters=sum(p.numel() for p in dec.parameters()), memory_usage_mb=None,
            max_tokens=self.encoder.max_length, embed_dim=dec.config.hidden_size, license=None, open_weights=True,
            public_training_code=None, public_training_data=None, framework=["PyTorch"], reference=None,
            similarity_fn_name="cosine", use_instructions=True, training_datasets=None,
            experiment_kwargs={"pooling": self.encoder.pooling, "max_length": self.encoder.max_length})

    def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):
        texts = [t for batch in inputs for t in batch["text"]]
        if self.as_export:
            prompt = export_prompt_for(self.prompts, task_metadata, prompt_type,
                                       instruction_prefix(self.encoder.default_instruction))
        else:
            prompt = prompt_for(self.prompts, task_metadata, prompt_type)
        emb = self.encoder.encode(texts, instruction=prompt, batch_size=kwargs.get("batch_size", 32),
                                  show_progress_bar=kwargs.get("show_progress_bar", False))
        return np.asarray(emb, dtype=np.float32)


@torch.no_grad()
def encoder_fingerprint(encoder, prompts):
    """12 hex digits that change with anything the encoder's embeddings depend on: every parameter (its name, shape,
    dtype and two fp64 moments, computed where it lives: one pass over the weights, about a second for a 7B model on
    a GPU), the settings of :class:`engine.Encoder` and the prompts. mteb files and caches results by model name and
    revision, so two models, or two adapters of one run, must not share a revision."""
    import hashlib

    h = hashlib.sha256()
    for name, p in encoder.model.named_parameters():
        flat, s1, s2 = p.detach().reshape(-1), 0.0, 0.0
        for i in range(0, flat.numel(), 1 << 24):  # in slices: no fp64 copy of a whole 7B embedding matrix
            t = flat[i:i + (1 << 24)].double()
            s1, s2 = s1 + float(t.sum()), s2 + float((t * t).sum())
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|{s1!r}|{s2!r}\n".encode())
    settings = {k: getattr(encoder, k, None) for k in ("pooling", "max_length", "default_instruction",
                                                          "doc_max_length", "skip_instruction", "normalize")}
    settings["chat"] = repr(getattr(encoder, "chat", None))
    h.update(json.dumps([settings, prompts], sort_keys=True, default=str).encode())
    return h.hexdigest()[:12]


_DTYPE_TAGS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# appended to a weighted_mean export's revision in this wrapper: sentence-transformers weighs a prompted text's
# tokens by their position in the whole sequence, the engine by their rank among the pooled tokens, so the two
# paths' embeddings differ wherever a prompt applies (``engine.export`` refuses an instruction unless forced)
WEIGHTED_MEAN_TAG = "-engine-weighted-mean"


def _export_meta(folder):
    path = os.path.join(os.path.expanduser(str(folder)), "engine_export.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def export_identity(folder):
    """(name, revision) an export records in ``engine_export.json``, or None for another folder."""
    meta = _export_meta(folder)
    if not meta.get("model_name") or not meta.get("revision"):
        return None
    return meta["model_name"], meta["revision"]


def export_dtype(folder):
    """The dtype an export runs in (``engine_export.json``'s "dtype", e.g. "float32"), or None."""
    return _export_meta(folder).get("dtype")


def load_export(folder, **st_kwargs):
    """``SentenceTransformer(folder)`` named for mteb: its model card data gets the export's recorded model name
    and revision, so ``mteb.evaluate`` files (and caches) its results under them."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.model_card import SentenceTransformerModelCardData

    ident = export_identity(folder)
    if ident is None:
        raise ValueError(f"{folder} is not an engine export with a recorded name (engine_export.json)")
    card = SentenceTransformerModelCardData(model_name=ident[0], local_files_only=True)
    card.base_model_revision = ident[1]  # what mteb reads as the revision of a SentenceTransformer
    return SentenceTransformer(str(folder), model_card_data=card, **st_kwargs)


def local_sts_task(path, max_pairs=None, name=LOCAL_STS_NAME, pairs=None):
    """An mteb STS task over a local STS Benchmark TSV (``engine.data.read_sts``), scored 0-5; no network.
    ``pairs``: that file's pairs already read (and cut to ``max_pairs``), so the file is read once."""
    from datasets import Dataset, DatasetDict
    from mteb.abstasks.sts import AbsTaskSTS
    from mteb.abstasks.task_metadata import TaskMetadata

    from .data import read_sts

    if pairs is None:
        pairs = read_sts(path)
    pairs = pairs[:max_pairs] if max_pairs else pairs

    class LocalSTS(AbsTaskSTS):
        min_score = 0
        max_score = 5
        metadata = TaskMetadata(
            name=name, type="STS", category="t2t", modalities=["text"], main_score="cosine_spearman",
            description=f"STS Benchmark pairs read from a local file ({os.path.basename(path)}, {len(pairs)} pairs).",
            reference="https://ixa2.si.ehu.eus/stswiki/index.php/STSbenchmark",
            dataset={"path": "local/" + os.path.basename(path), "revision": "local"}, eval_splits=["test"],
            eval_langs=["eng-Latn"], date=("2017-01-01", "2017-12-31"), dialect=[], domains=["News", "Written"],
            task_subtypes=[], license="cc-by-sa-4.0", annotations_creators="human-annotated",
            sample_creation="found", bibtex_citation="")

        def load_data(self, num_proc=None, **kwargs):
            self.dataset = DatasetDict({"test": Dataset.from_dict({
                "sentence1": [p[0] for p in pairs], "sentence2": [p[1] for p in pairs],
                "score": [float(p[2]) for p in pairs]})})
            self.data_loaded = True

    return LocalSTS()

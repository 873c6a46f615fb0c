"""MTEB 2.x for engine encoders: a wrapper mteb accepts, llm2vec's per-task instructions, an offline STS task.

    import mteb
    from engine.mteb_model import EngineMTEBModel, local_sts_task
    model = EngineMTEBModel("outputs/smollm2-135m-simcse")           # or an exported folder, or an Encoder
    mteb.evaluate(model, mteb.get_tasks(tasks=["STSBenchmark"]), cache=None)
    mteb.evaluate(model, local_sts_task("data/stsbenchmark/sts-dev.csv", max_pairs=200), cache=None)  # offline

mteb hands an ``Encoder`` that lacks ``mteb_model_meta`` an empty ``ModelMeta`` and fails; this class carries
a real one (name, embedding size, max tokens, parameter count, cosine similarity, instructions used) and
implements mteb's ``encode(inputs, *, task_metadata, hf_split, hf_subset, prompt_type, **kwargs)``.
"""
import os

import numpy as np
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta
from mteb.types import PromptType

# llm2vec's MTEB instructions (McGill-NLP/llm2vec test_configs/mteb/task_to_instructions.json and the STS
# entries of its evaluation script). Retrieval: the query gets the instruction, documents none; symmetric
# tasks (STS, ...): both sides get it.
_DUPSTACK = ("Given a question, retrieve detailed question descriptions from Stackexchange that are duplicates "
             "to the given question:")
TASK_INSTRUCTIONS = {
    "ClimateFEVER": "Given a claim about climate change, retrieve documents that support or refute the claim:",
    "HotpotQA": "Given a multi-hop question, retrieve documents that can help answer the question:",
    "FEVER": "Given a claim, retrieve documents that support or refute the claim:",
    "MSMARCO": "Given a web search query, retrieve relevant passages that answer the query:",
    "DBPedia": "Given a query, retrieve relevant entity descriptions from DBPedia:",
    "NQ": "Given a question, retrieve Wikipedia passages that answer the question:",
    "QuoraRetrieval": "Given a question, retrieve questions that are semantically equivalent to the given question:",
    "SCIDOCS": "Given a scientific paper title, retrieve paper abstracts that are cited by the given paper:",
    "TRECCOVID": "Given a query on COVID-19, retrieve documents that answer the query:",
    "Touche2020": "Given a question, retrieve detailed and persuasive arguments that answer the question:",
    "SciFact": "Given a scientific claim, retrieve documents that support or refute the claim:",
    "NFCorpus": "Given a question, retrieve relevant documents that best answer the question:",
    "ArguAna": "Given a claim, find documents that refute the claim:",
    "FiQA2018": "Given a financial question, retrieve user replies that best answer the question:",
    **{f"CQADupstack{s}Retrieval": _DUPSTACK for s in ("Tex", "Webmasters", "English", "Gaming", "Gis", "Unix",
                                                      "Mathematica", "Stats", "Physics", "Programmers", "Android",
                                                      "Wordpress")},
    **{name: "Retrieve semantically similar text:" for name in (
        "STS12", "STS13", "STS14", "STS15", "STS16", "STS17", "STS22", "BIOSSES", "SICK-R", "STSBenchmark")},
    "SummEval": "Given a news summary, retrieve other semantically similar summaries:",
}
LOCAL_STS_NAME = "STSBenchmarkLocal"
TASK_INSTRUCTIONS[LOCAL_STS_NAME] = TASK_INSTRUCTIONS["STSBenchmark"]


def instruction_for(task_metadata, prompt_type=None, table=None):
    """The instruction for one side of a task: the table's entry (queries only for retrieval-like tasks), else ''."""
    table = TASK_INSTRUCTIONS if table is None else table
    name = task_metadata.name
    instr = table.get(name, table.get(name.split(".")[0], ""))
    if prompt_type == PromptType.document or prompt_type == "document":
        return ""  # documents are encoded plain, as llm2vec does
    return instr


class EngineMTEBModel(AbsEncoder):
    """An ``engine.Encoder`` as an mteb model. ``model``: a path / hub id (loaded with ``Encoder.from_pretrained``)
    or an ``Encoder``. ``instructions``: overrides / additions to ``TASK_INSTRUCTIONS``."""

    def __init__(self, model, revision=None, *, device=None, instructions=None, name=None, **encoder_kwargs):
        from .encoder import Encoder

        if isinstance(model, Encoder):
            self.encoder = model
            path = name or "engine-encoder"
        else:
            self.encoder = Encoder.from_pretrained(model, device=device, **encoder_kwargs)
            path = model
        self.model = self.encoder
        self.instructions = {**TASK_INSTRUCTIONS, **(instructions or {})}
        base = os.path.basename(os.path.normpath(str(path))) or "encoder"
        dec = self.encoder.model
        self.mteb_model_meta = ModelMeta(
            loader=None, name=name or f"llm2vec-engine/{base}", revision=revision or "local", release_date=None,
            languages=None, n_parameters=sum(p.numel() for p in dec.parameters()), memory_usage_mb=None,
            max_tokens=self.encoder.max_length, embed_dim=dec.config.hidden_size, license=None, open_weights=True,
            public_training_code=None, public_training_data=None, framework=["PyTorch"], reference=None,
            similarity_fn_name="cosine", use_instructions=True, training_datasets=None,
            experiment_kwargs={"pooling": self.encoder.pooling, "max_length": self.encoder.max_length})

    def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):
        texts = [t for batch in inputs for t in batch["text"]]
        instr = instruction_for(task_metadata, prompt_type, self.instructions)
        emb = self.encoder.encode(texts, instruction=instr, batch_size=kwargs.get("batch_size", 32),
                                  show_progress_bar=kwargs.get("show_progress_bar", False))
        return np.asarray(emb, dtype=np.float32)


def local_sts_task(path, max_pairs=None, name=LOCAL_STS_NAME):
    """An mteb STS task over a local STS Benchmark TSV (``engine.data.read_sts``), scored 0-5; no network."""
    from datasets import Dataset, DatasetDict
    from mteb.abstasks.sts import AbsTaskSTS
    from mteb.abstasks.task_metadata import TaskMetadata

    from .data import read_sts

    pairs = read_sts(path)[:max_pairs] if max_pairs else read_sts(path)

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

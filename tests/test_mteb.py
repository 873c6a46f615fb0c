"""MTEB 2.x: one score whichever path (engine wrapper, the export in sentence-transformers, engine.evaluate), with
mteb's result cache on; llm2vec's 67 task instructions; two exports filed under their own names."""
import json
import os

import pytest

from .helpers import STS, run_cmd
from .test_export import _chain, tok  # noqa: F401  (module fixture)

mteb = pytest.importorskip("mteb")
pytest.importorskip("sentence_transformers")


def test_llm2vec_instruction_table_is_whole_and_keyed_as_mteb_reads_it():
    from mteb.models.abs_encoder import AbsEncoder

    from engine.mteb_model import TASK_INSTRUCTIONS, instruction_for
    from engine.task_instructions import LLM2VEC_TASKS, mteb_prompts

    assert len(LLM2VEC_TASKS) == 67
    assert LLM2VEC_TASKS["Banking77Classification"][1] == "Given a online banking query, find the corresponding intents:"
    assert LLM2VEC_TASKS["SciDocsRR"] == ("Reranking", "Given a title of a scientific paper, retrieve the titles of "
                                                       "other relevant papers:")
    assert TASK_INSTRUCTIONS["ArguAna"] == "Given a claim, find documents that refute the claim:"
    prompts = mteb_prompts("Represent the sentence:")
    valid, invalid = AbsEncoder.validate_task_to_prompt_name(prompts, raise_for_invalid_keys=False)
    assert not invalid and len(valid) == len(prompts)  # every key is a task / type / side mteb knows
    q = mteb.get_task("MSMARCO").metadata
    assert instruction_for(q, "query") == "Given a web search query, retrieve relevant passages that answer the query:\n"
    assert instruction_for(q, "document") == ""  # retrieval documents plain, as llm2vec
    sts = mteb.get_task("STS12").metadata
    assert instruction_for(sts, "query") == instruction_for(sts, "document") == "Retrieve semantically similar text:\n"
    # a task llm2vec has no instruction for: mteb's own (here, a retrieval task that carries one)
    other = next(t.metadata for t in mteb.get_tasks(task_types=["Retrieval"], languages=["eng"])
                 if t.metadata.name not in LLM2VEC_TASKS and isinstance(t.metadata.prompt, dict)
                 and t.metadata.prompt.get("query"))
    assert instruction_for(other, "query") == other.prompt["query"].rstrip() + "\n"
    # a task without a prompt type that neither the table nor a type entry covers: sentence-transformers applies the
    # export's default prompt (the model's instruction) there, and so does the wrapper
    from engine.mteb_model import prompt_for

    bare = next(t.metadata for t in mteb.get_tasks(task_types=["Classification"], languages=["eng"])
                if t.metadata.name not in prompts and t.metadata.type not in prompts)
    assert prompt_for(prompts, bare) == prompts["query"] == "Represent the sentence:\n"
    assert prompt_for(prompts, bare, "document") == ""  # documents stay plain (the export's "document" prompt)
    assert prompt_for(mteb_prompts(""), bare) == instruction_for(bare)  # no instruction: mteb's own, as before
    # a retrieval task the caller's table adds: its instruction reaches the queries, never the documents (the
    # table gives it no type, and mteb's lookup falls back to the bare task name for both sides)
    added = next(t.metadata for t in mteb.get_tasks(task_types=["Retrieval"], languages=["eng"])
                 if t.metadata.name not in LLM2VEC_TASKS)
    table = {added.name: "Find the passage:"}
    assert instruction_for(added, "query", table) == "Find the passage:\n"
    assert instruction_for(added, "document", table) == ""


def test_variants_of_llm2vec_tasks_get_their_base_tasks_instruction():
    """MTEB(eng, v2) runs FEVERHardNegatives, Touche2020Retrieval.v3, ...: outside llm2vec's 67 names, their queries
    were encoded with no instruction. The variant table agrees with mteb's metadata (adapted from the base task,
    the same type, English only), and every retrieval task of MTEB(eng, v2) that one covers instructs its queries
    and leaves its documents plain."""
    from engine.mteb_model import instruction_for
    from engine.task_instructions import LLM2VEC_TASK_VARIANTS, LLM2VEC_TASKS

    for name, base in LLM2VEC_TASK_VARIANTS.items():
        m = mteb.get_task(name).metadata
        assert base in (m.adapted_from or []) and m.type == LLM2VEC_TASKS[base][0], name
    covered = 0
    for t in mteb.get_benchmark("MTEB(eng, v2)").tasks:
        m = t.metadata
        if m.type != "Retrieval" or m.name not in {**LLM2VEC_TASKS, **LLM2VEC_TASK_VARIANTS}:
            continue
        base = LLM2VEC_TASK_VARIANTS.get(m.name, m.name)
        assert instruction_for(m, "query") == LLM2VEC_TASKS[base][1] + "\n", m.name
        assert instruction_for(m, "document") == "", m.name
        covered += m.name in LLM2VEC_TASK_VARIANTS
    assert covered >= 4  # ClimateFEVER, FEVER and HotpotQA hard negatives, Touche2020 v3


def test_one_score_whichever_path_with_the_cache_on(tmp_path, tok):  # noqa: F811
    from engine.export import export
    from engine.mteb_model import LOCAL_STS_NAME, EngineMTEBModel, load_export, local_sts_task

    sup = _chain(str(tmp_path / "src"), tok, "mean")
    task = local_sts_task(os.path.join(STS, "sts-dev.csv"), max_pairs=60)
    cache = mteb.ResultCache(str(tmp_path / "mteb-cache"))
    model = EngineMTEBModel(sup, device="cpu")
    meta = model.mteb_model_meta
    assert meta.name == "llm2vec-engine/sup" and meta.embed_dim == 48 and meta.similarity_fn_name == "cosine"
    wrapper = mteb.evaluate(model, task, cache=cache, show_progress_bar=False).task_results[0].get_score()
    plain = EngineMTEBModel(model.encoder, instructions={LOCAL_STS_NAME: ""}, name="x/plain")
    no_instr = mteb.evaluate(plain, task, cache=None, show_progress_bar=False).task_results[0].get_score()
    assert abs(wrapper - no_instr) > 1e-6  # the STS instruction is used

    # the cache is keyed by (name, revision): another model of the same name (the run's weights nudged) gets its
    # own revision and its own score, not the first model's stored one; the same model keeps its revision
    import copy

    import torch

    other = copy.deepcopy(model.encoder)
    with torch.no_grad():
        next(other.model.parameters()).mul_(1.5)
    again, nudged = EngineMTEBModel(model.encoder, name=meta.name), EngineMTEBModel(other, name=meta.name)
    assert again.mteb_model_meta.revision == meta.revision and meta.revision.startswith("local-")
    assert nudged.mteb_model_meta.revision != meta.revision
    cached = mteb.evaluate(nudged, task, cache=cache, show_progress_bar=False).task_results[0].get_score()
    fresh = mteb.evaluate(nudged, task, cache=None, show_progress_bar=False).task_results[0].get_score()
    assert cached == fresh and abs(cached - wrapper) > 1e-6

    export(sup, str(tmp_path / "exp"))
    st = load_export(str(tmp_path / "exp"), device="cpu")
    from engine.task_instructions import mteb_prompts

    assert st.prompts["STS"] == "Retrieve semantically similar text:\n"
    assert all(st.prompts[k] == v for k, v in mteb_prompts().items())  # the export carries every task prompt
    st_score = mteb.evaluate(st, task, cache=cache, show_progress_bar=False).task_results[0].get_score()
    assert abs(st_score - wrapper) < 1e-4  # same prompt, same embeddings, same score

    # a second, different export is filed under its own name and revision: its own score, not the first one's
    other = _chain(str(tmp_path / "src2"), tok, "eos_token")
    export(other, str(tmp_path / "exp2"))
    st2 = load_export(str(tmp_path / "exp2"), device="cpu")
    ident = (st.model_card_data.model_name, st.model_card_data.base_model_revision)
    assert ident != (st2.model_card_data.model_name, st2.model_card_data.base_model_revision)
    st2_score = mteb.evaluate(st2, task, cache=cache, show_progress_bar=False).task_results[0].get_score()
    fresh = mteb.evaluate(load_export(str(tmp_path / "exp2"), device="cpu"), task, cache=None,
                          show_progress_bar=False).task_results[0].get_score()
    assert abs(st2_score - fresh) < 1e-9 and abs(st2_score - st_score) > 1e-6
    again = mteb.evaluate(load_export(str(tmp_path / "exp"), device="cpu"), task, cache=cache,
                          show_progress_bar=False).task_results[0].get_score()
    assert abs(again - st_score) < 1e-6  # read back from the cache (stored rounded) under its own name
    names = {p.name for p in (tmp_path / "mteb-cache" / "results").iterdir()}
    assert {"llm2vec-engine__exp", "llm2vec-engine__exp2", "llm2vec-engine__sup"} <= names, names

    r = run_cmd(["python", "-m", "engine.evaluate", "--model", str(tmp_path / "exp"), "--task",
                 f"mteb:{LOCAL_STS_NAME}", "--data", os.path.join(STS, "sts-dev.csv"), "--max-pairs", "60",
                 "--dtype", "fp32"], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["results"][0]["task"] == LOCAL_STS_NAME and abs(res["results"][0]["main_score"] - st_score) < 1e-4


def test_an_instruction_for_an_aggregate_task_reaches_the_tasks_mteb_runs(tmp_path, tok):  # noqa: F811
    """mteb runs CQADupstackRetrieval as its 12 subtasks, under their own names: an instruction keyed by the
    aggregate's name (``engine.evaluate --instruction``) was never looked up, and llm2vec's was used instead."""
    from engine import Encoder
    from engine.mteb_model import EngineMTEBModel, instruction_for, prompt_for

    from .test_encoder import _save_base

    base = str(tmp_path / "base")
    _save_base(base, tok)
    enc = Encoder.from_pretrained(base, device="cpu")
    table = {"CQADupstackRetrieval": "Find the duplicate:"}
    model = EngineMTEBModel(enc, instructions=table)
    subtasks = [t.metadata for t in mteb.get_task("CQADupstackRetrieval").metadata.tasks]
    assert len(subtasks) == 12
    for m in subtasks:
        assert prompt_for(model.prompts, m, "query") == instruction_for(m, "query", table) == "Find the duplicate:\n"
        assert prompt_for(model.prompts, m, "document") == ""  # retrieval documents stay plain
    # an entry a subtask has of its own wins over the aggregate's
    own = EngineMTEBModel(enc, instructions={**table, "CQADupstackGisRetrieval": "GIS:"})
    gis = next(m for m in subtasks if m.name == "CQADupstackGisRetrieval")
    assert prompt_for(own.prompts, gis, "query") == "GIS:\n"
    assert prompt_for(own.prompts, subtasks[0], "query") == "Find the duplicate:\n"


def test_an_export_run_in_another_dtype_is_filed_under_its_own_revision(tmp_path, tok):  # noqa: F811
    """EngineMTEBModel(export) took the export's recorded (name, revision) while loading it with dtype="auto"
    (bf16 on CUDA), though the export runs in its recorded dtype (fp32 here): two sets of numbers under one mteb
    cache key. An explicit dtype lost the recorded name altogether."""
    from engine.export import export
    from engine.mteb_model import EngineMTEBModel, export_dtype, export_identity

    from .test_encoder import _save_base

    base, exp = str(tmp_path / "base"), str(tmp_path / "exp")
    _save_base(base, tok)
    export(base, exp)
    name, rev = export_identity(exp)
    assert export_dtype(exp) == "float32"
    for kwargs, want in (({}, rev), ({"dtype": "fp32"}, rev), ({"dtype": "bf16"}, rev + "-bf16"),
                         ({"torch_dtype": "fp16"}, rev + "-fp16")):  # on CPU, "auto" is fp32
        meta = EngineMTEBModel(exp, device="cpu", **kwargs).mteb_model_meta
        assert (meta.name, meta.revision) == (name, want), kwargs
    other = EngineMTEBModel(exp, device="cpu", pooling="eos").mteb_model_meta  # not as exported: its fingerprint
    assert other.revision.startswith("local-")


# mteb tasks of each kind: one llm2vec's table names, tasks outside it with a plain-string mteb prompt (a retrieval
# and a reranking task, whose documents must stay plain), a clustering task outside it, and an STS task
SIDES = [("MSMARCO", "query"), ("MSMARCO", "document"), ("CorebT2CRetrieval", "query"),
         ("CorebT2CRetrieval", "document"), ("CorebT2CReranking", "query"), ("CorebT2CReranking", "document"),
         ("BuiltBenchClusteringS2S", None), ("STS12", None)]


def _mteb_encode(model, texts, task, side, **kw):
    from datasets import Dataset
    from torch.utils.data import DataLoader

    loader = DataLoader(Dataset.from_dict({"text": texts}), batch_size=8)
    return model.encode(loader, task_metadata=mteb.get_task(task).metadata, hf_split="test", hf_subset="default",
                        prompt_type=side and mteb.types.PromptType(side), **kw)


def test_the_wrapper_over_an_export_embeds_every_task_side_as_sentence_transformers(tmp_path, tok):  # noqa: F811
    """EngineMTEBModel(export) and load_export(export) report one (name, revision) to mteb, so its cache hands one
    path's score to the other; yet for tasks outside llm2vec's table the wrapper applied mteb's own task prompt
    (retrieval and reranking documents included) where sentence-transformers applies none: clustering and
    reranking-document embeddings differed by 1.2-1.4. The wrapper now applies the export's recorded prompts as
    sentence-transformers does, for every side of every task, with and without a model instruction."""
    import numpy as np
    from mteb.models.sentence_transformer_wrapper import SentenceTransformerEncoderWrapper

    from engine.export import export
    from engine.mteb_model import EngineMTEBModel, instruction_for, load_export, mteb_own_instruction

    from .test_encoder import _save_base

    texts = ["A man is playing a guitar.", "Dogs bark loudly at night.", "The stock market fell on Monday."]
    base, instructed = str(tmp_path / "base"), str(tmp_path / "instructed")
    _save_base(base, tok)
    _save_base(instructed, tok)
    with open(os.path.join(instructed, "engine_text.json"), "w") as f:
        json.dump({"chat": None, "instruction": "Represent this sentence:"}, f)
    for model in (base, instructed):
        exp = model + "-exp"
        export(model, exp)
        wrapper = EngineMTEBModel(exp, device="cpu")
        st = SentenceTransformerEncoderWrapper(load_export(exp, device="cpu"))
        ident = (wrapper.mteb_model_meta.name, wrapper.mteb_model_meta.revision)
        assert ident == (st.mteb_model_meta.name, st.mteb_model_meta.revision)  # one cache entry: one embedding
        for task, side in SIDES:
            a = _mteb_encode(wrapper, texts, task, side)
            b = _mteb_encode(st, texts, task, side, show_progress_bar=False)
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=f"{model} {task} {side}")
    # over a run or an adapter, mteb's own instruction reaches a retrieval / reranking task's queries, not its documents
    for task in ("CorebT2CRetrieval", "CorebT2CReranking"):
        md = mteb.get_task(task).metadata
        assert isinstance(md.prompt, str) and instruction_for(md, "query") == md.prompt.rstrip() + "\n"
        assert mteb_own_instruction(md, "document") == instruction_for(md, "document") == ""


def test_the_wrapper_encodes_each_side_of_a_task_with_that_sides_prompt(tmp_path, tok):  # noqa: F811
    """EngineMTEBModel.encode could drop mteb's prompt_type (every test passed with prompt_for(..., None)): a
    retrieval task's queries get the task's instruction and its documents none, on a run and on an export."""
    import numpy as np

    from engine import Encoder
    from engine.export import export
    from engine.mteb_model import EngineMTEBModel
    from engine.task_instructions import LLM2VEC_TASKS

    from .test_encoder import _save_base

    texts = ["how much protein should a female eat", "summit define"]
    base = str(tmp_path / "base")
    _save_base(base, tok)
    export(base, str(tmp_path / "exp"))
    enc = Encoder.from_pretrained(base, device="cpu")
    want = {"query": enc.encode(texts, instruction=LLM2VEC_TASKS["MSMARCO"][1]), "document": enc.encode(texts)}
    assert np.abs(want["query"] - want["document"]).max() > 1e-3
    exported = EngineMTEBModel(str(tmp_path / "exp"), device="cpu")
    for what, model in (("run", EngineMTEBModel(enc)), ("export", exported)):
        for side in ("query", "document"):
            got = _mteb_encode(model, texts, "MSMARCO", side)
            np.testing.assert_allclose(got, want[side], atol=1e-5, rtol=0, err_msg=f"{what} {side}")

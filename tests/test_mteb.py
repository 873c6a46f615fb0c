"""MTEB 2.x: the engine wrapper and an exported SentenceTransformer both run, offline, on a local STS-B task."""
import json
import os

import pytest

from .helpers import STS, run_cmd
from .test_export import _chain, tok  # noqa: F401  (module fixture)

mteb = pytest.importorskip("mteb")
pytest.importorskip("sentence_transformers")


def test_mteb_evaluate_engine_wrapper_and_exported_sentence_transformer(tmp_path, tok):  # noqa: F811
    from sentence_transformers import SentenceTransformer

    from engine.export import export
    from engine.mteb_model import LOCAL_STS_NAME, EngineMTEBModel, TASK_INSTRUCTIONS, local_sts_task

    sup = _chain(str(tmp_path / "src"), tok, "mean")
    task = local_sts_task(os.path.join(STS, "sts-dev.csv"), max_pairs=60)
    model = EngineMTEBModel(sup, device="cpu")
    meta = model.mteb_model_meta
    assert meta.name == "llm2vec-engine/sup" and meta.embed_dim == 48 and meta.similarity_fn_name == "cosine"
    assert meta.max_tokens == 64 and meta.n_parameters > 0 and meta.use_instructions
    with_instr = mteb.evaluate(model, task, cache=None, show_progress_bar=False).task_results[0].get_score()
    plain = EngineMTEBModel(model.encoder, instructions={LOCAL_STS_NAME: ""}, name="x/plain")
    no_instr = mteb.evaluate(plain, task, cache=None, show_progress_bar=False).task_results[0].get_score()
    assert TASK_INSTRUCTIONS[LOCAL_STS_NAME] and abs(with_instr - no_instr) > 1e-6  # the instruction is used
    export(sup, str(tmp_path / "exp"))
    st = SentenceTransformer(str(tmp_path / "exp"), device="cpu")
    st_score = mteb.evaluate(st, task, cache=None, show_progress_bar=False).task_results[0].get_score()
    assert -1 <= st_score <= 1 and abs(st_score - no_instr) < 1e-4  # same embeddings, same score

    r = run_cmd(["python", "-m", "engine.evaluate", "--model", str(tmp_path / "exp"), "--task",
                 f"mteb:{LOCAL_STS_NAME}", "--data", os.path.join(STS, "sts-dev.csv"), "--max-pairs", "60",
                 "--instruction", "", "--dtype", "fp32"], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["results"][0]["task"] == LOCAL_STS_NAME and abs(res["results"][0]["main_score"] - st_score) < 1e-4

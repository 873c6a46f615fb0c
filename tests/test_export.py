"""engine.export: a movable folder that sentence-transformers and transformers load, equal to Encoder's embeddings."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from engine import Encoder
from engine.config import ModelConfig
from engine.modeling import load_tokenizer

from .helpers import run_cmd
from .test_encoder import _save_adapter, _save_base

pytest.importorskip("sentence_transformers")

# No one-token text and no "": sentence-transformers pools nothing there (zeros); the engine pools the text whole,
# or the EOS token for "" (tests/test_encoder.py checks those).
TEXTS = ["A man is playing a guitar.", "Dogs bark.", "Three children are playing football in a large green park.",
         "The stock market fell sharply on Monday after the announcement.", "Hello world"]
INSTR = "Retrieve a sentence with the same meaning: "


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig(name_or_path="smollm2-135m"))  # a real tokenizer with a chat template


def _chain(root, tok, pooling):
    base, mntp, sup = (os.path.join(root, n) for n in ("base", "mntp", "sup"))
    model = _save_base(base, tok)
    p1 = _save_adapter(model, mntp, base, seed=1)
    _save_adapter(p1.merge_and_unload(), sup, mntp, seed=2)
    with open(os.path.join(sup, "llm2vec_config.json"), "w") as f:
        json.dump({"pooling_mode": pooling, "max_length": 64}, f)
    return sup


def _check_bidirectional_automodel(folder, tok, enc):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder).eval()
    assert type(model).__name__ == "LlamaModel" and not any("lm_head" in n for n, _ in model.named_parameters())
    batch = tok(TEXTS[:4], return_tensors="pt", padding=True)
    with torch.no_grad():
        h = model(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (h * m).sum(1) / m.sum(1)
        np.testing.assert_allclose(pooled.numpy(), enc.encode(TEXTS[:4]), atol=1e-4, rtol=0)  # mean pooling by hand
        ids = tok(TEXTS[2], return_tensors="pt")["input_ids"]
        ids2 = ids.clone()
        ids2[0, -1] = 100
        first, first2 = (model(input_ids=x).last_hidden_state[0, 0] for x in (ids, ids2))
    assert (first - first2).abs().max() > 1e-3  # the first token sees the last one: not causal


@pytest.mark.parametrize("pooling", ["mean", "eos_token"])
def test_export_moves_and_matches_encoder_in_sentence_transformers_and_automodel(tmp_path, tok, pooling):
    from sentence_transformers import SentenceTransformer

    from engine.export import export

    sup = _chain(str(tmp_path / "src"), tok, pooling)
    enc = Encoder.from_pretrained(sup, device="cpu")
    if pooling == "mean":  # the CLI once; the eos case in process
        r = run_cmd(["python", "-m", "engine.export", "--model", sup, "--out", str(tmp_path / "exp")], timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "text-embeddings-inference" in r.stderr  # llama: the causal-only server is named
    else:
        with pytest.warns(UserWarning, match="hard-codes causal"):
            export(sup, str(tmp_path / "exp"))
    moved = str(tmp_path / "elsewhere" / "model")
    shutil.move(str(tmp_path / "exp"), moved)
    shutil.rmtree(str(tmp_path / "src"))  # the sources are gone: the folder must stand alone
    for root, _, files in os.walk(moved):
        for f in files:
            if f.endswith((".json", ".md")):
                assert str(tmp_path) not in open(os.path.join(root, f)).read(), f
    with open(os.path.join(moved, "config.json")) as f:
        assert json.load(f)["is_causal"] is False
    st = SentenceTransformer(moved, device="cpu")
    np.testing.assert_allclose(st.encode(TEXTS), enc.encode(TEXTS), atol=1e-4, rtol=0)
    np.testing.assert_allclose(st.encode(TEXTS, prompt=INSTR), enc.encode(TEXTS, prompt=INSTR), atol=1e-4, rtol=0)
    assert np.abs(st.encode(TEXTS, prompt=INSTR) - st.encode(TEXTS)).max() > 1e-3
    # and the engine loads its own export back
    back = Encoder.from_pretrained(moved, device="cpu")
    assert back.pooling == enc.pooling
    np.testing.assert_allclose(back.encode(TEXTS, prompt=INSTR), enc.encode(TEXTS, prompt=INSTR), atol=1e-4, rtol=0)
    if pooling == "mean":
        _check_bidirectional_automodel(moved, tok, enc)


def test_export_bad_input_exits_2(tmp_path):
    r = run_cmd(["python", "-m", "engine.export", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
                timeout=120)
    assert r.returncode == 2 and "error:" in r.stderr

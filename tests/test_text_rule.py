"""One text rule (engine.encoding.tokenize_for_encoding) for training, Encoder.encode and an exported
sentence-transformers folder: every text token pooled, no input embedded as zeros, "" never raises; on a byte-level
BPE tokenizer (SmolLM2's) and a SentencePiece-style one (Llama / Mistral layout, trained here offline)."""
import json
import os

import numpy as np
import pytest

from engine import Encoder
from engine.config import ModelConfig
from engine.encoding import instruction_prefix, tokenize_for_encoding, tokenize_with_instruction
from engine.modeling import load_tokenizer

from .sp_tokenizer import build_sp_tokenizer
from .test_encoder import _save_base

PROMPT = "Retrieve passages that answer the question: "
TEXTS = ["guitar", "", "A man is playing a guitar.", "Hi", " leading space", "\nnewline first", "\n\nnewlines first",
         "   ", "word " * 100]


@pytest.fixture(scope="module", params=["smollm2", "sentencepiece"])
def tok(request, tmp_path_factory):
    if request.param == "smollm2":
        return load_tokenizer(ModelConfig(name_or_path="smollm2-135m"))
    return build_sp_tokenizer(str(tmp_path_factory.mktemp("sp")))


def _pooled(tok, ids, pm):
    return [t for t, m in zip(ids, pm) if m]


def test_the_text_is_pooled_whole_after_any_instruction(tok):
    for text in ("guitar", "A man is playing a guitar.", "Hi"):
        alone = tok(text, add_special_tokens=False)["input_ids"]
        for instr in (PROMPT, PROMPT.strip(), "Retrieve:\n"):
            ids, pms, _ = tokenize_for_encoding(tok, [text], [instr], max_len=64)
            pooled = _pooled(tok, ids[0], pms[0])
            assert pooled[-1] == tok.eos_token_id  # EOS appended and pooled
            # the text's own tokens, all of them: decoded they are the text (no word swallowed by the instruction)
            assert tok.decode(pooled[:-1]).strip() == text, (instr, tok.convert_ids_to_tokens(pooled))
            assert len(pooled) - 1 >= len(alone) - 1
        # training's tokenisation is encode's, token for token
        assert tokenize_with_instruction(tok, [text], [PROMPT], 64)[:2] == tokenize_for_encoding(tok, [text], [PROMPT], 64)[:2]


def test_the_prompt_length_sentence_transformers_counts_ends_where_the_text_starts(tok):
    """sentence-transformers counts a prompt's tokens on the prompt alone: with the newline the count is exact."""
    prefix = instruction_prefix(PROMPT)
    assert prefix == PROMPT.rstrip() + "\n"
    n = len(tok(prefix)["input_ids"])
    for text in TEXTS[:8]:
        ids, pms, _ = tokenize_for_encoding(tok, [text], [PROMPT], max_len=64)
        assert pms[0] == [0] * n + [1] * (len(ids[0]) - n), repr(text)


def test_blank_texts_and_too_long_instructions(tok):
    ids, pms, stats = tokenize_for_encoding(tok, ["", ""], ["", PROMPT], max_len=64)
    assert stats["empty"] == 2
    for i, p in zip(ids, pms):
        assert i[-1] == tok.eos_token_id and p[-1] == 1 and sum(p) >= 1  # "" is its EOS (after BOS, if any)
    with pytest.raises(ValueError, match="leaves no room for the text"):
        tokenize_for_encoding(tok, ["guitar"], ["a long instruction " * 10], max_len=8)
    n = len(tokenize_for_encoding(tok, [""], [PROMPT], max_len=64)[0][0]) - 1  # the prompt's tokens (+ BOS, if any)
    ids, pms, _ = tokenize_for_encoding(tok, [""], [PROMPT], max_len=n + 1)  # a blank text fits as its EOS
    assert sum(pms[0]) == 1
    with pytest.raises(ValueError, match="leaves no room for the text"):  # a text none of whose tokens fit
        tokenize_for_encoding(tok, ["guitar"], [PROMPT], max_len=n + 1)
    assert sum(tokenize_for_encoding(tok, ["guitar"], [PROMPT], max_len=n + 2)[1][0]) == 2  # one token + EOS
    ids, pms, stats = tokenize_for_encoding(tok, ["word " * 100], [""], max_len=16)
    assert len(ids[0]) == 16 and ids[0][-1] == tok.eos_token_id and stats["truncated"] == 1


@pytest.mark.parametrize("pooling", ["mean", "eos_token", "bos_token"])
def test_encoder_and_exported_sentence_transformer_agree_on_every_input(tmp_path, tok, pooling):
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer

    from engine.export import export

    base = str(tmp_path / "base")
    _save_base(base, tok)
    with open(os.path.join(base, "llm2vec_config.json"), "w") as f:
        json.dump({"pooling_mode": pooling, "max_length": 32}, f)
    enc = Encoder.from_pretrained(base, device="cpu")
    export(base, str(tmp_path / "exp"))
    st = SentenceTransformer(str(tmp_path / "exp"), device="cpu")
    for prompt in (None, PROMPT):
        a = enc.encode(TEXTS, prompt=prompt)
        b = st.encode(TEXTS, prompt=instruction_prefix(prompt) if prompt else None)  # "" does not raise
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
        assert np.abs(b).sum(1).min() > 1e-3  # no zero vector anywhere ("" and one-word texts included)
    # the export's named prompts are the same strings (mteb picks them by task)
    np.testing.assert_allclose(st.encode(TEXTS[:3], prompt_name="MSMARCO-query"),
                               enc.encode(TEXTS[:3], prompt=st.prompts["MSMARCO-query"]), atol=1e-4, rtol=0)
    if pooling != "bos_token":  # bos pools the first token of the sequence: the instruction's, by definition
        words = enc.encode(["guitar", "piano", "dog"], prompt=PROMPT)
        assert min(np.abs(words[i] - words[j]).max() for i, j in ((0, 1), (0, 2), (1, 2))) > 1e-3  # the word counts


def test_doc_max_length_cuts_to_whole_words_counting_in_chunks(tok):
    """llm2vec's doc_max_length rule: texts over the limit are cut to whole words within it, the rest untouched;
    the counts are tokenised a chunk of texts at a time (100k documents at once held every id in memory)."""
    from engine import encoding

    texts = ["word " * 30, "short one", "a b c d e f g h i j k l m n o p", "", "x"] * 500
    calls = []

    class Counting:
        def __call__(self, batch, **kw):
            calls.append(len(batch) if isinstance(batch, list) else 1)
            return tok(batch, **kw)

    out, cut = encoding.truncate_words(Counting(), texts, 10)
    assert cut == 1000 and max(calls) <= 1024
    assert out[1::5] == ["short one"] * 500 and out[3::5] == [""] * 500
    for orig, t in zip(texts[0::5] + texts[2::5], out[0::5] + out[2::5]):
        words = t.split()
        assert len(tok(t, add_special_tokens=False)["input_ids"]) <= 10 and words == orig.split()[:len(words)]

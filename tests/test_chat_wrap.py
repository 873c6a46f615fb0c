"""One wrap rule: a supervised run wraps query, positive and negatives in the chat wrap it is configured with
(``contrastive.chat``, auto = llm2vec's choice for the base), records it in its adapter, and Encoder follows that
record (a hub-id guess only for checkpoints without one); the export refuses a wrap it cannot express."""
import json
import os

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from engine import Encoder
from engine.config import ContrastiveConfig, ModelConfig, TrainConfig
from engine.encoding import tokenize_for_encoding
from engine.modeling import load_tokenizer
from engine.stages import build_stage

from .helpers import tiny_llama_config, update_json
from .sp_tokenizer import build_sp_tokenizer
from .test_encoder import _save_adapter

try:  # issue 21 moves it
    from engine.checkpoint import write_adapter
except ImportError:
    from engine.trainer import write_adapter

ITEM = {"query": "how much protein should a female eat", "positive": "Women need about 46 grams a day.",
        "negatives": ["A summit is the top of a mountain."], "instruction": "Given a web search query, retrieve "
        "relevant passages that answer the query:", "source": "s"}
STYLES = {"mistral": ("mistralai/Mistral-7B-Instruct-v0.2", "inst", "[INST]"),
          "llama3": ("meta-llama/Meta-Llama-3-8B-Instruct", "llama3", "<|start_header_id|>user<|end_header_id|>")}


def _base(folder, tok, hub_id):
    """A tiny model saved as a local copy of ``hub_id`` (config.json names it, as llm2vec reads it)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok), hidden_size=32))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    update_json(os.path.join(folder, "config.json"), _name_or_path=hub_id)
    return model


def _engine_run(folder, base_folder, base_model, tok, chat):
    """What a supervised run writes: its adapter with engine_encoder.json (trainer.write_adapter)."""
    cfg = TrainConfig(stage="supervised", model=ModelConfig(name_or_path=base_folder),
                      contrastive=ContrastiveConfig(chat=chat, max_len=64))
    peft = get_peft_model(base_model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    from peft import get_peft_model_state_dict

    write_adapter(peft, get_peft_model_state_dict(peft), folder, cfg, tok)
    peft.unload()
    return cfg


def _rows(batch):
    out = []
    for ids, am, pm in zip(batch["input_ids"], batch["attention_mask"], batch["pool_mask"]):
        n = int(am.sum())
        out.append((ids[:n].tolist(), pm[:n].tolist()))
    return out


@pytest.mark.parametrize("style", sorted(STYLES))
def test_training_encode_and_export_follow_the_recorded_wrap(tmp_path, style):
    from engine.export import ExportError, export

    hub_id, wrap, head = STYLES[style]
    tok = build_sp_tokenizer(str(tmp_path / "tok")) if style == "mistral" else \
        load_tokenizer(ModelConfig(name_or_path="smollm2-135m"))
    base = str(tmp_path / "base")
    model = _base(base, tok, hub_id)

    # training: auto = llm2vec's supervised wrap for this base; query, positive and negative all wrapped
    cfg = _engine_run(str(tmp_path / "run"), base, model, tok, "auto")
    stage = build_stage(cfg, tok)
    assert stage.chat == wrap
    rows = _rows(stage.collate([ITEM], torch.Generator()))
    assert all(tok.decode(ids).count(head.split("]")[0]) >= 1 for ids, _ in rows)
    with open(str(tmp_path / "run" / "engine_encoder.json")) as f:
        assert json.load(f)["chat"] == wrap  # the run records the wrap it trained with

    # encode: the same wrap from the record, the same tokens pooled as in training
    enc = Encoder.from_pretrained(str(tmp_path / "run"), device="cpu")
    assert enc.chat == wrap
    ids, pms, _ = tokenize_for_encoding(enc.tokenizer, [ITEM["query"], ITEM["positive"], ITEM["negatives"][0]],
                                        [ITEM["instruction"], "", ""], enc.max_length, enc.pooling, chat=enc.chat)
    assert rows == list(zip(ids, pms))
    emb = enc.encode([[ITEM["instruction"], ITEM["query"]]], convert_to_tensor=True)
    assert torch.isfinite(emb).all()

    # the export cannot express the wrap: it refuses, naming it, unless told to drop it (loudly)
    with pytest.raises(ExportError, match=f"{wrap!r} chat wrap"):
        export(str(tmp_path / "run"), str(tmp_path / "exp"))
    with pytest.warns(UserWarning, match="without the"):
        meta = export(str(tmp_path / "run"), str(tmp_path / "exp"), drop_chat_wrap=True)
    assert meta["chat_wrap_dropped"] == wrap and meta["chat"] is None

    # a run configured without the wrap records none: the base's hub id does not bring it back at inference
    _engine_run(str(tmp_path / "plain"), base, model, tok, "none")
    assert Encoder.from_pretrained(str(tmp_path / "plain"), device="cpu").chat is None
    # a SimCSE run follows llm2vec's SimCSE (never wrapped) under auto
    simcse = TrainConfig(stage="simcse", model=ModelConfig(name_or_path=base))
    assert build_stage(simcse, tok).chat is None

    # a checkpoint without a record (published llm2vec layout) gets llm2vec's guess from the hub id
    _save_adapter(model, str(tmp_path / "published"), base, seed=3)
    assert Encoder.from_pretrained(str(tmp_path / "published"), device="cpu").chat == wrap
    assert Encoder.from_pretrained(str(tmp_path / "published"), device="cpu", chat="none").chat is None
    # an engine run loaded llm2vec's way, on top of it (peft_model_name_or_path): the run's record wins there too;
    # it reached neither Encoder nor LLM2Vec, and the hub-id guess wrapped a run that trained without the wrap
    from engine import LLM2Vec

    published, plain, run = (str(tmp_path / x) for x in ("published", "plain", "run"))
    assert Encoder.from_pretrained(published, peft_model_name_or_path=plain, device="cpu").chat is None
    assert LLM2Vec.from_pretrained(published, peft_model_name_or_path=plain, device_map="cpu").encoder.chat is None
    assert Encoder.from_pretrained(published, peft_model_name_or_path=run, device="cpu").chat == wrap
    # and a plain adapter (no record) on top of an engine run keeps the run's record: no wrap guessed from the hub id
    assert Encoder.from_pretrained(plain, peft_model_name_or_path=published, device="cpu").chat is None


@pytest.mark.parametrize("tokenizer", ["smollm2", "sentencepiece"])
def test_a_wrapped_text_pools_all_its_words_and_none_of_the_head(tmp_path, tokenizer):
    """Under every chat wrap, with an instruction or none, the pooled tokens are the text's (its first word too),
    the tail and the EOS; the head and instruction are not pooled. The "[INST] " head ends in a space, which the
    text's first word takes in (``▁hello``): counted on the head alone, that word was not pooled, and a one-word text
    pooled only the tail and its EOS."""
    from engine.encoding import CHAT_WRAPS

    tok = build_sp_tokenizer(str(tmp_path / "sp")) if tokenizer == "sentencepiece" else load_tokenizer(
        ModelConfig(name_or_path="smollm2-135m"))
    for chat, (head, tail) in CHAT_WRAPS.items():
        for instruction in ("", "Retrieve passages"):
            ids, pms, _ = tokenize_for_encoding(tok, ["hello world", "hello"], [instruction] * 2, chat=chat)
            for text, seq, pm in zip(["hello world", "hello"], ids, pms):
                pooled = tok.decode([t for t, m in zip(seq, pm) if m], clean_up_tokenization_spaces=False)
                unpooled = tok.decode([t for t, m in zip(seq, pm) if not m], clean_up_tokenization_spaces=False)
                assert pooled.strip().startswith(text + tail.strip()[:1]) or pooled.strip().startswith(text + " "), \
                    (chat, instruction, pooled)
                assert "hello" not in unpooled and (not instruction or instruction in unpooled), (chat, unpooled)


def _tokenizers(tmp_path):
    """smollm2 (no BOS), a Llama-style SentencePiece one (BOS), that one appending EOS as an exported one does, and
    smollm2 set to truncate from the left."""
    from tokenizers import processors

    sp = build_sp_tokenizer(str(tmp_path / "sp"))
    eos_sp = build_sp_tokenizer(str(tmp_path / "sp_eos"))
    eos_sp._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", eos_sp.bos_token_id), ("</s>", eos_sp.eos_token_id)])
    left = load_tokenizer(ModelConfig(name_or_path="smollm2-135m"))
    left.truncation_side = "left"  # a tokenizer whose config cuts from the left: the head is still what is kept
    return {"smollm2": load_tokenizer(ModelConfig(name_or_path="smollm2-135m")), "sentencepiece": sp,
            "sentencepiece+eos": eos_sp, "smollm2-truncating-left": left}


def test_tokenising_only_the_head_keeps_the_ids_of_a_full_tokenisation(tmp_path, monkeypatch):
    """encode and training tokenise each text only up to a little past what they keep (a 1.3M-character document
    cost ~146 bytes a token of Python ints in full); the ids, pool masks, truncated counts and errors are those of the
    full tokenisation, for texts around the limit, with and without instruction and chat wrap, BOS or appended EOS."""
    from engine import encoding
    from engine.encoding import CHAT_WRAPS, NoRoomError

    words = "hello world the stock market fell sharply on monday after the announcement".split()
    texts = [" ".join(words[j % len(words)] for j in range(k)) for k in range(0, 24)] + ["", "  ", "x" * 200]

    def full(tokenizer, texts, keep):  # the old rule: every token of every text
        return tokenizer(texts, add_special_tokens=True)["input_ids"]

    def run(tok, instr, max_len, chat):
        try:
            return tokenize_for_encoding(tok, texts, [instr] * len(texts), max_len, chat=chat)
        except NoRoomError as e:
            return str(e)

    for name, tok in _tokenizers(tmp_path).items():
        for chat in [None, *CHAT_WRAPS]:
            for instr in ("", "Retrieve passages that answer the question"):
                for max_len in (6, 9, 16, 33):
                    new = run(tok, instr, max_len, chat)
                    with monkeypatch.context() as m:
                        m.setattr(encoding, "_tokenize_head", full)
                        old = run(tok, instr, max_len, chat)
                    assert new == old, (name, chat, instr, max_len)
        assert tok.truncation_side == ("left" if name.endswith("left") else "right")  # restored

    tok = load_tokenizer(ModelConfig(name_or_path="smollm2-135m"))
    longest, call = [], type(tok).__call__

    def spy(self, *args, **kwargs):
        out = call(self, *args, **kwargs)
        ids = out["input_ids"]
        longest.append(max((len(x) for x in ids), default=0) if ids and isinstance(ids[0], list) else len(ids))
        return out

    monkeypatch.setattr(type(tok), "__call__", spy)
    ids, _, stats = tokenize_for_encoding(tok, ["word " * 200_000], [""], max_len=16)
    assert len(ids[0]) == 16 and stats["truncated"] == 1
    assert max(longest) <= 64, max(longest)

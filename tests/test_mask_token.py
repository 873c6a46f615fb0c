"""MNTP's mask token is looked up by name, as llm2vec does (``convert_tokens_to_ids``), not tokenised."""
import pytest

from engine.stages.mntp import resolve_mask_token


def _sentencepiece_style_tokenizer():
    """A Llama-2-like tokenizer built offline: Metaspace pre-tokenisation, so the text "_" becomes the word-initial
    piece "\u2581_" while the vocabulary also holds the bare piece "_" (as Llama-2's and Mistral's do)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "_": 3, "\u2581_": 4, "\u2581hello": 5, "\u2581": 6}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_blank_mask_token_is_the_vocabulary_piece_not_its_tokenisation():
    tok = _sentencepiece_style_tokenizer()
    assert tok("_", add_special_tokens=False)["input_ids"] == [4]  # what tokenising gives: "\u2581_"
    assert tok.convert_tokens_to_ids("_") == 3  # what llm2vec uses
    assert resolve_mask_token(tok, "_") == (3, False)


def test_a_token_not_in_the_vocabulary_falls_back_to_its_one_token_encoding():
    tok = _sentencepiece_style_tokenizer()
    assert resolve_mask_token(tok, "hello") == (5, False)  # "hello" is no piece; it encodes to "\u2581hello"
    from engine.data import DataError

    with pytest.raises(DataError, match="must be one token"):
        resolve_mask_token(tok, "hello hello")


def test_eos_and_unk_specs():
    tok = _sentencepiece_style_tokenizer()
    assert resolve_mask_token(tok, "eos") == (2, False)
    assert resolve_mask_token(tok, "<unk>") == (0, False)

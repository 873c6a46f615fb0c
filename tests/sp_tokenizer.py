"""A small Llama/Mistral-style SentencePiece tokenizer, trained offline with ``tokenizers`` (no hub, no
``sentencepiece`` package): BPE over "▁"-prefixed words (Metaspace, prepend "first", whole string one piece as
Llama's HF tokenizer), byte fallback for characters it never saw, <s> prepended, </s> as EOS."""
import os

_WORDS = ("a man is playing a guitar dogs bark three children are playing football in the large green park "
          "retrieve passages that answer question the stock market fell sharply on monday after announcement "
          "given web search query relevant hello world semantically similar text summit define protein").split()


def build_sp_tokenizer(folder):
    """Train the tokenizer, save it as a transformers folder and return it loaded with AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"] + bytes_,
                                  initial_alphabet=list("abcdefghijklmnopqrstuvwxyz.,:;?!'") + ["▁"],
                                  show_progress=False)
    corpus = [" ".join(_WORDS[i:] + _WORDS[:i]) for i in range(len(_WORDS))]
    corpus += [w.capitalize() + "." for w in _WORDS]
    tk.train_from_iterator(corpus, trainer)
    # encode as Llama's tokenizer.json does: the whole string one piece, merges never cross a "▁" (none learned)
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    bos = tk.token_to_id("<s>")
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")
    os.makedirs(folder, exist_ok=True)
    fast.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)

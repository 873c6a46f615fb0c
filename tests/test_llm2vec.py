"""engine.LLM2Vec: llm2vec's from_pretrained / encode / save, torch tensors by default, llm2vec's README usage run
verbatim; no keyword silently ignored. Encoder keeps sentence-transformers' numpy default."""
import json
import os

import numpy as np
import pytest
import torch

from engine import Encoder, LLM2Vec

from .test_encoder import _save_adapter, _save_base, tok  # noqa: F401  (module fixture)


@pytest.fixture()
def chain(tmp_path, tok):  # noqa: F811
    base, mntp, sup = (str(tmp_path / n) for n in ("base", "mntp", "sup"))
    model = _save_base(base, tok)
    p1 = _save_adapter(model, mntp, base, seed=1)
    _save_adapter(p1.merge_and_unload(), sup, mntp, seed=2)
    return mntp, sup


def test_llm2vec_readme_usage_verbatim(chain):
    mntp, sup = chain
    l2v = LLM2Vec.from_pretrained(mntp, peft_model_name_or_path=sup, device_map="cpu", torch_dtype=torch.float32)
    # --- llm2vec's README (McGill-NLP/llm2vec, "Inference"), verbatim ---
    instruction = (
        "Given a web search query, retrieve relevant passages that answer the query:"
    )
    queries = [
        [instruction, "how much protein should a female eat"],
        [instruction, "summit define"],
    ]
    q_reps = l2v.encode(queries)

    # Encoding documents. Instruction are not required for documents
    documents = [
        "As a general guideline, the CDC's average requirement of protein for women ages 19 to 70 is 46 grams per day. But, as you can see from this chart, you'll need to increase that if you're expecting or training for a marathon. Check out the chart below to see how much protein you should be eating each day.",  # noqa: E501
        "Definition of summit for English Language Learners. : 1  the highest point of a mountain : the top of a mountain. : 2  the highest level. : 3  a meeting or series of meetings between the leaders of two or more governments.",  # noqa: E501
    ]
    d_reps = l2v.encode(documents)

    # Compute cosine similarity
    q_reps_norm = torch.nn.functional.normalize(q_reps, p=2, dim=1)
    d_reps_norm = torch.nn.functional.normalize(d_reps, p=2, dim=1)
    cos_sim = torch.mm(q_reps_norm, d_reps_norm.transpose(0, 1))
    # --- end of the README's lines ---
    assert isinstance(q_reps, torch.Tensor) and q_reps.dtype == torch.float32 and q_reps.shape == (2, 48)
    assert cos_sim.shape == (2, 2) and torch.isfinite(cos_sim).all()
    enc = Encoder.from_pretrained(mntp, peft_model_name_or_path=sup, device="cpu")
    np_reps = enc.encode(queries)
    assert isinstance(np_reps, np.ndarray)  # Encoder: sentence-transformers' convention
    np.testing.assert_allclose(np_reps, q_reps.numpy(), atol=1e-5, rtol=0)
    assert isinstance(l2v.encode(documents, convert_to_numpy=True), np.ndarray)
    assert l2v.encode("one text").shape == (1, 48)  # llm2vec treats a lone string as a list of one


def test_llm2vec_keywords_settings_and_save(tmp_path, chain):
    """llm2vec's keywords, settings and save. A plain string gets no instruction, as in llm2vec (a string is
    ``["", text]``): the drop-in gave it the model's default instruction, so llm2vec's README pattern
    ``encode(documents)`` encoded a run's documents with its query instruction. The instruction is still saved,
    for ``Encoder``, whose default it stays."""
    mntp, sup = chain
    with pytest.raises(TypeError, match="attn_implementation"):
        LLM2Vec.from_pretrained(mntp, peft_model_name_or_path=sup, attn_implementation="eager")
    with pytest.raises(TypeError, match="unsupported keyword"):
        LLM2Vec.from_pretrained(mntp, foo=1)
    with pytest.raises(TypeError, match="merge_peft"):
        Encoder.from_pretrained(mntp, merge_peft=False)  # the sentence-transformers-style class only merges
    l2v = LLM2Vec.from_pretrained(mntp, peft_model_name_or_path=sup, merge_peft=False, pooling_mode="weighted_mean",
                                  max_length=32, doc_max_length=20, skip_instruction=True, enable_bidirectional=True,
                                  device_map="cpu")
    assert (l2v.pooling_mode, l2v.max_length, l2v.doc_max_length) == ("weighted_mean", 32, 20)
    assert l2v.encoder.pooling == "weighted_mean" and l2v.config.hidden_size == 48
    texts = [["Represent:", "a dog runs"], "word " * 40]
    ref = l2v.encode(texts)

    # merge_peft=False, save without merging: the adapter alone, loadable as llm2vec loads it
    l2v.save(str(tmp_path / "adapter-save"))
    files = set(os.listdir(tmp_path / "adapter-save"))
    assert "adapter_config.json" in files and "model.safetensors" not in files
    with open(tmp_path / "adapter-save" / "llm2vec_config.json") as f:
        assert json.load(f) == {"pooling_mode": "weighted_mean", "max_length": 32, "doc_max_length": 20,
                                "skip_instruction": True}
    back = LLM2Vec.from_pretrained(mntp, peft_model_name_or_path=str(tmp_path / "adapter-save"), device_map="cpu")
    assert back.pooling_mode == "weighted_mean"
    torch.testing.assert_close(back.encode(texts), ref, atol=1e-5, rtol=0)

    # merge_before_save: full weights, loadable alone
    l2v.save(str(tmp_path / "full-save"), merge_before_save=True)
    assert "model.safetensors" in os.listdir(tmp_path / "full-save")
    full = LLM2Vec.from_pretrained(str(tmp_path / "full-save"), device_map="cpu")
    torch.testing.assert_close(full.encode(texts), ref, atol=1e-5, rtol=0)
    l2v.save(str(tmp_path / "no-config"), merge_before_save=True, save_config=False)
    assert "llm2vec_config.json" not in os.listdir(tmp_path / "no-config")
    # a run's recorded instruction survives the save; plain strings get none here (llm2vec), Encoder applies it
    l2v.encoder.default_instruction = "Retrieve a sentence with the same meaning: "
    plain = l2v.encode(["a dog runs"])
    torch.testing.assert_close(plain, l2v.encode([["", "a dog runs"]]), atol=1e-6, rtol=0)
    inst = l2v.encode([[l2v.encoder.default_instruction, "a dog runs"]])  # a pair keeps its instruction
    assert (inst - plain).abs().max() > 1e-4
    l2v.save(str(tmp_path / "instructed"), merge_before_save=True)
    again = LLM2Vec.from_pretrained(str(tmp_path / "instructed"), device_map="cpu")
    assert again.encoder.default_instruction == l2v.encoder.default_instruction
    torch.testing.assert_close(again.encode(["a dog runs"]), plain, atol=1e-5, rtol=0)
    np.testing.assert_allclose(again.encoder.encode(["a dog runs"]), inst.numpy(), atol=1e-5, rtol=0)


def test_an_engine_export_is_not_cut_at_llm2vecs_400_tokens(tmp_path, chain):
    """llm2vec's doc_max_length default (400) is for llm2vec checkpoints: an engine export (or run) records none,
    and Encoder and sentence-transformers cut at max_length, so this class must too (it cut long texts to 400 words'
    worth of tokens, and save() wrote the 400 into the saved folder)."""
    pytest.importorskip("sentence_transformers")
    from engine.export import export

    mntp, sup = chain
    export(sup, str(tmp_path / "exp"))
    l2v = LLM2Vec.from_pretrained(str(tmp_path / "exp"), device_map="cpu")
    assert l2v.doc_max_length is None
    long_text = "word " * 450
    enc = Encoder.from_pretrained(str(tmp_path / "exp"), device="cpu")
    np.testing.assert_allclose(l2v.encode([long_text]).numpy(), enc.encode([long_text]), atol=1e-5, rtol=0)
    assert LLM2Vec.from_pretrained(mntp, device_map="cpu").doc_max_length == 400  # an llm2vec-style checkpoint


def test_save_refuses_the_folders_the_model_came_from(tmp_path, chain):
    """save() writes in place: into the adapter it was loaded from it failed half-way (a file copied onto itself),
    and full weights saved into a run folder turned it into a model folder. Refused before anything is written."""
    mntp, sup = chain
    l2v = LLM2Vec.from_pretrained(mntp, peft_model_name_or_path=sup, merge_peft=False, device_map="cpu")
    before = sorted(os.listdir(sup))
    for target, needle in ((sup, "is the folder"), (os.path.join(sup, "inner"), "is inside"),
                           (str(tmp_path), "contains")):
        with pytest.raises(ValueError, match=needle):
            l2v.save(target)
    assert sorted(os.listdir(sup)) == before and not os.path.exists(os.path.join(sup, "inner"))
    run = tmp_path / "elsewhere" / "run"
    (run / "adapter").mkdir(parents=True)
    for f in os.listdir(sup):
        if f.startswith("adapter_"):
            (run / "adapter" / f).write_bytes(open(os.path.join(sup, f), "rb").read())
    with pytest.raises(ValueError, match="training run folder"):
        l2v.save(str(run), merge_before_save=True)
    assert sorted(os.listdir(run)) == ["adapter"]
    l2v.save(str(tmp_path / "elsewhere" / "mine"))  # a folder of its own
    assert "adapter_config.json" in os.listdir(tmp_path / "elsewhere" / "mine")


def test_save_refuses_a_folder_inside_a_training_run_or_holding_another_adapter(tmp_path, chain):
    """Only a run folder itself was refused: a save into another run's best/ replaced the adapter that run had
    selected (Encoder and the export of that run then loaded this model), and a save into a checkpoint or a
    folder holding another adapter mixed two models' files. Refused before anything is written; saving this
    model's own adapter again into its earlier save still works."""
    import hashlib
    import shutil

    mntp, sup = chain
    run = tmp_path / "other" / "run"
    for d in ("best", "adapter", "checkpoints/step_0000003/adapter"):
        shutil.copytree(mntp, run / d)
    (run / "config.yaml").write_text("stage: simcse\n")
    theirs = tmp_path / "theirs"
    shutil.copytree(mntp, theirs)

    def digest():
        return hashlib.sha256(b"".join(p.read_bytes() for p in sorted((tmp_path / "other").rglob("*"))
                                       if p.is_file())).hexdigest()

    before, theirs_before = digest(), sorted(os.listdir(theirs))
    l2v = LLM2Vec.from_pretrained(mntp, peft_model_name_or_path=sup, merge_peft=False, device_map="cpu")
    for target in ("best", "adapter", "new", "checkpoints/step_0000003/adapter", "checkpoints/step_0000003/x"):
        for merge in (False, True):
            with pytest.raises(ValueError, match="inside the training run folder"):
                l2v.save(str(run / target), merge_before_save=merge)
    with pytest.raises(ValueError, match="holds another model's adapter_config.json"):
        l2v.save(str(theirs))
    assert digest() == before and sorted(os.listdir(theirs)) == theirs_before
    assert not os.path.exists(run / "new") and not os.path.exists(run / "checkpoints" / "step_0000003" / "x")
    mine = str(tmp_path / "mine")
    l2v.save(mine)
    l2v.save(mine)  # the same adapter again (another rank's save, a re-run): allowed
    with pytest.raises(ValueError, match="holds another model's adapter_config.json"):
        l2v.save(mine, merge_before_save=True)  # full weights beside an adapter: a folder of two models


def test_a_save_into_a_new_folder_appears_whole_or_not_at_all(tmp_path, chain, monkeypatch):
    """A save that fails half-way (a full disk) left a new folder with weights and no tokenizer, which loads as a
    broken model; now a new folder is written beside it and renamed at the end. An existing folder is still
    written in place (llm2vec's behaviour)."""
    mntp, sup = chain
    l2v = LLM2Vec.from_pretrained(mntp, peft_model_name_or_path=sup, merge_peft=False, device_map="cpu")

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(l2v.tokenizer), "save_pretrained", full_disk)
    with pytest.raises(OSError, match="No space"):
        l2v.save(str(tmp_path / "out" / "new"), merge_before_save=True)
    assert os.listdir(tmp_path / "out") == []  # neither the folder nor its temporary twin
    monkeypatch.undo()
    l2v.save(str(tmp_path / "out" / "new"), merge_before_save=True)
    assert {"model.safetensors", "tokenizer.json", "llm2vec_config.json"} <= set(os.listdir(tmp_path / "out" / "new"))
    assert os.listdir(tmp_path / "out") == ["new"]
    (tmp_path / "out" / "new" / "mine.txt").write_text("kept")
    l2v.save(str(tmp_path / "out" / "new"), merge_before_save=True)  # in place: what was there stays
    assert (tmp_path / "out" / "new" / "mine.txt").read_text() == "kept"
    # every rank of a script saving into one new folder: the first rename wins, the others' copies are dropped
    import shutil

    import engine.llm2vec as mod

    real_rename = os.rename

    def another_rank_first(src, dst):
        shutil.copytree(src, dst)
        return real_rename(src, dst)

    monkeypatch.setattr(mod.os, "rename", another_rank_first)
    l2v.save(str(tmp_path / "out" / "both"), merge_before_save=True)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "out")) == ["both", "new"]
    assert "model.safetensors" in os.listdir(tmp_path / "out" / "both")


def _whole_words(tokenizer, text, max_tokens):
    """llm2vec's rule, as the engine applied it to every text before (the reference for texts with spaces)."""
    n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    words = text.split()
    while n > max_tokens and words:
        words = words[:min(int(len(words) * max_tokens / n), len(words) - 1)]
        n = len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"])
    return " ".join(words) if n <= max_tokens or not words else text


def test_doc_max_length_keeps_the_first_tokens_of_a_text_without_spaces(tmp_path, tok):  # noqa: F811
    """llm2vec's whole-word cut emptied an over-long text with no space (Chinese, a URL, code): it was embedded by
    its EOS alone and reported as blank. Such a text keeps its first tokens (counted apart); texts with words are
    cut as before."""
    from engine.encoding import truncate_words

    cjk, url = "今天天气很好" * 20, "https://example.com/" + "a/very/long/path/" * 10
    url_words = url + " and then some words"  # whole words would empty it too: its first word alone is too long
    multi = ["one two three four five six seven eight nine ten eleven", "word " * 30, "a b", "短 句子 " * 9]
    stats = {}
    out, cut = truncate_words(tok, [cjk, url, url_words, *multi, ""], 8, stats)
    for text in out[:3]:
        assert text and len(tok(text, add_special_tokens=False)["input_ids"]) <= 8, text
    assert out[0] == cjk[:len(out[0])] and out[1] == url[:len(out[1])] and out[2] == url_words[:len(out[2])]
    assert out[3:7] == [_whole_words(tok, t, 8) for t in multi] and out[7] == ""
    assert cut == 6 and stats == {"doc_cut_to_tokens": 3}

    _save_base(str(tmp_path / "base"), tok)
    enc = Encoder.from_pretrained(str(tmp_path / "base"), device="cpu", doc_max_length=8)
    emb = enc.encode([cjk, url, ""], convert_to_tensor=True)
    assert enc.last_stats["doc_cut_to_tokens"] == 2 and enc.last_stats["empty"] == 1
    assert (emb[0] - emb[2]).abs().max() > 1e-3 and (emb[1] - emb[2]).abs().max() > 1e-3  # not the blank text's


def test_a_first_tokens_head_that_re_tokenises_longer_is_cut_further():
    """The first max_tokens ids of a text can decode to a string that tokenises into more ids (a merge that the
    decoded text no longer makes); such a head is cut further until it re-tokenises within max_tokens. A tokenizer
    whose 'x' decodes to 'xx' makes every head of k ids re-tokenise to 2k."""
    from engine.encoding import truncate_words

    class Doubling:
        truncation_side = "right"

        def __call__(self, texts, add_special_tokens=False, truncation=False, max_length=None):
            one = isinstance(texts, str)
            ids = [[ord(c) for c in t][:max_length if truncation else None] for t in ([texts] if one else texts)]
            return {"input_ids": ids[0] if one else ids}

        def decode(self, ids, **kw):
            return "".join(chr(i) * (2 if chr(i) == "x" else 1) for i in ids)

    stats = {}
    out, cut = truncate_words(Doubling(), ["x" * 20, "ab" * 10], 8, stats)
    assert out == ["x" * 8, "ab" * 4] and cut == 2 and stats == {"doc_cut_to_tokens": 2}


def test_a_model_split_by_a_device_map_is_not_moved_whole(tmp_path, tok, monkeypatch):  # noqa: F811
    """A model that a device map spreads over several devices (here accelerate's CPU + disk offload, the split a
    7B takes on a small GPU) encodes where it lies: LLM2Vec.encode's default device ("cuda" when one is
    available, as in llm2vec) used to move it whole, and any device other than its first is refused in one line.
    Its inputs go to its first weight that is not offloaded: the embedding, offloaded here, is on ``meta``."""
    base = str(tmp_path / "base")
    _save_base(base, tok)
    texts = ["a text", "another, longer one"]
    ref = Encoder.from_pretrained(base, device="cpu").encode(texts, convert_to_tensor=True)
    placed = {"embed_tokens": "disk", "layers.0": "cpu", "layers.1": "disk", "norm": "cpu", "rotary_emb": "cpu"}
    l2v = LLM2Vec.from_pretrained(base, device_map=placed, torch_dtype=torch.float32,
                                  offload_folder=str(tmp_path / "offload"))
    enc = l2v.encoder
    assert enc.model.hf_device_map == placed and enc.device == torch.device("cpu")
    assert enc.model.get_input_embeddings().weight.device.type == "meta"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # llm2vec's default would ask for "cuda"
    torch.testing.assert_close(l2v.encode(texts), ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(enc.encode(texts, device="cpu", convert_to_tensor=True), ref, atol=1e-6, rtol=0)
    for device in ("cuda:1", ["cpu", "cpu"]):
        with pytest.raises(ValueError, match=r"split across \['cpu', 'disk'\] by its device_map"):
            enc.encode(texts, device=device)
    with pytest.raises(ValueError, match="split across"):
        Encoder(enc.model, enc.tokenizer, device="cuda:0")
    assert enc.device == torch.device("cpu") and enc.model.hf_device_map == placed

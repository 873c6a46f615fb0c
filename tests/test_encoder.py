"""Encoder: invariance to batch size and padding side, save -> load -> encode, LLM2Vec layouts, evaluate CLI."""
import json
import os
import sys

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from engine import Encoder
from engine.config import ModelConfig
from engine.modeling import load_tokenizer

from .helpers import ROOT, STS, run_cmd, tiny_llama_config, update_json

TEXTS = ["A man is playing a guitar.", "Dogs.", "Three children are playing football in a large green park today.",
         "The stock market fell sharply on Monday after the announcement.", "Hi"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig(name_or_path="smollm2-135m"))


def _save_base(path, tok, seed=0):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok), hidden_size=48, num_attention_heads=4,
                                               num_key_value_heads=2))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model


def _save_adapter(base_model, path, base_name, seed):
    torch.manual_seed(seed)
    peft = get_peft_model(base_model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for n, p in peft.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.2)
    peft.save_pretrained(path)
    update_json(os.path.join(path, "adapter_config.json"), base_model_name_or_path=base_name)
    return peft


@pytest.mark.parametrize("pooling", ["mean", "weighted_mean", "eos", "bos"])
def test_encode_invariant_to_batch_size_and_padding_side(tmp_path, tok, pooling):
    base = str(tmp_path / "base")
    _save_base(base, tok)
    enc = Encoder.from_pretrained(base, pooling=pooling, device="cpu")
    ref = enc.encode(TEXTS, batch_size=1, convert_to_tensor=True)
    assert ref.dtype == torch.float32 and ref.shape == (5, 48)
    for bs in (2, 5):
        for side in ("left", "right"):
            out = enc.encode(TEXTS, batch_size=bs, padding_side=side, convert_to_tensor=True)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    np_out = enc.encode(TEXTS, convert_to_numpy=True, normalize=True)
    assert np_out.dtype.name == "float32" and abs(float((np_out ** 2).sum(1).mean()) - 1) < 1e-5
    with_instr = enc.encode(TEXTS[:2], instruction="Represent the sentence: ", convert_to_tensor=True)
    assert (with_instr - ref[:2]).abs().max() > 1e-4  # attended instruction changes the embedding
    with pytest.raises(ValueError, match="empty"):
        enc.encode([])


def test_a_pooling_name_is_checked_before_the_model_loads(tmp_path, tok, monkeypatch):
    """An unknown pooling loaded (a 7B: minutes) and failed at the first encode; llm2vec's names (eos_token) were
    refused there too. Both are settled before anything loads now."""
    import engine.encoder as encoder

    base = str(tmp_path / "base")
    _save_base(base, tok)
    assert Encoder.from_pretrained(base, pooling="eos_token", device="cpu").pooling == "eos"

    def no_load(*a, **k):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(encoder, "load_encoder_model", no_load)
    for kw in ({"pooling": "cls"}, {"pooling_mode": "max"}):
        with pytest.raises(ValueError, match="unknown pooling"):
            Encoder.from_pretrained(base, device="cpu", **kw)


def test_llm2vec_style_chain_base_mntp_supervised(tmp_path, tok):
    base, mntp, sup = (str(tmp_path / n) for n in ("base", "mntp", "sup"))
    model = _save_base(base, tok)
    p1 = _save_adapter(model, mntp, base, seed=1)
    merged = p1.merge_and_unload()
    _save_adapter(merged, sup, mntp, seed=2)
    with open(os.path.join(sup, "llm2vec_config.json"), "w") as f:
        json.dump({"pooling_mode": "eos_token", "max_length": 32}, f)
    enc = Encoder.from_pretrained(sup, device="cpu")
    assert enc.pooling == "eos" and enc.max_length == 32
    # Build the expected model by hand: base + mntp merged + sup merged, bidirectional.
    from engine.modeling import load_model

    ref_model, _ = load_model(ModelConfig(name_or_path=base, adapters=[mntp, sup]))
    from engine.encoding import encode_texts

    expected = encode_texts(ref_model, tok, TEXTS, pooling="eos", max_len=32)
    torch.testing.assert_close(enc.encode(TEXTS, convert_to_tensor=True), expected, atol=1e-5, rtol=0)
    plain = Encoder.from_pretrained(base, device="cpu", pooling="eos", max_length=32)
    assert (plain.encode(TEXTS, convert_to_tensor=True) - expected).abs().max() > 1e-4  # the adapters really were applied


def test_a_run_on_a_published_hub_adapter_loads_it_from_the_hub_cache(tmp_path, tok, monkeypatch):
    """A run trained on top of a published llm2vec adapter records it by hub id (engine.checkpoint.write_adapter,
    tests/test_adapters.py); Encoder (and so evaluate and the export) fetches it through huggingface_hub's cache,
    offline here, and the export names it by that id. A hub adapter that cannot be had is one clear error."""
    from huggingface_hub import constants

    from engine.export import _adapter_label
    from engine.modeling import load_model
    from engine.encoding import encode_texts

    cache, hub = tmp_path / "hub", "McGill-NLP/LLM2Vec-Tiny-mntp"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    d = cache / ("models--" + hub.replace("/", "--"))
    (d / "refs").mkdir(parents=True)
    (d / "refs" / "main").write_text("0" * 40)
    snap, base, top = str(d / "snapshots" / ("0" * 40)), str(tmp_path / "base"), str(tmp_path / "run" / "adapter")
    p1 = _save_adapter(_save_base(base, tok), snap, base, seed=1)
    _save_adapter(p1.merge_and_unload(), top, hub, seed=2)
    tok.save_pretrained(top)  # a run's adapter folder carries its tokenizer
    meta = {"format": "llm2vec-engine/1", "stage": "supervised", "base_model": base, "prior_adapters": [hub],
            "pooling": "mean", "instruction": "", "max_length": 32, "bidirectional": True}
    with open(os.path.join(top, "engine_encoder.json"), "w") as f:
        json.dump(meta, f)
    enc = Encoder.from_pretrained(top, device="cpu")
    ref_model, _ = load_model(ModelConfig(name_or_path=base, adapters=[snap, top]))
    torch.testing.assert_close(enc.encode(TEXTS, convert_to_tensor=True),
                               encode_texts(ref_model, tok, TEXTS, pooling="mean", max_len=32), atol=1e-5, rtol=0)
    assert _adapter_label(snap) == hub and _adapter_label(top) == "run/adapter"
    with open(os.path.join(top, "engine_encoder.json"), "w") as f:
        json.dump({**meta, "prior_adapters": ["McGill-NLP/not-cached"]}, f)
    with pytest.raises(FileNotFoundError, match="McGill-NLP/not-cached"):
        Encoder.from_pretrained(top, device="cpu")


def test_training_output_round_trip_and_evaluate_cli(tmp_path, capsys):
    out = str(tmp_path / "run")
    r = run_cmd(["python", "engine/train.py", "--config", "configs/tiny/simcse.yaml", f"output_dir={out}",
                 "max_steps=2", "save_every=0", "batch_size=8", "micro_batch_size=8", "max_samples=40", "eval_every=2"],
                timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    # export of a run: the model card carries the training config and the eval figure the run logged
    r = run_cmd(["python", "-m", "engine.export", "--model", out, "--out", str(tmp_path / "exp")], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    card = (tmp_path / "exp" / "README.md").read_text()
    assert "stage: simcse" in card and "| eval_sts_spearman | 2 |" in card and str(tmp_path) not in card
    enc = Encoder.from_pretrained(out, device="cpu")
    enc2 = Encoder.from_pretrained(os.path.join(out, "adapter"), device="cpu")
    a, b = enc.encode(TEXTS, convert_to_tensor=True), enc2.encode(TEXTS, convert_to_tensor=True)
    torch.testing.assert_close(a, b)
    # engine.evaluate's main in this process (the model loads once more, without a new interpreter); the
    # paired comparison below runs it as a command
    from engine.evaluate import main as evaluate

    scores = str(tmp_path / "scores.tsv")
    capsys.readouterr()
    assert evaluate(["--model", out, "--task", "sts", "--data", f"{STS}/sts-dev.csv", "--scores", scores]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["pairs"] == 1500 and -100 <= res["spearman"] <= 100
    # the scores file is what the figure was computed from, pair by pair in --data's order
    from engine.data import read_sts
    from engine.evaluate import read_scores
    from engine.stats import spearman

    cos = read_scores(scores, read_sts(f"{STS}/sts-dev.csv"))
    assert spearman(cos, [p[2] for p in read_sts(f"{STS}/sts-dev.csv")]) == pytest.approx(res["spearman"], abs=1e-9)
    # bootstrap and the paired comparison, here against the same model's own scores: a difference of exactly 0
    r = run_cmd(["python", "-m", "engine.evaluate", "--model", out, "--task", "sts", "--data", f"{STS}/sts-dev.csv",
                 "--bootstrap", "200", "--compare", scores], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res2 = json.loads(r.stdout.strip().splitlines()[-1])
    assert res2["spearman"] == res["spearman"]
    assert res2["spearman_ci"]["ci"][0] < res["spearman"] < res2["spearman_ci"]["ci"][1]
    assert res2["spearman_ci"]["n_boot"] == 200 and res2["compare"]["n_boot"] == 200
    assert res2["compare"]["difference"] == 0 and res2["compare"]["ci"] == [0.0, 0.0]
    bad = tmp_path / "bad.csv"
    bad.write_text("only\ttwo\n")
    assert evaluate(["--model", out, "--task", "sts", "--data", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "expected >= 7 tab-separated columns" in err[0], err


@pytest.mark.parametrize("native, want", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_dtype_is_fp16_on_gpus_without_native_bf16(monkeypatch, native, want):
    """A V100 or T4 only emulates bf16: ``auto`` gives fp16 there, for training and for encode() alike."""
    from engine.encoder import resolve_dtype
    from engine.modeling import torch_dtype

    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: asked.append(
        including_emulation) or native)
    assert resolve_dtype("auto", "cuda") == want and torch_dtype("auto", "cuda") == want
    assert asked == [False, False]  # native support, not emulation
    assert resolve_dtype("auto", "cpu") == torch.float32 and torch_dtype("auto", "cpu") == torch.float32
    assert torch_dtype("bf16", "cuda") == torch.bfloat16  # an explicit choice is kept
    readme = " ".join(open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().split())
    assert "bf16 on Ampere and later GPUs, fp16 on older ones and fp32 on CPU (`model.dtype: auto`)" in readme
    assert "bf16 on GPU and fp32 on CPU" not in readme  # (the training-loop line said so after 239deaf)


def test_encode_takes_sentence_transformers_and_llm2vec_arguments(tmp_path, tok):
    base = str(tmp_path / "base")
    _save_base(base, tok)
    enc = Encoder.from_pretrained(base, torch_dtype=torch.float32, device_map="cpu", pooling_mode="mean")
    assert type(enc.model).__name__ == "LlamaModel" and enc.max_length == 512  # no LM head; inference default
    from engine.encoder import resolve_dtype

    assert resolve_dtype("auto", "cpu") == torch.float32
    out = enc.encode(TEXTS)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (5, 48)
    instr = "Represent the sentence: "
    by_prompt = enc.encode(TEXTS, prompt=instr, convert_to_tensor=True)
    torch.testing.assert_close(enc.encode(TEXTS, instruction=instr, convert_to_tensor=True), by_prompt)
    torch.testing.assert_close(enc.encode([[instr, t] for t in TEXTS], convert_to_tensor=True), by_prompt)
    enc.default_instruction = instr
    torch.testing.assert_close(enc.encode(TEXTS, prompt_name="query", convert_to_tensor=True), by_prompt)
    enc.default_instruction = ""
    with pytest.raises(TypeError, match="unexpected keyword argument 'prompts'"):
        enc.encode(TEXTS, prompts=instr)
    with pytest.raises(ValueError, match="unknown prompt_name"):
        enc.encode(TEXTS, prompt_name="nope")
    with pytest.raises(TypeError, match="instruction, text"):
        enc.encode([["a", "b", "c"]])
    unit = enc.encode(TEXTS, normalize_embeddings=True)
    assert abs(float((unit ** 2).sum(1).mean()) - 1) < 1e-5
    empty = enc.encode(["", "Dogs."], convert_to_tensor=True)
    assert empty.isfinite().all()
    enc.encode(TEXTS, max_length=4)
    assert enc.last_stats["truncated"] == 3  # only "Dogs." and "Hi" fit in 4 tokens
    # skip_instruction=False pools the instruction tokens too (llm2vec's switch)
    enc.skip_instruction = False
    assert (enc.encode(TEXTS, prompt=instr, convert_to_tensor=True) - by_prompt).abs().max() > 1e-4
    enc.skip_instruction = True
    enc.doc_max_length = 3
    enc.encode(TEXTS)
    assert enc.last_stats["doc_truncated"] == 3


@pytest.mark.slow
def test_multi_device_encode_keeps_input_order(tmp_path, tok):
    base = str(tmp_path / "base")
    _save_base(base, tok)
    enc = Encoder.from_pretrained(base, device="cpu")
    texts = [t * (1 + i % 3) for i, t in enumerate(TEXTS * 4)]
    ref = enc.encode(texts, batch_size=3, convert_to_tensor=True)
    out = enc.encode(texts, batch_size=3, device=["cpu", "cpu"], convert_to_tensor=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


_HUB_SCRIPT = r'''
import json, sys, torch
from engine import Encoder
from engine.config import ModelConfig
from engine.encoding import encode_texts
from engine.modeling import load_model
base, mntp, sup = sys.argv[1:4]
enc = Encoder.from_pretrained("McGill-NLP/LLM2Vec-Tiny-mntp", peft_model_name_or_path="McGill-NLP/LLM2Vec-Tiny-mntp-supervised",
                              torch_dtype=torch.float32, device_map="cpu")
texts = ["A man is playing a guitar.", "Dogs."]
got = enc.encode([["Retrieve a sentence:", t] for t in texts], convert_to_tensor=True)
ref_model, tok = load_model(ModelConfig(name_or_path=base, adapters=[mntp, sup]))
want = encode_texts(ref_model, tok, texts, instruction="Retrieve a sentence:", pooling=enc.pooling, max_len=enc.max_length,
                    chat="inst")
plain = encode_texts(ref_model, tok, texts, instruction="Retrieve a sentence:", pooling=enc.pooling, max_len=enc.max_length)
print(json.dumps({"chat": enc.chat, "n_adapters": len(enc.source["adapters"]), "pooling": enc.pooling,
                  "max_length": enc.max_length, "diff": float((got - want).abs().max()),
                  "wrap_effect": float((got - plain).abs().max())}), flush=True)
Encoder.from_pretrained("McGill-NLP/not-cached")  # not in the hub cache: fails, naming it (the process's end)
'''


@pytest.mark.slow
def test_llm2vec_published_layout_from_hub_cache_offline(tmp_path, tok):
    """McGill-NLP/LLM2Vec-*-mntp(-supervised) layout: hub ids resolved through huggingface_hub's cache, offline."""
    cache = tmp_path / "hub"

    def snap(repo):
        d = cache / ("models--" + repo.replace("/", "--"))
        (d / "refs").mkdir(parents=True)
        (d / "refs" / "main").write_text("0" * 40)
        return str(d / "snapshots" / ("0" * 40))

    base_id = "mistralai/Mistral-7B-Instruct-v0.2"
    base, mntp, sup = snap(base_id), snap("McGill-NLP/LLM2Vec-Tiny-mntp"), snap("McGill-NLP/LLM2Vec-Tiny-mntp-supervised")
    model = _save_base(base, tok)
    p1 = _save_adapter(model, mntp, base_id, seed=1)
    model.config.save_pretrained(mntp)  # the published MNTP repo ships config.json beside its adapter
    tok.save_pretrained(mntp)
    _save_adapter(p1.merge_and_unload(), sup, "McGill-NLP/LLM2Vec-Tiny-mntp", seed=2)
    with open(os.path.join(sup, "llm2vec_config.json"), "w") as f:
        json.dump({"pooling_mode": "mean", "max_length": 64, "doc_max_length": 400, "skip_instruction": True}, f)
    # one process (each pays torch's and transformers' import): the cached chain, then a hub id not in the cache
    r = run_cmd(["python", "-c", _HUB_SCRIPT, base, mntp, sup],
                env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}, timeout=300)
    lines = r.stdout.strip().splitlines()
    assert lines and lines[-1].startswith("{"), r.stderr[-3000:]  # the cached chain encoded, then the id failed
    res = json.loads(lines[-1])
    assert res["chat"] == "inst" and res["n_adapters"] == 2 and res["max_length"] == 64
    assert res["diff"] < 1e-5 and res["wrap_effect"] > 1e-3
    assert r.returncode != 0 and "McGill-NLP/not-cached" in r.stderr


def test_encode_rejects_inputs_that_are_not_text(tmp_path, tok):
    base = str(tmp_path / "base")
    _save_base(base, tok)
    enc = Encoder.from_pretrained(base, device="cpu")
    with pytest.raises(TypeError, match="sentences is dict"):
        enc.encode({"a key": "a value"})  # would otherwise encode the keys
    with pytest.raises(TypeError, match="input 1 is dict"):
        enc.encode(["fine", {"a": 1}])
    with pytest.raises(TypeError, match="input 0 is int"):
        enc.encode([3])
    with pytest.raises(ValueError, match="lone surrogate"):
        enc.encode(["bad \ud800 text"])
    with pytest.raises(ValueError, match="lone surrogate"):
        enc.encode(["fine"], prompt="bad \udfff")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            enc.encode(["fine"], batch_size=bad)
        with pytest.raises(ValueError, match="max_length must be a positive integer"):
            enc.encode(["fine"], max_length=bad)
    with pytest.raises(ValueError, match="max_length must be a positive integer"):
        Encoder.from_pretrained(base, device="cpu", max_length=0)
    assert enc.encode([""]).shape == (1, 48)  # "" is text: embedded (by its EOS), never an error


def test_a_multi_device_encode_leaves_the_model_where_it_was(monkeypatch):
    """The workers get CPU weights, moved there in place: the model goes back to its device afterwards (and
    after a failure), so later single-device calls do not silently run on the CPU."""
    import types

    from engine import multi_device

    moves = []

    class Model:  # a model on a GPU, as far as encode_multi_device can tell
        def parameters(self):
            yield types.SimpleNamespace(device=torch.device("cuda", 1))

        def to(self, device):
            moves.append(str(device))
            return self

    enc = types.SimpleNamespace(model=Model(), tokenizer=None, device=torch.device("cuda", 1))
    monkeypatch.setattr(multi_device, "_encode_in_pool", lambda *a: "done")
    assert multi_device.encode_multi_device(enc, ["a"], [""], ["cuda:0", "cuda:1"], {}, {}) == "done"
    assert moves == ["cpu", "cuda:1"] and enc.device == torch.device("cuda", 1)

    def fails(*a):
        raise RuntimeError("a worker died")

    monkeypatch.setattr(multi_device, "_encode_in_pool", fails)
    with pytest.raises(RuntimeError, match="a worker died"):
        multi_device.encode_multi_device(enc, ["a"], [""], ["cuda:0", "cuda:1"], {}, {})
    assert moves[-2:] == ["cpu", "cuda:1"]


def test_an_encoder_built_for_a_device_puts_the_weights_there():
    """Encoder(model, tok, device=X) set only where the inputs go: the weights stayed put and the first forward
    failed on a device mismatch. The model moves (a model already there, as from_pretrained builds it, does not)."""
    import types

    from engine import Encoder

    moves = []

    class Model:  # a model on the CPU
        def parameters(self):
            yield types.SimpleNamespace(device=torch.device("cpu"))

        def eval(self):
            return self

        def to(self, device):
            moves.append(str(device))
            return self

    enc = Encoder(Model(), None, device="cuda:1")
    assert moves == ["cuda:1"] and enc.device == torch.device("cuda", 1)
    Encoder(Model(), None, device="cpu")
    Encoder(Model(), None)
    assert moves == ["cuda:1"]  # already there: no move


def test_similarity_is_cos_sim_for_one_embedding_and_many():
    """Encoder.similarity gave wrong values for a 1-D embedding (``a[:, None]`` made its H numbers H rows) and built
    an N x M x H tensor; it is sentence-transformers' ``cos_sim``: (N, M), in fp32."""
    from sentence_transformers.util import cos_sim

    enc = Encoder.__new__(Encoder)  # similarity reads no state: no model needed
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 16, generator=g), torch.randn(5, 16, generator=g)
    cases = [(a, b), (a[0], b), (a, b[1]), (a[0], b[1]), (a.numpy(), b[2].numpy()), (a.bfloat16(), b)]
    for x, y in cases:
        got = enc.similarity(x, y)
        ref = cos_sim(torch.as_tensor(x).float(), torch.as_tensor(y).float())
        rows = [len(torch.atleast_2d(torch.as_tensor(t))) for t in (x, y)]
        assert got.dtype == torch.float32 and got.shape == ref.shape == tuple(rows)
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    assert abs(float(enc.similarity(a[0], a[0])) - 1) < 1e-6


def test_two_encoders_in_one_process_each_encode_with_their_own_attention(tmp_path, tok, monkeypatch):
    """from_pretrained set the process-wide attention kernel: the last encoder loaded chose it for all (a torch
    encoder then ran Triton, which fails on CPU tensors outside the interpreter). Each encode runs its own, and
    restores the default."""
    import llm2vec_kernels

    from engine import bidirectional

    _save_base(str(tmp_path / "base"), tok)
    before = llm2vec_kernels.get_default_impl("attention")
    seen, get = [], llm2vec_kernels.get_default_impl

    def spy(op):  # the kernel each attention call of the bidirectional model picks
        if sys._getframe(1).f_code.co_name == "_attention_call":
            seen.append(get(op))
        return get(op)

    monkeypatch.setattr(bidirectional.llm2vec_kernels, "get_default_impl", spy)
    a = Encoder.from_pretrained(str(tmp_path / "base"), device="cpu", attention="torch")
    ref = a.encode(TEXTS[:2])
    b = Encoder.from_pretrained(str(tmp_path / "base"), device="cpu", attention="triton")
    seen.clear()
    np.testing.assert_array_equal(a.encode(TEXTS[:2]), ref)
    assert seen and set(seen) == {"torch"}
    seen.clear()
    b.encode(TEXTS[:2])  # tests run Triton in its interpreter (conftest): b runs its own choice, not a's
    assert seen and set(seen) == {"triton"}
    assert get("attention") == before
    with pytest.raises(ValueError, match="unknown attention"):
        Encoder.from_pretrained(str(tmp_path / "base"), device="cpu", attention="flash")


def test_an_exports_prompts_are_the_encoders(tmp_path, tok):
    """Encoder.prompts held only the query prompt: ``prompt_name="document"`` (or a task's name), which
    sentence-transformers takes from the same export, was a ValueError. Both loaders of the folder now agree."""
    from sentence_transformers import SentenceTransformer

    from engine.export import export

    base = str(tmp_path / "base")
    _save_base(base, tok)
    with open(os.path.join(base, "engine_text.json"), "w") as f:
        json.dump({"chat": None, "instruction": "Retrieve a passage that answers the question:"}, f)
    with pytest.warns(UserWarning):
        export(base, str(tmp_path / "exp"))
    own = Encoder.from_pretrained(base, device="cpu")  # the folder it came from: the same prompts
    # an export whose prompts were edited by hand (a custom one, another document prompt; in the form the export
    # writes, instruction_prefix's, which the engine encodes as sentence-transformers does): read from the folder
    stc = str(tmp_path / "exp" / "config_sentence_transformers.json")
    with open(stc) as f:
        c = json.load(f)
    c["prompts"].update(custom="Find the matching sentence:\n", document="Passage:\n")
    with open(stc, "w") as f:
        json.dump(c, f)
    st = SentenceTransformer(str(tmp_path / "exp"), device="cpu")
    enc = Encoder.from_pretrained(str(tmp_path / "exp"), device="cpu")
    assert enc.prompts == st.prompts and enc.prompts["custom"] == "Find the matching sentence:\n"
    task = next(k for k, v in st.prompts.items() if v and k not in ("query", "document", "custom"))
    for name in ("document", "query", "custom", task):
        np.testing.assert_allclose(enc.encode(TEXTS, prompt_name=name), st.encode(TEXTS, prompt_name=name),
                                   atol=1e-5, rtol=0)
    unedited = {k: v for k, v in st.prompts.items() if k != "custom"} | {"document": ""}
    assert own.prompts == unedited
    np.testing.assert_allclose(own.encode(TEXTS, prompt_name="query"), st.encode(TEXTS, prompt_name="query"),
                               atol=1e-5, rtol=0)


def test_numpy_output_is_the_tensor_not_a_copy(tok):
    """``emb.numpy().astype(np.float32)`` copied an fp32 array (1M x 4096: 16 GB more at the peak), and
    normalising made another copy; the numpy result is the tensor's memory, normalised in place, same values."""
    torch.manual_seed(0)
    from transformers import LlamaModel

    enc = Encoder(LlamaModel(tiny_llama_config(vocab_size=len(tok), hidden_size=48, num_attention_heads=4,
                                                num_key_value_heads=2)), tok, device="cpu")
    ref = enc.encode(TEXTS, convert_to_tensor=True)
    made = []
    real = torch.empty

    def spy(*a, **kw):  # the (N, H) output tensor encode_texts allocates
        made.append(real(*a, **kw))
        return made[-1]

    import engine.encoding

    torch.empty, engine.encoding.torch.empty = spy, spy
    try:
        out = enc.encode(TEXTS)
        unit = enc.encode(TEXTS, normalize_embeddings=True)
    finally:
        torch.empty = engine.encoding.torch.empty = real
    assert out.dtype == np.float32 and not out.flags.owndata and np.shares_memory(out, made[0].numpy())
    assert not unit.flags.owndata and np.shares_memory(unit, made[-1].numpy())
    np.testing.assert_array_equal(out, ref.numpy())
    np.testing.assert_array_equal(unit, torch.nn.functional.normalize(ref, dim=-1).numpy())


def test_a_padding_side_or_device_list_that_means_nothing_is_a_clear_error(tok):
    """padding_side="middle" padded right without a word, and device=[] was torch's raw TypeError."""
    torch.manual_seed(0)
    from transformers import LlamaModel

    enc = Encoder(LlamaModel(tiny_llama_config(vocab_size=len(tok), hidden_size=48, num_attention_heads=4,
                                                num_key_value_heads=2)), tok, device="cpu")
    with pytest.raises(ValueError, match="padding_side='middle'; expected 'left' or 'right'"):
        enc.encode(TEXTS, padding_side="middle")
    with pytest.raises(ValueError, match=r"device=\[\] names no device"):
        enc.encode(TEXTS, device=[])
    from engine.encoding import pad_batch

    with pytest.raises(ValueError, match="padding side"):
        pad_batch([[1, 2], [3]], 0, side="middle")


def test_adapters_on_offloaded_weights_are_refused_and_a_cpu_device_map_merges(tmp_path, tok):
    """device_map offload leaves the weights of disk layers on the meta device: merging there would silently do
    nothing (wrong embeddings), so it is one clear ValueError; a device_map that keeps every layer on the CPU
    merges as a plain load does."""
    base, ad = str(tmp_path / "base"), str(tmp_path / "ad")
    _save_adapter(_save_base(base, tok), ad, base, seed=1)
    ref = Encoder.from_pretrained(ad, device="cpu").encode(TEXTS[:2], convert_to_tensor=True)
    dm = {"embed_tokens": "cpu", "layers.0": "cpu", "layers.1": "disk", "norm": "cpu", "rotary_emb": "cpu"}
    with pytest.raises(ValueError, match="cannot be merged into offloaded weights"):
        Encoder.from_pretrained(ad, device_map=dm, offload_folder=str(tmp_path / "offload"))
    on_cpu = Encoder.from_pretrained(ad, device_map={k: "cpu" for k in dm})
    torch.testing.assert_close(on_cpu.encode(TEXTS[:2], convert_to_tensor=True), ref, atol=1e-5, rtol=0)


def test_a_corrupt_weights_file_is_one_error_line_and_exit_2(tmp_path, tok, capsys):
    """A damaged model.safetensors (SafetensorError, not an OSError) is the ModelLoadError training gives, so
    engine.evaluate (and the export) says one line and exits 2 instead of a traceback."""
    from engine.evaluate import main as evaluate
    from engine.modeling import ModelLoadError

    base = str(tmp_path / "base")
    _save_base(base, tok)
    with open(os.path.join(base, "model.safetensors"), "r+b") as f:
        f.write(b"\xff" * 16)
    with pytest.raises(ModelLoadError, match="could not load the base model"):
        Encoder.from_pretrained(base, device="cpu")
    capsys.readouterr()
    assert evaluate(["--model", base, "--task", "sts", "--data", f"{STS}/sts-dev.csv"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SafetensorError" in err[0], err


def test_a_config_deeper_than_its_weights_is_refused_not_random(tmp_path, tok):
    """config.json asks for 3 layers, the weights file holds 2: transformers would initialise the third at random
    (wrong embeddings, a log line at most). load_model and Encoder.from_pretrained refuse it, naming missing keys."""
    from engine.modeling import ModelLoadError, load_model

    base = str(tmp_path / "base")
    _save_base(base, tok)
    update_json(os.path.join(base, "config.json"), num_hidden_layers=3)
    with pytest.raises(ModelLoadError, match=r"its config asks for are not in the checkpoint \(model\.layers\.2"):
        load_model(ModelConfig(name_or_path=base))
    with pytest.raises(ModelLoadError, match=r"not in the checkpoint \(layers\.2\."):
        Encoder.from_pretrained(base, device="cpu")

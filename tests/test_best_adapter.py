"""output_dir/best/: replaced exactly when the dev score improves, holding the weights of that moment."""
import json
import os

import torch
from safetensors.torch import load_file

from engine.config import load_config
from engine.modeling import add_lora, load_model, load_tokenizer
from engine.checkpoint import BestAdapter, adapter_state_dict
from engine.distributed import init_distributed


def _lora_sum(path):
    return sum(float(v.double().sum()) for v in load_file(os.path.join(path, "adapter_model.safetensors")).values())


def test_best_adapter_tracks_the_highest_score(tmp_path):
    device = init_distributed()  # a world of one (gloo): update() broadcasts and gathers like a real run
    cfg = load_config("configs/tiny/graded.yaml", [f"output_dir={tmp_path}", "model.gradient_checkpointing=false"])
    tok = load_tokenizer(cfg.model)
    model = add_lora(load_model(cfg.model, "cpu", tok)[0], cfg.lora)

    class M:
        pass

    module = M()
    module.model = model
    best = BestAdapter(cfg, rank=0, resumed=False)
    sums, saved = {}, []
    for step, score in [(2, 10.0), (4, 30.0), (6, 20.0), (8, 30.0), (10, 31.0), (12, -5.0)]:
        with torch.no_grad():  # different weights at every eval
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.fill_(step / 100)
        sums[step] = sum(float(v.double().sum()) for v in adapter_state_dict(model).values())
        if best.update(step, score, module, cfg, tok, 0, device):
            saved.append(step)
    assert saved == [2, 4, 10]  # a tie (30 at step 8) does not replace; lower scores never do
    out = os.path.join(str(tmp_path), "best")
    with open(os.path.join(out, "engine_best.json")) as f:
        assert json.load(f)["step"] == 10
    assert abs(_lora_sum(out) - sums[10]) < 1e-6 * max(1.0, abs(sums[10]))
    assert not os.path.exists(out + ".new") and not os.path.exists(out + ".new.tmp")
    assert best.summary() == f"best adapter at {out} (step 10, dev STS Spearman 31.0000)"  # the run's last log line
    assert BestAdapter(cfg, rank=0, resumed=False).summary() is None  # nothing kept by this run: nothing named
    assert BestAdapter(cfg, rank=0, resumed=True).summary() == best.summary()  # a resumed run names the kept one

    # a resumed run keeps the record; a fresh run in the same folder starts over
    assert not BestAdapter(cfg, rank=0, resumed=True).update(14, 30.5, module, cfg, tok, 0, device)
    assert BestAdapter(cfg, rank=0, resumed=False).update(14, 1.0, module, cfg, tok, 0, device)

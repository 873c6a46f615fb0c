"""output_dir/best/: replaced exactly when the dev score improves, holding the weights of that moment."""
import json
import os

import torch
from safetensors.torch import load_file

from engine.config import load_config
from engine.modeling import add_lora, load_model, load_tokenizer
from engine.checkpoint import BestAdapter, adapter_state_dict
from engine.data import EVAL_STS_ORDER
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


def test_a_resumed_run_recovers_an_interrupted_swap_and_rereads_its_eval_set(tmp_path, capsys):
    """best/'s record holds the eval file and its pair count: a run resumed on other dev pairs does not compare
    against it (warned; its next score replaces it). A replacement killed between its two renames left
    best.old/ and a complete best.new/ but no best/: the resumed run takes the new one, else the old one."""
    cfg = load_config("configs/tiny/graded.yaml", [f"output_dir={tmp_path}"])
    best = tmp_path / "best"

    def record(folder, step, score, **extra):
        folder.mkdir()
        rec = {"step": step, "spearman": score, "eval_data": cfg.eval_data[0], "eval_sts_pairs": cfg.eval_sts_pairs,
               "eval_sts_order": EVAL_STS_ORDER}
        (folder / BestAdapter.META).write_text(json.dumps({**rec, **extra}))

    record(tmp_path / "best.old", 3, 20.0)
    record(tmp_path / "best.new", 5, 25.0)
    assert BestAdapter(cfg, rank=0, resumed=True).step == 5 and best.is_dir() and not (tmp_path / "best.new").exists()
    os.rename(best, tmp_path / "best.new")  # killed while writing the new one (no record yet): the old one back
    os.remove(tmp_path / "best.new" / BestAdapter.META)
    assert BestAdapter(cfg, rank=0, resumed=True).step == 3 and best.is_dir()
    other = load_config("configs/tiny/graded.yaml", [f"output_dir={tmp_path}", "eval_sts_pairs=50"])
    capsys.readouterr()
    kept = BestAdapter(other, rank=0, resumed=True)
    assert kept.score == float("-inf") and kept.step is None
    assert "so its next dev score replaces it" in capsys.readouterr().out
    legacy = json.loads((best / BestAdapter.META).read_text())  # a record from before the pair count was kept
    del legacy["eval_sts_pairs"], legacy["eval_sts_order"]
    (best / BestAdapter.META).write_text(json.dumps(legacy))
    # and before the order: it scored sts-dev's first 500 pairs, all captions, where this run scores all genres
    kept = BestAdapter(cfg, rank=0, resumed=True)
    assert kept.step is None and "500 pairs, the file's first); this run" in capsys.readouterr().out
    every = load_config("configs/tiny/graded.yaml", [f"output_dir={tmp_path}", "eval_sts_pairs=1500"])
    legacy["eval_sts_pairs"] = 1500  # all of dev: the same pairs whichever the order
    (best / BestAdapter.META).write_text(json.dumps(legacy))
    assert BestAdapter(every, rank=0, resumed=True).step == 3


def test_a_torn_best_record_is_one_line_not_a_traceback(tmp_path):
    """engine_best.json cut short (a power cut) is a ConfigError naming it: rank 0 alone reads it, and through
    engine.distributed.together every rank then exits 2 with it (tests/test_distributed.py)."""
    import pytest

    from engine.config import ConfigError

    cfg = load_config("configs/tiny/graded.yaml", [f"output_dir={tmp_path}"])
    (tmp_path / "best").mkdir()
    for torn in ('{"step": 5, "spear', '{"step": 5}', ""):
        (tmp_path / "best" / BestAdapter.META).write_text(torn)
        with pytest.raises(ConfigError, match="engine_best.json does not read"):
            BestAdapter(cfg, rank=0, resumed=True)


def test_the_dev_score_reads_the_tokens_evaluate_will(tmp_path):
    """The dev Spearman that picks best/ encoded at the training max_len (texts cut there), while evaluate and the
    encoder of the saved adapter read up to 512 tokens: on texts longer than max_len the two scored other tokens."""
    import types

    from engine import Encoder
    from engine.checkpoint import sts_spearman
    from engine.data import sts_eval_pairs
    from engine.evaluate import sts_scores
    from engine.stages import build_stage

    cfg = load_config("configs/tiny/graded.yaml", [f"output_dir={tmp_path}", "contrastive.max_len=6"])
    tok = load_tokenizer(cfg.model)
    model, _ = load_model(cfg.model, "cpu", tok)
    stage = build_stage(cfg, tok)
    pairs = sts_eval_pairs("data/stsbenchmark/sts-dev.csv", 60)
    dev = sts_spearman(types.SimpleNamespace(model=model), stage, "data/stsbenchmark/sts-dev.csv", max_pairs=60)

    def score(**kw):
        return sts_scores(Encoder(model, tok, pooling=cfg.contrastive.pooling, **kw), pairs)["spearman"]

    assert dev == score() and dev != score(max_length=6)


def test_pick_refuses_an_adapter_record_that_is_not_the_engines(tmp_path, capsys):
    """engine.pick read adapter/engine_encoder.json as a dict with an int step and a dict fingerprint: ``null`` and
    a string fingerprint were tracebacks, a string step "12" the line 'holds step 12, not the run's last step 12'."""
    import pytest

    from engine import pick

    from .test_pick import _run

    for n, (meta, what) in enumerate([(None, "is not a JSON object"), ([12], "is not a JSON object"),
                                      ({"step": 12, "fingerprint": "x"}, "records a fingerprint that is not"),
                                      ({"step": "12"}, "records step '12', not a whole number"),
                                      ({"step": True}, "records step True, not a whole number"),
                                      ({"step": 12, "eval_loss_rule": "2"},
                                       "records eval_loss_rule '2', not a whole number")]):
        good = _run(tmp_path / str(n), "a", {12: 4.0})
        bad = _run(tmp_path / str(n), "b", {12: 3.0}, "seed=2")
        with open(os.path.join(bad, "adapter", "engine_encoder.json"), "w") as f:
            json.dump(meta, f)
        with pytest.raises(pick.PickError, match="engine_encoder.json " + what):
            pick.pick([good, bad])
        capsys.readouterr()
        assert pick.main([good, bad]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("error: ") and what in err[0], err


def test_a_resume_puts_back_the_best_adapter_its_checkpoint_kept(tmp_path, capsys):
    """eval_every=25, save_every=50: a run that wrote best/ at step 75 and died before 100 resumes from 50. Its
    best/ is of a step the resumed run trains again; the best as of step 50 (step 25's) was overwritten by it. A
    checkpoint keeps best/ as of its step (hard links) and records it in run.json; the resume puts that one back
    (another score at step 75, on another rank count, must not leave the dead run's weights there)."""
    import shutil

    from engine.checkpoint import RUN_FILE, keep_best, restore_best

    out, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    cfg = load_config("configs/tiny/graded.yaml", [f"output_dir={out}"])

    def best_at(step, score):  # what BestAdapter.update leaves in best/
        folder = out / "best"
        shutil.rmtree(folder, ignore_errors=True)  # (update replaces the folder: the old files are not written)
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(f"weights of step {step}".encode())
        (folder / BestAdapter.META).write_text(json.dumps({"step": step, "spearman": score,
                                                           "eval_data": cfg.eval_data[0],
                                                           "eval_sts_pairs": cfg.eval_sts_pairs,
                                                           "eval_sts_order": EVAL_STS_ORDER}))

    def checkpoint(step):  # Checkpointer.save's record
        path = root / f"step_{step:07d}"
        path.mkdir(parents=True)
        kept = keep_best(str(out), str(path))
        (path / RUN_FILE).write_text(json.dumps({"step": step, **kept}))
        return kept

    assert checkpoint(10) == {"best": None}  # no best/ yet: recorded as none
    best_at(25, 0.5)
    rec = checkpoint(50)["best"]
    assert rec["step"] == 25
    assert os.stat(out / "best" / "adapter_model.safetensors").st_ino == \
        os.stat(root / "step_0000050" / "best" / "adapter_model.safetensors").st_ino  # linked, not a second copy
    best_at(75, 0.7)  # the dead run's future
    restore_best(str(out), str(root), "step_0000050")
    assert "putting back that one (step 25)" in capsys.readouterr().out
    assert (out / "best" / "adapter_model.safetensors").read_bytes() == b"weights of step 25"
    assert not (out / "best.tmp").exists()
    kept = BestAdapter(cfg, rank=0, resumed=True)
    assert (kept.step, kept.score) == (25, 0.5)  # step 75's rerun is compared with step 25's score
    restore_best(str(out), str(root), "step_0000050")  # already the checkpoint's: silent, untouched
    assert capsys.readouterr().out == ""
    # the dead run's best/ from past a checkpoint that had none: removed (the rerun writes it again)
    best_at(30, 0.6)
    restore_best(str(out), str(root), "step_0000010")
    assert "it had none yet: removing best/" in capsys.readouterr().out and not (out / "best").exists()
    # an interrupted swap's leftovers go with it; a missing best/ comes back
    (out / "best.old").mkdir()
    restore_best(str(out), str(root), "step_0000050")
    assert (out / "best" / "adapter_model.safetensors").read_bytes() == b"weights of step 25"
    assert not (out / "best.old").exists()
    # a checkpoint from before the record: best/ as found (resume=force under other settings drops a later one)
    legacy = root / "step_0000060"
    legacy.mkdir()
    (legacy / RUN_FILE).write_text(json.dumps({"step": 60}))
    best_at(75, 0.7)
    restore_best(str(out), str(root), "step_0000060")
    assert json.loads((out / "best" / BestAdapter.META).read_text())["step"] == 75
    restore_best(str(out), str(root), "step_0000060", forced=True)
    assert not (out / "best").exists() and "past a best adapter of step 75" in capsys.readouterr().out

"""Runs you can trust: run identity on resume, safe checkpoint discovery and cleanup, the non-finite guard.

The decisions (plan_resume, cleanup, metrics on resume) are tested on fabricated folders in-process; the
end-to-end cases run the real one-rank trainer on configs/tiny/* for a few steps.
"""
import csv
import glob
import hashlib
import json
import os
import shutil

import pytest
import yaml

from engine.checkpoint import COMPLETE, RUN_FILE, Checkpointer, fingerprint, plan_resume
from engine.config import ConfigError, load_config
from engine.metrics import MetricsLogger
from engine.optim import is_nonfinite_step

from .helpers import ROOT, run_cmd

TINY = os.path.join(ROOT, "configs", "tiny")
# A cheap MNTP run: 4 steps, checkpoints at 2 and 4.
MNTP = ["max_steps=4", "save_every=2", "eval_every=0", "model.gradient_checkpointing=false", "max_seq_len=32",
        "batch_size=4", "micro_batch_size=2", "max_samples=100", "keep_checkpoints=2"]


def _cfg(out, *overrides, stage="mntp"):
    return load_config(os.path.join(TINY, f"{stage}.yaml"), [f"output_dir={out}", *MNTP, *overrides])


def _fake_ckpt(out, step, cfg, complete=True, fp=None):
    """A checkpoint folder of ``cfg``'s run at ``step`` (``fp``: the fingerprint it records, cfg's by default)."""
    path = os.path.join(out, "checkpoints", f"step_{step:07d}")
    os.makedirs(path)
    if complete:
        with open(os.path.join(path, RUN_FILE), "w") as f:
            json.dump({"step": step, "fingerprint": fingerprint(cfg) if fp is None else fp}, f)
        open(os.path.join(path, COMPLETE), "w").close()
    return path


def test_a_run_that_stopped_before_its_first_checkpoint_is_not_taken_over(tmp_path):
    """A run that died before its first checkpoint leaves config.yaml and metrics.csv only. Another run (other
    settings) into that folder took them over: config.yaml rewritten, the metrics rows dropped. It is refused under
    resume=auto, naming what differs; the same run restarts over its own log, and resume=force starts over."""
    import yaml

    from engine.config import to_dict

    out = str(tmp_path / "run")
    os.makedirs(out)
    first = _cfg(out)
    with open(os.path.join(out, "config.yaml"), "w") as f:
        yaml.safe_dump(to_dict(first), f, sort_keys=False)
    (tmp_path / "run" / "metrics.csv").write_text("step,loss\n1,9.5\n")
    assert plan_resume(_cfg(out)) == ([], [])  # the same run: restarted over its own log
    with pytest.raises(ConfigError, match=r"another run, which stopped before its first checkpoint \(learning_rate: "):
        plan_resume(_cfg(out, "learning_rate=3e-3"))
    assert plan_resume(_cfg(out, "learning_rate=3e-3", "resume=force")) == ([], [])
    (tmp_path / "run" / "config.yaml").write_text("- not a config\n")
    with pytest.raises(ConfigError, match="its config.yaml does not read"):
        plan_resume(_cfg(out))


def test_a_forced_resume_does_not_go_back_past_max_steps(tmp_path):
    """resume=force with max_steps below the newest checkpoint's step ran no step and wrote adapter/ labelled
    max_steps holding the later step's weights. It is refused in one line; max_steps past it resumes. At it, no step
    would run under the new values, yet adapter/ and config.yaml were written with them (engine.pick then took the
    trained run's weights for a run of the new settings): refused too, unless nothing differs (the same run
    finishing: its final adapter, as resume=auto writes it)."""
    out = str(tmp_path)
    _fake_ckpt(out, 4, _cfg(out))
    _set_latest(out, "step_0000004")
    with pytest.raises(ConfigError, match=r"resume=force: the newest checkpoint, step_0000004, is past max_steps 2; "
                                          r"a run does not go back: set max_steps >= 4"):
        plan_resume(_cfg(out, "max_steps=2", "resume=force"))
    with pytest.raises(ConfigError, match=r"resume=force: the newest checkpoint, step_0000004, is at max_steps 4: no "
                                          r"step would run under the new values \(learning_rate: 0.01 in the "
                                          r"checkpoint, 0.003 now\).*set max_steps > 4.*step_0000004/adapter"):
        plan_resume(_cfg(out, "max_steps=4", "resume=force", "learning_rate=3e-3"))
    assert plan_resume(_cfg(out, "max_steps=4", "resume=force")) == (["step_0000004"], [])
    assert plan_resume(_cfg(out, "max_steps=6", "resume=force"))[0] == ["step_0000004"]


def _set_latest(out, tag):
    with open(os.path.join(out, "checkpoints", "latest"), "w") as f:
        f.write(tag)


def test_plan_resume_same_run_and_latest_fallbacks(tmp_path, capsys):
    out = str(tmp_path)
    cfg = _cfg(out)
    assert plan_resume(cfg) == ([], [])  # nothing there: a fresh start
    for s in (2, 4):
        _fake_ckpt(out, s, cfg)
    _fake_ckpt(out, 6, cfg, complete=False)  # a save that did not finish: never resumed
    _set_latest(out, "step_0000004")
    assert plan_resume(cfg) == (["step_0000004", "step_0000002"], [])
    assert "ignoring incomplete checkpoint folders" in capsys.readouterr().out
    _set_latest(out, "step_0000009")  # dangling: falls back to the newest complete checkpoint, with a warning
    assert plan_resume(cfg)[0][0] == "step_0000004"
    assert "names 'step_0000009', which is not the newest complete checkpoint" in capsys.readouterr().out
    os.remove(os.path.join(out, "checkpoints", "latest"))  # missing: the same
    assert plan_resume(cfg)[0][0] == "step_0000004"
    assert "latest is missing; resuming from the newest complete checkpoint, step_0000004" in capsys.readouterr().out


def test_a_checkpoint_written_before_the_trainer_split_is_the_same_run(tmp_path):
    # run.json exactly as the pre-split trainer (engine/config.py's fingerprint) wrote it for configs/tiny/mntp.yaml
    # at step 6; the repository root is {ROOT}. The split must keep reading it as the same run.
    with open(os.path.join(ROOT, "tests", "fixtures", "run_json_before_issue21.json")) as f:
        old = json.loads(f.read().replace("{ROOT}", ROOT))
    out = str(tmp_path)
    path = os.path.join(out, "checkpoints", "step_0000006")
    os.makedirs(path)
    with open(os.path.join(path, RUN_FILE), "w") as f:
        json.dump(old, f)
    open(os.path.join(path, COMPLETE), "w").close()
    _set_latest(out, "step_0000006")
    cfg = load_config(os.path.join(TINY, "mntp.yaml"), [f"output_dir={out}"])
    assert plan_resume(cfg) == (["step_0000006"], [])
    assert fingerprint(cfg) == old["fingerprint"]
    # a key added since (mntp.pack) enters the fingerprint only when it changes what the run does
    unpacked = load_config(os.path.join(TINY, "mntp.yaml"), [f"output_dir={out}", "mntp.pack=false"])
    assert fingerprint(unpacked) == dict(old["fingerprint"], **{"mntp.pack": False})
    with pytest.raises(ConfigError, match="mntp.pack: '<unset>' in the checkpoint, False now"):
        plan_resume(unpacked)


def test_a_contrastive_checkpoint_from_before_mask_false_negatives_is_the_same_run(tmp_path, monkeypatch):
    """contrastive.mask_false_negatives (default off, llm2vec's loss) enters the fingerprint only when on: a supervised
    checkpoint saved before the key existed resumes under a config that leaves it off, and is another run with it on."""
    import engine.checkpoint as checkpoint
    from engine.config import to_dict

    out = str(tmp_path)
    cfg = load_config(os.path.join(TINY, "supervised.yaml"), [f"output_dir={out}"])

    def before_the_key(c):  # the config dict as the engine wrote it before the key existed
        d = to_dict(c)
        del d["contrastive"]["mask_false_negatives"]
        return d

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "to_dict", before_the_key)
        old = fingerprint(cfg)
    assert "contrastive.temperature" in old and fingerprint(cfg) == old
    _fake_ckpt(out, 3, cfg, fp=old)
    _set_latest(out, "step_0000003")
    assert plan_resume(cfg) == (["step_0000003"], [])
    masked = load_config(os.path.join(TINY, "supervised.yaml"), [f"output_dir={out}",
                                                                 "contrastive.mask_false_negatives=true"])
    with pytest.raises(ConfigError, match="contrastive.mask_false_negatives: '<unset>' in the checkpoint, True now"):
        plan_resume(masked)


def test_runs_are_compared_on_the_projections_their_lora_adapts(tmp_path):
    """lora.target_modules in a fingerprint is the set of projections adapted: the order of the list, and a fused
    module's name (Phi3's qkv_proj, gate_up_proj) against its parts' names, give the same adapter, so resume and pick
    take them as one run; another set of projections is another run. (pick refused two bit-identical Phi3 runs.)"""
    from engine.checkpoint import fingerprint_diff

    out = str(tmp_path)
    base = load_config(os.path.join(TINY, "mntp.yaml"), [f"output_dir={out}"])
    fp = fingerprint(base)
    for same in ("[down_proj,up_proj,gate_proj,o_proj,v_proj,k_proj,q_proj]",
                 "[qkv_proj,o_proj,gate_up_proj,down_proj]"):
        cfg = load_config(os.path.join(TINY, "mntp.yaml"), [f"output_dir={out}", f"lora.target_modules={same}"])
        assert fingerprint_diff(fp, fingerprint(cfg)) == [], same
    other = load_config(os.path.join(TINY, "mntp.yaml"), [f"output_dir={out}", "lora.target_modules=[q_proj,v_proj]"])
    assert [k for k, _, _ in fingerprint_diff(fp, fingerprint(other))] == ["lora.target_modules"]
    _fake_ckpt(out, 2, base)
    _set_latest(out, "step_0000002")
    reordered = load_config(os.path.join(TINY, "mntp.yaml"), [f"output_dir={out}",
                                                              "lora.target_modules=[o_proj,q_proj,k_proj,v_proj,"
                                                              "gate_proj,up_proj,down_proj]"])
    assert plan_resume(reordered) == (["step_0000002"], [])


def test_plan_resume_never_restarts_silently(tmp_path):
    out = str(tmp_path)
    cfg = _cfg(out)
    _fake_ckpt(out, 3, cfg, complete=False)
    _set_latest(out, "step_0000003")  # latest exists, but no complete checkpoint does
    with pytest.raises(ConfigError, match="no complete checkpoint to resume; refusing to restart at step 0"):
        plan_resume(cfg)
    with pytest.raises(ConfigError, match="resume=must but there is no checkpoint"):
        plan_resume(_cfg(str(tmp_path / "empty"), "resume=must"))
    with pytest.raises(ConfigError, match=r"resume=never but .* holds a previous run \(checkpoints step_0000003\)"):
        plan_resume(_cfg(out, "resume=never"))
    done = tmp_path / "finished"  # a final adapter without any checkpoint: not silently trained over
    (done / "adapter").mkdir(parents=True)
    with pytest.raises(ConfigError, match="holds a final adapter but no checkpoint to resume"):
        plan_resume(_cfg(str(done)))
    assert plan_resume(_cfg(str(done), "resume=force")) == ([], [])
    (done / "metrics.csv").write_text("step,loss\n1,2.0\n")  # resume=never does not start over a finished run either
    with pytest.raises(ConfigError, match=r"resume=never but .* holds a previous run \(adapter/; metrics.csv\); .*"
                                          r"resume=force"):
        plan_resume(_cfg(str(done), "resume=never"))
    assert plan_resume(_cfg(str(tmp_path / "fresh"), "resume=never")) == ([], [])  # an empty output_dir is fine
    killed = tmp_path / "killed"  # save_every 0, killed after a dev eval: best/ is its only result
    (killed / "best").mkdir(parents=True)
    (killed / "metrics.csv").write_text("step,loss,eval_sts_spearman\n50,1.0,0.8\n")
    with pytest.raises(ConfigError, match="holds a best/ adapter but no checkpoint to resume"):
        plan_resume(_cfg(str(killed)))
    assert plan_resume(_cfg(str(killed), "resume=force")) == ([], [])


def test_a_fresh_start_over_a_folder_removes_its_stale_best_adapter(tmp_path, capsys):
    """resume=force starting over: the earlier run's best/ (and a swap's leftovers) go, so that the encoder,
    evaluate and the export (which prefer best/) cannot serve it as the new run's model."""
    from engine.checkpoint import drop_stale_best

    for d in ("best", "best.old", "adapter"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "adapter_config.json").write_text("{}")
    drop_stale_best(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # adapter/ is replaced at the end, not before
    assert "removing the earlier run's best/, best.old/" in capsys.readouterr().out
    drop_stale_best(str(tmp_path))  # nothing to remove: silent
    assert capsys.readouterr().out == ""


@pytest.mark.slow
def test_a_forced_resume_under_other_settings_drops_a_best_adapter_from_past_its_checkpoint(tmp_path):
    """resume=force from step 2 with another learning rate: a best/ recorded at step 4 came from the steps this run
    replaces, so it goes (the encoder, evaluate and the export prefer best/); an exact resume (resume=auto, the same
    settings) keeps it, since it redoes those steps as they were."""
    out = str(tmp_path / "run")
    base = ["python", "engine/train.py", "--config", "configs/tiny/mntp.yaml", f"output_dir={out}", "max_steps=4",
            "save_every=2", "eval_every=4", "eval_sts_pairs=100", "progress_bar=false"]

    def rewind():  # killed in step 4 after its eval: the newest checkpoint is step 2's
        shutil.rmtree(os.path.join(out, "checkpoints", "step_0000004"), ignore_errors=True)
        shutil.rmtree(os.path.join(out, "adapter"), ignore_errors=True)

    r = run_cmd(base, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(os.path.join(out, "best", "engine_best.json")) as f:
        assert json.load(f)["step"] == 4
    rewind()
    r = run_cmd(base, timeout=300)  # the same run: best/ stays
    assert r.returncode == 0 and "removing the earlier run's" not in r.stdout + r.stderr, r.stderr[-3000:]
    rewind()
    r = run_cmd(base + ["resume=force", "learning_rate=5e-3", "eval_every=0"], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed at step 2 under other settings (resume=force), past a best adapter of step 4" in r.stdout + r.stderr
    assert not os.path.exists(os.path.join(out, "best"))


def test_a_run_lock_that_cannot_be_had_is_a_config_error(tmp_path, monkeypatch):
    """A filesystem without flock, or a run.lock that cannot be opened: one line (ConfigError, exit 2), and a lock
    file this attempt created is removed; a lock held by another run is still RunFolderBusy."""
    import errno

    from engine import checkpoint
    from engine.checkpoint import LOCK_FILE, RunFolderBusy, _lock_file

    (tmp_path / "dir" / LOCK_FILE).mkdir(parents=True)
    with pytest.raises(ConfigError, match="cannot open the run lock .*run.lock"):
        _lock_file(str(tmp_path / "dir"))
    held = _lock_file(str(tmp_path / "busy"))
    with pytest.raises(RunFolderBusy, match="is in use by another run"):
        _lock_file(str(tmp_path / "busy"))
    os.close(held)

    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(checkpoint.fcntl, "flock", no_flock)
    with pytest.raises(ConfigError, match="cannot lock .*Function not implemented; a run needs output_dir on a "
                                          "filesystem with flock"):
        _lock_file(str(tmp_path / "nfs"))
    assert os.listdir(tmp_path / "nfs") == []


def test_plan_resume_refuses_a_different_run(tmp_path):
    out = str(tmp_path)
    cfg = _cfg(out)
    _fake_ckpt(out, 4, cfg)
    _set_latest(out, "step_0000004")
    with pytest.raises(ConfigError, match=r"holds a different run \(step_0000004\); differing keys: .*stage: 'mntp' "
                                          r"in the checkpoint, 'simcse' now"):
        plan_resume(_cfg(out, stage="simcse"))
    with pytest.raises(ConfigError, match=r"differing keys: learning_rate: 0.01 in the checkpoint, 0.02 now"):
        plan_resume(_cfg(out, "learning_rate=0.02"))
    with pytest.raises(ConfigError, match=r"differing keys: max_steps: 4 in the checkpoint, 8 now"):
        plan_resume(_cfg(out, "max_steps=8"))
    tags, diff = plan_resume(_cfg(out, "learning_rate=0.02", "max_steps=8", "resume=force"))  # (steps to train)
    assert tags == ["step_0000004"] and diff == [("learning_rate", 0.01, 0.02), ("max_steps", 4, 8)]
    # Keys that do not define the run (logging, saving, kernels) resume freely.
    assert plan_resume(_cfg(out, "log_every=2", "keep_checkpoints=5", "model.attention=torch"))[1] == []


def test_fallback_stays_within_the_run(tmp_path):
    """The checkpoints a resume may fall back to (the newest unloadable) are the newest one's run only: an older
    checkpoint of another run (kept after a resume=force over it) would resume without the identity check."""
    out = str(tmp_path)
    _fake_ckpt(out, 2, _cfg(out, "learning_rate=0.05"))  # another run's
    _fake_ckpt(out, 4, _cfg(out))
    _fake_ckpt(out, 6, _cfg(out))
    _set_latest(out, "step_0000006")
    assert plan_resume(_cfg(out)) == (["step_0000006", "step_0000004"], [])
    os.remove(os.path.join(out, "checkpoints", "step_0000006", RUN_FILE))
    os.remove(os.path.join(out, "checkpoints", "step_0000004", RUN_FILE))
    with open(os.path.join(out, "checkpoints", "step_0000006", RUN_FILE), "w") as f:
        f.write("{not json")
    open(os.path.join(out, "checkpoints", "step_0000004", RUN_FILE), "w").close()
    with pytest.raises(ConfigError, match="step_0000006/run.json cannot be read"):
        plan_resume(_cfg(out))


def test_resume_refuses_data_changed_under_the_same_paths(tmp_path, capsys):
    """A checkpoint records its data's identity (item count, content hash of every source) beside the paths the
    fingerprint holds: a resume over changed data would train on other batches at the same position, so it is
    refused under auto and warned under force; a checkpoint without the record (older runs) is not checked."""
    from engine.checkpoint import _check_data_of
    from engine.token_cache import data_identity

    docs = tmp_path / "docs.txt"
    docs.write_text("one\ntwo\nthree\n")
    out = str(tmp_path / "run")
    cfg = _cfg(out, f"data={docs}")
    before = data_identity(cfg.data, 3)
    assert data_identity(cfg.data, 3) == before
    path = _fake_ckpt(out, 2, cfg)
    with open(os.path.join(path, RUN_FILE)) as f:
        rec = json.load(f)
    with open(os.path.join(path, RUN_FILE), "w") as f:
        json.dump({**rec, "data": before}, f)
    _check_data_of(cfg, 0, os.path.join(out, "checkpoints"), "step_0000002", before)  # the same data: fine
    docs.write_text("one\ntwo\nthree, edited\n")
    now = data_identity(cfg.data, 3)
    assert now["sha256"] != before["sha256"]
    with pytest.raises(ConfigError, match=r"changed since step_0000002 \(the same 3 items but other content\)"):
        _check_data_of(cfg, 0, os.path.join(out, "checkpoints"), "step_0000002", now)
    with pytest.raises(ConfigError, match=r"3 items then, 4 now"):
        _check_data_of(cfg, 0, os.path.join(out, "checkpoints"), "step_0000002", data_identity(cfg.data, 4))
    forced = _cfg(out, f"data={docs}", "resume=force")
    capsys.readouterr()
    _check_data_of(forced, 0, os.path.join(out, "checkpoints"), "step_0000002", now)
    assert "resume=force: the data under" in capsys.readouterr().out
    # the same files read by an engine whose readers changed since (data.READ_RULES): other items, refused
    with open(os.path.join(path, RUN_FILE), "w") as f:
        json.dump({**rec, "data": {**now, "read_rules": now["read_rules"] - 1}}, f)
    with pytest.raises(ConfigError, match=rf"this engine reads them by rules {now['read_rules']} and step_0000002 "
                                          rf"was read by rules {now['read_rules'] - 1}"):
        _check_data_of(cfg, 0, os.path.join(out, "checkpoints"), "step_0000002", now)
    with open(os.path.join(path, RUN_FILE), "w") as f:  # a record from before the rules were kept: not judged
        json.dump({**rec, "data": {k: v for k, v in now.items() if k != "read_rules"}}, f)
    _check_data_of(cfg, 0, os.path.join(out, "checkpoints"), "step_0000002", now)
    with open(os.path.join(path, RUN_FILE), "w") as f:
        json.dump(rec, f)  # recorded before data identities were kept
    _check_data_of(cfg, 0, os.path.join(out, "checkpoints"), "step_0000002", now)


def test_cleanup_compares_step_numbers_and_keeps_the_checkpoint_just_saved(tmp_path):
    out = str(tmp_path)
    cfg = _cfg(out)
    for s in (6, 9):  # folders of an earlier, longer run
        _fake_ckpt(out, s, cfg)
    _fake_ckpt(out, 1, cfg, complete=False)
    for s in (2, 3, 4):
        _fake_ckpt(out, s, cfg)
    Checkpointer(cfg, None, None, None, 0).cleanup(4)  # keep_checkpoints=2, step_0000004 just saved
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == [
        "step_0000003", "step_0000004", "step_0000006", "step_0000009"]


def test_metrics_rows_past_the_resumed_step_are_dropped(tmp_path):
    cfg = _cfg(str(tmp_path))
    path = tmp_path / "metrics.csv"
    path.write_text("step,loss\n" + "".join(f"{s},{s / 10}\n" for s in range(1, 7)))
    logger = MetricsLogger(cfg, 0, start=4)
    logger.log(5, {"loss": 0.55})
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5] and rows[-1]["loss"] == "0.55"


def _train(out, *overrides, config="mntp", extra=MNTP, env=None):
    return run_cmd(["python", "engine/train.py", "--config", f"configs/tiny/{config}.yaml", f"output_dir={out}",
                    *extra, *overrides], env=env, timeout=600)


def _metrics(out):
    with open(os.path.join(out, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def mntp_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mntp") / "run")
    r = _train(out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


@pytest.mark.slow
def test_a_different_run_is_refused_before_anything_is_written(mntp_run, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(mntp_run, out)
    before = {p: _sha(os.path.join(out, p)) for p in ("config.yaml", "metrics.csv", "adapter/adapter_model.safetensors")}
    simcse = ["max_steps=4", "batch_size=4", "micro_batch_size=4", "model.gradient_checkpointing=false"]
    for config, overrides, key in (("simcse", simcse, "stage: 'mntp' in the checkpoint, 'simcse' now"),
                                   ("mntp", MNTP + ["learning_rate=0.05"], "learning_rate: 0.01 in the checkpoint")):
        r = _train(out, config=config, extra=overrides)
        assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
        assert "holds a different run (step_0000004)" in r.stderr and key in r.stderr, r.stderr[-2000:]
        assert "resume=force" in r.stderr and "resumed from" not in r.stdout
        assert {p: _sha(os.path.join(out, p)) for p in before} == before  # config.yaml and the rest untouched


@pytest.mark.slow
def test_dangling_latest_and_corrupt_newest_checkpoint_fall_back_and_resume_exactly(mntp_run, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(mntp_run, out)
    ref = {int(r["step"]): float(r["loss"]) for r in _metrics(mntp_run)}
    ckpts = os.path.join(out, "checkpoints")
    _set_latest(out, "step_0000009")  # dangling
    # DeepSpeed's module state file: mp_rank_00_model_states.pt under stage 0 (zero_stage auto on a small model),
    # zero_pp_rank_0_mp_rank_00_model_states.pt under ZeRO-3
    states = glob.glob(os.path.join(ckpts, "step_0000004", "*model_states.pt"))
    assert states, os.listdir(os.path.join(ckpts, "step_0000004"))
    for path in states:
        with open(path, "r+b") as f:  # truncated: the newest complete checkpoint cannot be loaded
            f.truncate(100)
    r = _train(out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "latest names 'step_0000009'" in r.stdout
    assert "could not load checkpoint" in r.stdout and "fell back to step_0000002" in r.stdout
    assert "resumed from step_0000002: step 2" in r.stdout
    rows = _metrics(out)
    assert [int(x["step"]) for x in rows] == [1, 2, 3, 4]  # steps 3 and 4 logged again, not twice
    for x in rows:  # the same batches, masks and optimizer state as the uninterrupted run
        assert float(x["loss"]) == pytest.approx(ref[int(x["step"])], rel=1e-5, abs=1e-6)
    with open(os.path.join(ckpts, "latest")) as f:
        assert f.read().strip() == "step_0000004"
    assert os.path.isfile(os.path.join(ckpts, "step_0000004", COMPLETE))


@pytest.mark.slow
def test_force_applies_the_new_learning_rate_and_max_steps(mntp_run, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(mntp_run, out)
    r = _train(out, "resume=force", "learning_rate=0.05", "max_steps=6", "warmup_steps=0", "weight_decay=0.05",
               "adam_betas=[0.8,0.95]", "max_grad_norm=0.5")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resume=force" in r.stdout and "resumed from step_0000004: step 4" in r.stdout
    # the checkpoint's optimizer state carried the old betas and weight decay (and DeepSpeed's clip_grad): the new
    # values, read back from the optimizer after the load
    assert "optimizer now betas (0.8, 0.95), weight_decay 0.05, lr 0.0166667, gradient clipping 0.5" in r.stdout, \
        r.stdout[-3000:]
    lr = {int(x["step"]): float(x["lr"]) for x in _metrics(out)}
    # linear decay over the new 6 steps from the new peak; step k applies 0.05 * (1 - (k - 1) / 6)
    assert lr[5] == pytest.approx(0.05 * (1 - 4 / 6)) and lr[6] == pytest.approx(0.05 * (1 - 5 / 6))
    with open(os.path.join(out, "config.yaml")) as f:
        saved = yaml.safe_load(f)
    assert (saved["learning_rate"], saved["max_steps"]) == (0.05, 6)


def _failing_log():
    """engine/train.py whose metrics.csv write of step 2's row fails (``python -m tests.run_check``, which run_cmd
    forks from the zygote)."""
    import errno
    import sys

    log = MetricsLogger.log

    def failing(self, step, row):
        if step == 2:
            raise OSError(errno.EIO, "injected metrics write failure")
        return log(self, step, row)

    MetricsLogger.log = failing
    from engine.train import exit_with, main

    exit_with(main(sys.argv[1:]))


@pytest.mark.slow
def test_a_failed_metrics_write_at_a_save_step_ends_the_run_before_that_checkpoint_is_marked(tmp_path):
    """A checkpoint says metrics.csv holds every row up to its step (a resume drops later rows and writes from
    there). Rank 0's failed write of step 2's row was raised only at step 3's all-reduce, after step 2's checkpoint
    was marked COMPLETE: the resume started at step 3 and row 2 was never written. The failure must end the run
    before that checkpoint is marked; the rerun then starts before it and writes every row."""
    out = str(tmp_path / "run")
    r = run_cmd(["python", "-m", "tests.run_check", "tests.test_run_safety:_failing_log", "--config",
                 "configs/tiny/mntp.yaml", f"output_dir={out}", *MNTP, "log_every=1"], timeout=600)
    assert r.returncode != 0 and "injected metrics write failure" in r.stderr, r.stdout[-3000:] + r.stderr[-3000:]
    ckpts = os.path.join(out, "checkpoints")
    assert not os.path.exists(os.path.join(ckpts, "step_0000002", COMPLETE))
    assert not os.path.exists(os.path.join(ckpts, "latest"))
    r = _train(out, "log_every=1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert [int(x["step"]) for x in _metrics(out)] == [1, 2, 3, 4]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])  # bf16: DeepSpeed's flat BF16_Optimizer skips the step itself
def test_non_finite_steps_stop_the_run_with_exit_3_and_keep_the_last_good_checkpoint(tmp_path, dtype):
    out = str(tmp_path / "run")
    simcse = ["batch_size=4", "micro_batch_size=4", "model.gradient_checkpointing=false", "eval_every=0",
              "max_samples=100", "save_every=1", "keep_checkpoints=1", f"model.dtype={dtype}", "memory_budget_gb=64"]
    r = _train(out, "max_steps=2", config="simcse", extra=simcse)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"ZeRO stage {1 if dtype == 'bf16' else 0}, " in r.stdout, r.stdout[-3000:]
    adapter = os.path.join(out, "adapter", "adapter_model.safetensors")
    good = _sha(adapter)
    # A temperature of 1e-45 (a float32 denormal) makes the logits inf and the loss nan on every step, as
    # temperature=0 did before validation refused it.
    r = _train(out, "max_steps=8", "contrastive.temperature=1e-45", "resume=force", config="simcse", extra=simcse)
    assert r.returncode == 3, r.stdout[-3000:] + r.stderr[-3000:]
    assert "3 non-finite steps in a row" in r.stderr and "Traceback" not in r.stderr
    rows = {int(x["step"]): x for x in _metrics(out)}
    assert sorted(rows) == [1, 2, 3, 4, 5]
    assert [rows[s]["nonfinite"] for s in (3, 4, 5)] == ["1", "1", "1"]
    assert [int(rows[s]["skipped_steps"]) for s in (3, 4, 5)] == [1, 2, 3]  # DeepSpeed's own skips, counted
    assert not any(t.startswith("step_") and t != "step_0000002" for t in os.listdir(os.path.join(out, "checkpoints")))
    with open(os.path.join(out, "checkpoints", "latest")) as f:
        assert f.read().strip() == "step_0000002"
    assert _sha(adapter) == good  # the good adapter was not overwritten
    assert "not saving a checkpoint from a non-finite step" in r.stdout


def test_nonfinite_step_rule():
    nan, inf = float("nan"), float("inf")
    assert is_nonfinite_step(nan, 1.0) and is_nonfinite_step(inf, 1.0) and is_nonfinite_step(nan, 1.0, fp16=True)
    assert is_nonfinite_step(2.0, inf) and is_nonfinite_step(2.0, nan)
    assert not is_nonfinite_step(2.0, inf, fp16=True)  # fp16 loss-scale overflow: skipped by DeepSpeed, counted
    assert not is_nonfinite_step(2.0, 0.0) and not is_nonfinite_step(2.0, None)  # a zero norm is finite


@pytest.mark.slow
def test_a_full_disk_in_rank_0s_metrics_write_ends_every_rank_alike_with_no_launcher_to_stop_them(tmp_path):
    """On several nodes nothing stops the other ranks when rank 0 fails: a failed metrics.csv append (a full disk)
    must reach them, or they wait in the next step's collective (NCCL: until its timeout). Two ranks started
    without a launcher, the run folder on a small tmpfs that metrics.csv fills after some steps: both ranks end
    with exit 2, one line from rank 0, no traceback."""
    import subprocess

    from engine.distributed import free_port

    from .helpers import run_ranks, tmpfs_mount
    from .launch import rank_commands

    mnt = tmp_path / "small"
    if os.geteuid() != 0 or not tmpfs_mount(mnt, "24k"):
        pytest.skip("needs root and `mount -t tmpfs` to make a small file system")
    try:
        out = mnt / "run"
        args = ["--config", os.path.join(TINY, "mntp.yaml"), f"output_dir={out}", "max_steps=400", "save_every=0",
                "eval_every=0", "model.gradient_checkpointing=false", "max_seq_len=16", "batch_size=2",
                "micro_batch_size=1", "max_samples=40", "progress_bar=false", "logger=csv"]
        env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MASTER_ADDR", "MASTER_PORT")}
        env["PYTHONUNBUFFERED"] = "1"
        results = run_ranks(rank_commands(2, free_port(), "engine/train.py", args, env), [ROOT, ROOT], timeout=300)
        err = "".join(se for _, _, se in results)
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert [rc for rc, _, _ in results] == [2, 2], err[-4000:]
        assert len(lines) == 1 and "no space left on the device writing" in lines[0], err[-4000:]
        assert "Traceback" not in err, err[-4000:]
        with open(out / "metrics.csv") as f:
            assert len(f.read().splitlines()) > 3  # steps were logged before the disk filled
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def _failing_save():
    """A rank of engine/train.py (``python -u -m tests.run_check``, forked from the zygote) whose DeepSpeed state
    file of step 2 cannot be written on rank 1 (a full disk)."""
    import errno
    import sys

    import torch

    if os.environ.get("RANK") == "1":
        save = torch.save

        def failing(obj, f, *args, **kwargs):
            if "step_0000002" in str(f):
                raise OSError(errno.ENOSPC, "No space left on device", str(f))
            return save(obj, f, *args, **kwargs)

        torch.save = failing
    from engine.train import exit_with, main

    exit_with(main(sys.argv[1:]))


@pytest.mark.slow
def test_a_state_file_that_one_rank_cannot_write_ends_every_rank_at_once(tmp_path):
    """DeepSpeed's save_checkpoint ends in a barrier. A torch.save that raised on one rank (a full disk, EIO) took
    that rank out of it, and the others waited there until the collective's timeout (NCCL: 30 minutes; gloo sees
    the peer leave, and said so in a second line). The error is kept until the barrier and raised on every rank
    after it: both ranks, started without a launcher to stop them, exit 2 at once with one line from the failed
    rank, and the checkpoint is never marked complete."""
    from engine.distributed import free_port

    from .helpers import run_ranks
    from .launch import rank_commands

    out = tmp_path / "run"
    args = ["--config", os.path.join(TINY, "mntp.yaml"), f"output_dir={out}", *MNTP, "zero_stage=1",
            "memory_budget_gb=64", "progress_bar=false"]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONUNBUFFERED"] = "1"
    # each rank: python -u -m tests.run_check tests.test_run_safety:_failing_save --local_rank=R args (from ROOT)
    cmds = [([argv[0], "-u", "-m", "tests.run_check", "tests.test_run_safety:_failing_save", *argv[3:]], e)
            for argv, e in rank_commands(2, free_port(), "engine/train.py", args, env)]
    results = run_ranks(cmds, [ROOT, ROOT], timeout=300)
    err = "".join(se for _, _, se in results)
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert [rc for rc, _, _ in results] == [2, 2], err[-4000:]
    assert len(lines) == 1 and "no space left on the device writing" in lines[0] and "step_0000002" in lines[0], \
        err[-4000:]
    assert "Traceback" not in err, err[-4000:]
    assert "ZeRO stage 1, " in results[0][1]  # each rank writes its own optimizer state file
    ckpts = out / "checkpoints"
    assert not (ckpts / "step_0000002" / COMPLETE).exists() and not (ckpts / "latest").exists()
    assert [int(x["step"]) for x in _metrics(str(out))] == [1, 2]  # (log_every 1: the steps before the save)


@pytest.mark.slow
def test_a_resumed_run_counts_the_steps_without_a_masked_token_before_its_checkpoint(tmp_path):
    """The run's count of steps with no masked token (its warning says how many so far) is carried in the
    checkpoint, as the count of cut texts a row log_every left out is (test_train's contrastive resume): a resumed
    run restarted both at 0."""
    from .helpers import rewind_run

    ref, out = str(tmp_path / "ref"), str(tmp_path / "resumed")
    empty = ["max_steps=2", "save_every=1", "eval_every=0", "model.gradient_checkpointing=false", "max_seq_len=32",
             "batch_size=4", "micro_batch_size=2", "max_samples=100", "mntp.mask_prob=1e-9"]
    r = _train(ref, extra=empty)
    assert r.returncode == 0 and "step 2: no masked token" in r.stdout and "(2 such step(s) so far" in r.stdout, \
        r.stdout[-3000:] + r.stderr[-3000:]
    rewind_run(ref, out, 1)
    r = _train(out, extra=empty)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed from step_0000001: step 1" in r.stdout
    assert "step 2: no masked token in the whole global batch: no update, the schedule stays (2 such step(s) so far" \
        in r.stdout, r.stdout[-3000:]

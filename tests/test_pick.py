"""engine.pick: choose a finished run (e.g. an MNTP seed) by its held-out reading at the last step; refuse runs
whose readings do not compare. Run folders are written as the trainer writes them (config.yaml from the config,
metrics.csv rows); tests/test_train.py picks between two real runs."""
import csv
import json
import os

import pytest

from engine import pick as pk
from engine.checkpoint import fingerprint
from engine.config import load_config, to_dict

CFG = "configs/tiny/mntp.yaml"
COLS = ["step", "loss", "lr", "grad_norm", "tokens_per_s", "step_s", "truncated", "epoch", "nonfinite",
        "skipped_steps", "eval_loss", "eval_sts_spearman", "best_saved"]


def _run(root, name, evals, *overrides, adapter=True, eval_data=None, adapter_meta=None):
    """A run folder: config.yaml (``overrides`` on the tiny MNTP config), metrics.csv with an eval row at each
    {step: eval_loss} of ``evals`` and a training row at every step, and adapter/ whose engine_encoder.json
    records the last step and the run's fingerprint as write_adapter does (``adapter_meta``: other contents)."""
    out = os.path.join(root, name)
    os.makedirs(out)
    cfg = load_config(CFG, [f"output_dir={out}", *overrides] + ([f"eval_data={eval_data}"] if eval_data else []))
    import yaml

    with open(os.path.join(out, "config.yaml"), "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    with open(os.path.join(out, "metrics.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, COLS)
        w.writeheader()
        for step in range(1, cfg.max_steps + 1):
            row = {c: "" for c in COLS}
            row.update(step=step, loss=5.0 - 0.1 * step)
            if step in evals:
                row.update(eval_loss=evals[step], eval_sts_spearman=10 * evals[step])
            w.writerow(row)
    if adapter:
        os.makedirs(os.path.join(out, "adapter"))
        meta = {"step": cfg.max_steps, "fingerprint": fingerprint(cfg)} if adapter_meta is None else adapter_meta
        with open(os.path.join(out, "adapter", "engine_encoder.json"), "w") as f:
            json.dump(meta, f)
    return out


def test_picks_the_lowest_held_out_loss_at_the_last_step(tmp_path, capsys):
    a = _run(tmp_path, "s1", {6: 3.0, 12: 4.5}, "seed=1")  # best at step 6, but its adapter/ is step 12's
    b = _run(tmp_path, "s2", {6: 4.0, 12: 4.2}, "seed=2")
    c = _run(tmp_path, "s3", {6: 4.0, 12: float("nan")}, "seed=3")  # ended on NaN: left out, counted
    res = pk.pick([a, b, c])
    assert res["picked"] == {"path": b, "adapter": os.path.join(b, "adapter"), "eval_loss": 4.2}
    assert [r["path"] for r in res["runs"]] == [b, a] and res["left_out_non_finite"] == [c]
    assert res["settings_that_differ"] == ["seed"] and res["step"] == 12
    # dev Spearman (here 10x the loss): highest first; runs with another LR or corpus compare by it, not by the loss
    d = _run(tmp_path, "lr", {12: 4.0}, "seed=2", "learning_rate=0.005", "data=data/stsbenchmark/sts-test.csv")
    res = pk.pick([a, b, d], "eval_sts_spearman")
    assert res["picked"]["path"] == a and res["settings_that_differ"] == ["data", "learning_rate", "seed"]
    out = tmp_path / "pick.json"
    assert pk.main([a, b, c, "--json", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"picked: {b} (adapter: {b}/adapter)" in said and "1 run(s) left out, eval_loss not finite" in said
    assert said.index("4.2000  seed 2") < said.index("4.5000  seed 1")
    assert json.loads(out.read_text())["picked"]["path"] == b
    assert not [n for n in os.listdir(tmp_path) if n.startswith("pick.json.")]  # no temporary left beside it


def test_a_resumed_runs_later_rows_stand(tmp_path):
    a = _run(tmp_path, "a", {6: 4.0, 12: 4.0})
    with open(os.path.join(a, "metrics.csv"), "a", newline="") as f:  # resumed from step 6: steps 7-12 again
        w = csv.DictWriter(f, COLS)
        for step in range(7, 13):
            w.writerow({**{c: "" for c in COLS}, "step": step, "loss": 1.0, **({"eval_loss": 3.5} if step == 12 else {})})
    b = _run(tmp_path, "b", {12: 3.9}, "seed=7")
    assert pk.pick([a, b])["runs"][0] == {"path": a, "seed": 42, "eval_loss": 3.5}


@pytest.mark.parametrize("case,message", [
    ("no_config", "is not a run folder: no config.yaml"),
    ("unfinished", "no eval_loss at its last step 12 (its last is at step 6)"),
    ("no_adapter", "no adapter/ (the run did not finish)"),
    ("mask", "differ in mntp.mask_prob (0.4 against 0.2)"),
    ("lr_and_data", "differ in data, learning_rate, not only in seed: the held-out loss ranks seeds of one run"),
    ("eval_text", "were scored on different eval_data"),
    ("length", "ends at step 6 and"),
    ("all_nan", "no run has a finite eval_loss"),
    ("twice", "a run folder is named twice"),
    ("stale_adapter", "adapter/ holds step 6, not the run's last step 12: it was left by an earlier run"),
    ("other_adapter", "adapter/ was trained under other settings than config.yaml (learning_rate)"),
])
def test_runs_that_do_not_compare_are_one_line_and_exit_2(tmp_path, capsys, case, message):
    a = _run(tmp_path, "a", {6: 4.0, 12: 4.0})
    other = {
        "no_config": lambda: str(tmp_path),
        "unfinished": lambda: _run(tmp_path, "b", {6: 4.0}, "seed=2"),
        "no_adapter": lambda: _run(tmp_path, "b", {12: 4.0}, "seed=2", adapter=False),
        "mask": lambda: _run(tmp_path, "b", {12: 4.0}, "seed=2", "mntp.mask_prob=0.4"),
        "lr_and_data": lambda: _run(tmp_path, "b", {12: 4.0}, "seed=2", "learning_rate=0.005",
                                    "data=data/stsbenchmark/sts-test.csv"),
        "eval_text": lambda: _run(tmp_path, "b", {12: 4.0}, "seed=2", eval_data="data/stsbenchmark/sts-dev.csv"),
        "length": lambda: _run(tmp_path, "b", {6: 4.0}, "seed=2", "max_steps=6", "save_every=0"),
        "all_nan": lambda: _run(tmp_path, "b", {12: float("nan")}, "seed=2"),
        "twice": lambda: a,
        # a run started over in the folder (resume=force) that failed before writing its own adapter/
        "stale_adapter": lambda: _run(tmp_path, "b", {12: 4.0}, "seed=2", adapter_meta={"step": 6}),
        "other_adapter": lambda: _run(tmp_path, "b", {12: 4.0}, "seed=2", adapter_meta={
            "step": 12, "fingerprint": fingerprint(load_config(CFG, ["seed=2", "learning_rate=0.5"]))}),
    }[case]()
    if case == "all_nan":
        a = _run(tmp_path, "c", {12: float("inf")}, "seed=3")
    assert pk.main([a, other]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_an_adapter_that_records_no_step_is_taken_as_the_runs(tmp_path):
    """Adapters written before they recorded their step and fingerprint (2026-12-06) are read as before."""
    old = {"format": "llm2vec-engine/1"}
    a = _run(tmp_path, "a", {12: 4.0}, adapter_meta=old)
    b = _run(tmp_path, "b", {12: 3.0}, "seed=2", adapter_meta=old)
    assert pk.pick([a, b])["picked"]["path"] == b


def test_mntp_losses_of_two_definitions_are_not_ranked(tmp_path, capsys):
    """MNTP's eval_loss became the mean over every masked token on 2026-12-06 (a mean of batch means before): an
    adapter without a fingerprint predates it, and a run from each side is refused by eval_loss (the old one is
    named), not ranked; by dev Spearman, or within one definition, they are read. An explicit record wins."""
    from engine.stages.base import EVAL_LOSS_RULE

    new = _run(tmp_path, "new", {12: 4.0})
    old = _run(tmp_path, "old", {12: 3.0}, "seed=2", adapter_meta={"format": "llm2vec-engine/1"})
    for runs in ([new, old], [old, new]):
        assert pk.main(runs) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"hold two definitions of MNTP's eval_loss: {old} was trained before" in err[0], err
    assert pk.pick([new, old], by="eval_sts_spearman")["picked"]["path"] == new
    cfg = load_config(CFG, ["seed=3"])
    meta = {"step": 12, "fingerprint": fingerprint(cfg), "eval_loss_rule": EVAL_LOSS_RULE}
    same = _run(tmp_path, "same", {12: 3.5}, "seed=3", adapter_meta=meta)
    assert pk.pick([new, same])["picked"]["path"] == same
    old_record = _run(tmp_path, "rule1", {12: 3.0}, "seed=3", adapter_meta=dict(meta, eval_loss_rule=1))
    with pytest.raises(pk.PickError, match="two definitions"):
        pk.pick([same, old_record])
    # other stages' held-out loss was a mean of batch losses on both sides of the change
    sim = [_run(tmp_path / "sim", n, {12: v}, "stage=simcse", f"seed={s}", adapter_meta=m)
           for n, v, s, m in (("a", 2.0, 1, {"format": "llm2vec-engine/1"}), ("b", 1.0, 2, None))]
    assert pk.pick(sim)["picked"]["path"] == sim[1]


def test_held_out_files_compare_by_content_not_path(tmp_path):
    """Each work folder may hold its own copy of the held-out file: the same bytes are the same text."""
    src = "data/stsbenchmark/sts-test.csv"
    copy = tmp_path / "copy.csv"
    copy.write_bytes(open(src, "rb").read())
    a = _run(tmp_path, "a", {12: 4.0})
    b = _run(tmp_path, "b", {12: 3.0}, "seed=2", eval_data=str(copy))
    assert pk.pick([a, b])["picked"]["path"] == b


def test_the_command_line_and_unreadable_folders(tmp_path, capsys):
    import sys

    from .helpers import run_cmd

    r = run_cmd([sys.executable, "-m", "engine.pick", "--by", "loss", str(tmp_path)])
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "invalid choice: 'loss'" in lines[0]
    a = _run(tmp_path, "a", {12: 4.0})
    b = _run(tmp_path, "b", {12: 4.0}, "seed=2")
    with open(os.path.join(b, "config.yaml"), "a") as f:  # a config that would build an object: never loaded
        f.write("extra: !!python/object/apply:os.system ['true']\n")
    c = _run(tmp_path, "c", {12: 4.0}, "seed=3")
    text = open(os.path.join(c, "metrics.csv")).read().replace(",4.0,", ",four,")
    open(os.path.join(c, "metrics.csv"), "w").write(text)
    for other, message in ((b, "holds a tag that is not plain data"), (c, "eval_loss 'four' is not a number")):
        assert pk.main([a, other]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_a_json_that_cannot_be_written_is_said_before_picking(tmp_path, capsys):
    a = _run(tmp_path, "a", {12: 4.0})
    b = _run(tmp_path, "b", {12: 3.0}, "seed=2")
    for out, message in ((tmp_path / "nodir" / "x.json", "nodir does not exist"), (tmp_path / "a", "is a folder"),
                         ("", "an empty path"),  # a silent success with nothing written
                         ("/proc/llm2vec-pick.json", "cannot be written")):  # root passed os.access there
        assert pk.main([a, b, "--json", str(out)]) == 2
        said = capsys.readouterr()
        err = said.err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: --json") and message in err[0], err
        assert "picked" not in said.out  # nothing chosen and printed, then lost
    assert not os.path.exists(tmp_path / "nodir")


@pytest.mark.parametrize("damage,message", [
    (lambda text: b"\xff\xfe" + text, "metrics.csv does not read as a CSV file (UnicodeDecodeError"),
    (lambda text: text.replace(b"step,", b"stp,", 1), "metrics.csv has no step column"),
    (lambda text: text.replace(b"\n12,", b"\ntwelve,"), "metrics.csv step 'twelve': step 'twelve' is not a number"),
], ids=["not-utf8", "no-step-column", "step-not-a-number"])
def test_a_metrics_csv_that_does_not_read_is_one_line(tmp_path, capsys, damage, message):
    a = _run(tmp_path, "a", {12: 4.0})
    b = _run(tmp_path, "b", {12: 3.0}, "seed=2")
    path = os.path.join(b, "metrics.csv")
    with open(path, "rb") as f:
        text = f.read()
    with open(path, "wb") as f:
        f.write(damage(text))
    assert pk.main([a, b]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {b}: ") and message in err[0], err


# one other value per setting of engine.pick.MUST_MATCH (model.random_init: none, SmolLM2's own weights)
OTHER = {"stage": "stage=simcse", "model.name_or_path": "model.name_or_path=HuggingFaceTB/SmolLM2-360M",
         "model.gguf_file": "model.gguf_file=model.gguf", "model.tokenizer": "model.tokenizer=gpt2",
         "model.random_init": "model.random_init=null", "model.bidirectional": "model.bidirectional=false",
         "max_seq_len": "max_seq_len=32", "mntp.mask_prob": "mntp.mask_prob=0.4", "mntp.scheme": "mntp.scheme=all",
         "mntp.mask_token": "mntp.mask_token=eos", "mntp.pack": "mntp.pack=false", "eval_batches": "eval_batches=3",
         "micro_batch_size": "micro_batch_size=4", "eval_sts_pairs": "eval_sts_pairs=100"}


@pytest.mark.parametrize("key", sorted(OTHER))
def test_every_setting_a_reading_depends_on_is_refused_when_it_differs(tmp_path, capsys, key):
    """Each setting a held-out reading depends on, differing between two runs that otherwise differ in seed only, is
    one line naming it (the README lists them); a setting added to MUST_MATCH needs its case here."""
    assert set(pk.MUST_MATCH) <= set(OTHER)
    override = OTHER[key]
    a = _run(tmp_path, "a", {6: 4.0, 12: 4.0})
    b = _run(tmp_path, "b", {6: 4.0, 12: 3.0}, "seed=2", override)
    assert pk.main([a, b]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"differ in {key} (" in err[0], err


def test_contrastive_runs_must_match_in_their_own_text_length(tmp_path, capsys):
    """A contrastive stage's held-out reading depends on contrastive.max_len, not on max_seq_len (MNTP's): runs
    differing only in max_seq_len compare; runs differing in contrastive.max_len are refused, naming it."""
    a = _run(tmp_path, "a", {6: 4.0, 12: 4.0}, "stage=simcse")
    b = _run(tmp_path, "b", {6: 4.0, 12: 3.0}, "stage=simcse", "seed=2", "max_seq_len=32")
    assert pk.main([a, b, "--by", "eval_loss"]) == 0
    capsys.readouterr()
    c = _run(tmp_path, "c", {6: 4.0, 12: 3.0}, "stage=simcse", "seed=2", "contrastive.max_len=16")
    assert pk.main([a, c, "--by", "eval_loss"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "differ in contrastive.max_len (" in err[0], err


def test_dev_scores_over_two_pair_orders_are_not_ranked(tmp_path, capsys):
    """Dev Spearman took the STS file's first ``eval_sts_pairs`` pairs until 2026-12-07 and its genres in turn since
    (the adapter records the rule): on STS-B dev, sorted by genre, 500 pairs of each rule are other pairs, and a run
    of each side is refused (the old one named). Where both rules take the same pairs (eval_sts_pairs covering the
    file, or a file of one genre) they compare; a record that is not a name is refused as not the engine's."""
    from engine.data import EVAL_STS_ORDER, sts_genre_lines

    def runs(name, eval_data, *over):
        new = _run(tmp_path / name, "new", {12: 4.0}, *over, eval_data=eval_data)
        meta = json.load(open(os.path.join(new, "adapter", "engine_encoder.json")))
        with open(os.path.join(new, "adapter", "engine_encoder.json"), "w") as f:
            json.dump(dict(meta, eval_sts_order=EVAL_STS_ORDER), f)
        return new, _run(tmp_path / name, "old", {12: 3.0}, "seed=2", *over, eval_data=eval_data)

    dev = "data/stsbenchmark/sts-dev.csv"
    new, old = runs("mixed", dev)
    for order in ([new, old], [old, new]):
        assert pk.main([*order, "--by", "eval_sts_spearman"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{old} was trained before 2026-12-07 and took its first 500 pairs" in err[0], err
    assert pk.pick([new, old])["picked"]["path"] == old  # the held-out loss does not read the dev pairs
    new, old = runs("whole", dev, "eval_sts_pairs=1500")
    assert pk.pick([new, old], "eval_sts_spearman")["picked"]["path"] == new  # 40 > 30, on the same 1500 pairs
    one = tmp_path / "captions.csv"
    one.write_text("\n".join(sts_genre_lines(dev, ["main-captions"])) + "\n")
    new, old = runs("one-genre", str(one))
    assert pk.pick([new, old], "eval_sts_spearman")["picked"]["path"] == new
    with open(os.path.join(new, "adapter", "engine_encoder.json")) as f:
        meta = json.load(f)
    with open(os.path.join(new, "adapter", "engine_encoder.json"), "w") as f:
        json.dump(dict(meta, eval_sts_order=1), f)
    with pytest.raises(pk.PickError, match="records eval_sts_order 1, not a name"):
        pk.pick([new, old], "eval_sts_spearman")

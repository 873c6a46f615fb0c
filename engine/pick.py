"""Pick one of several finished runs of a stage by a held-out metric, e.g. the MNTP seed with the lowest eval loss.

    python -m engine.pick outputs/mntp-seed1 outputs/mntp-seed2 outputs/mntp-seed3 [--by eval_loss] [--json FILE]

MNTP's last adapter is what the next stage merges, and its quality downstream varies with the seed far more than
its training loss does: on SmolLM2-135M, five seeds of one MNTP run span 21 to 30 on STS-B's held-out news pairs.
The held-out MNTP loss (the eval loss on ``eval_data``, text that is never trained on) needs no labels. Read on the
same sentences for every seed, it marked the bad seed of three (highest loss, worst encoder) but did not order the
two good ones, on two corpora, nor did dev Spearman on the training genres
(benchmarks/results/quality-smollm2-135m-general/mntp-lr-mask/, ``heldout/`` and ``seed-dev/``). So
keeping the lowest of a few seeds drops a bad one; it does not find the best. ``--by eval_sts_spearman`` picks by
dev Spearman where labelled dev pairs of the training distribution exist.

Each RUN is a run folder (``output_dir``): its ``config.yaml``, ``metrics.csv`` and ``adapter/``. A run's reading
is ``--by`` at its last step, which must be ``max_steps`` and logged (``eval_every`` dividing ``max_steps``), since
``adapter/`` is that step's: an ``adapter/`` that records another step or other settings (one an earlier run left
in the folder) is refused. ``eval_loss`` is lowest-best; ``eval_sts_spearman`` (dev Spearman) is highest-best.

By ``eval_loss`` the runs may differ in seed only. A lower held-out loss did not mean a better encoder across
training corpora (SNLI's short sentences beside WikiText-2 lowered it by 0.19 on two seeds, and the news score did
not rise) nor across learning rates (``configs/smollm2-135m/general-mntp.yaml``). By ``eval_sts_spearman`` other
settings may differ too. Either way the runs must share the stage, model, tokenizer, sequence length, masking
(MNTP), eval batches and held-out text (the same ``eval_data`` sources; local files are compared by content and,
like the run read them, from the current folder when relative), and end at the same step. The settings that differ
are listed. A run whose reading is not finite is left out and counted, as a run that ended on NaN has no adapter
worth handing on. Runs trained before engine.stages.base.EVAL_SEED (commit 122fef8) read an STS-style eval file in
their own seed's order, each on another sample: their losses do not compare, and nothing in the folder says so.
MNTP runs trained before 2026-12-06 logged another definition of eval_loss (a mean of batch means; their adapter
records no fingerprint): by eval_loss they are refused beside newer runs (engine.stages.base.EVAL_LOSS_RULE).
Runs trained before 2026-12-07 scored dev Spearman on the STS file's first ``eval_sts_pairs`` pairs, newer ones on
pairs taken genre by genre in turn (engine.data.EVAL_STS_ORDER, which the adapter records): by eval_sts_spearman
they are refused beside each other unless the two rules take the same pairs of that file.

Prints one line per run, best first, and the chosen run's adapter. ``--json FILE`` also writes the readings and
the choice (atomically). A missing or unreadable run (a metrics.csv that is not UTF-8 CSV or has no ``step``
column, an adapter/engine_encoder.json that is not the record the engine writes), incomparable runs, no finite
reading, or a ``--json`` that cannot be written (checked before picking): one line, exit 2.
"""
import csv
import hashlib
import json
import math
import os
import sys

from .checkpoint import _PATH_KEYS, fingerprint, fingerprint_diff
from .cli import ArgumentParser, fail, unwritable
from .config import ConfigError, load_config
from .data import EVAL_STS_ORDER, DataError, sts_eval_pairs_are_the_first
from .files import write_json

# metric: True when lower is better
METRICS = {"eval_loss": True, "eval_sts_spearman": False}
# settings that change what a held-out reading means: they must be equal across the runs compared
MUST_MATCH = ("stage", "model.name_or_path", "model.gguf_file", "model.tokenizer", "model.random_init",
              "model.bidirectional", "max_seq_len", "mntp.mask_prob", "mntp.scheme", "mntp.mask_token", "mntp.pack",
              "eval_batches", "micro_batch_size", "eval_sts_pairs")


FIRST_PAIRS = "the file's first"  # the dev pairs of an adapter that records no eval_sts_order (before 2026-12-07)


class PickError(ValueError):
    pass


def _get(cfg, dotted):
    v = cfg
    for part in dotted.split("."):
        v = getattr(v, part)
    return v


def _source_id(src):
    """A held-out source's identity: hf: specs as written, local files by their SHA-256."""
    if src.startswith("hf:"):
        return src
    if not os.path.isfile(src):
        raise PickError(f"eval_data {src} is not there to compare")
    h = hashlib.sha256()
    with open(src, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def read_run(path, by):
    """{path, cfg, step, value, adapter} of one run folder; PickError when it cannot be read as a finished run."""
    cfg_path, metrics_path = os.path.join(path, "config.yaml"), os.path.join(path, "metrics.csv")
    for p in (cfg_path, metrics_path):
        if not os.path.isfile(p):
            raise PickError(f"{path} is not a run folder: no {os.path.basename(p)}")
    try:
        cfg = load_config(cfg_path)
    except ConfigError as e:
        raise PickError(f"{path}: {e}") from None
    try:
        last = _readings(metrics_path, by)
    except PickError as e:
        raise PickError(f"{path}: {e}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:  # unreadable, not UTF-8, a malformed CSV
        raise PickError(f"{path}: metrics.csv does not read as a CSV file ({type(e).__name__}: {e})") from None
    if cfg.max_steps not in last:
        got = f"its last is at step {max(last)}" if last else "none was logged"
        raise PickError(f"{path}: no {by} at its last step {cfg.max_steps} ({got}): the run is unfinished, or "
                        f"eval_every does not divide max_steps")
    adapter = os.path.join(path, "adapter")
    if not os.path.isdir(adapter):
        raise PickError(f"{path}: no adapter/ (the run did not finish)")
    rule, order = _check_adapter_is_the_runs(path, adapter, cfg)
    return {"path": path, "cfg": cfg, "step": cfg.max_steps, "value": last[cfg.max_steps], "adapter": adapter,
            "eval_loss_rule": rule, "eval_sts_order": order}


def _check_adapter_is_the_runs(path, adapter, cfg):
    """PickError unless ``adapter/`` holds this run's weights at max_steps: a run started over in the folder
    (resume=force) with more steps or other settings keeps the earlier run's adapter/ until its own last step
    writes one, so a run that failed at its end (a full disk at the final checkpoint) left the old adapter beside
    the new config and log. The adapter records its step and the run's fingerprint (adapters written before
    2026-12-06 record neither and are taken as the run's). Returns the definition of the run's ``eval_loss``
    (engine.stages.base.EVAL_LOSS_RULE) and the order its dev pairs were taken in (EVAL_STS_ORDER, or
    :data:`FIRST_PAIRS`), as the adapter records them or, for adapters that predate the record, implies."""
    try:
        with open(os.path.join(adapter, "engine_encoder.json"), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise PickError(f"{path}: adapter/engine_encoder.json does not read ({type(e).__name__}: {e})") from None
    what = None
    if not isinstance(meta, dict):
        what = "is not a JSON object"
    elif "step" in meta and (isinstance(meta["step"], bool) or not isinstance(meta["step"], int)):
        what = f"records step {meta['step']!r}, not a whole number"
    elif "fingerprint" in meta and not isinstance(meta["fingerprint"], dict):
        what = "records a fingerprint that is not a JSON object"
    elif "eval_loss_rule" in meta and (isinstance(meta["eval_loss_rule"], bool)
                                       or not isinstance(meta["eval_loss_rule"], int)):
        what = f"records eval_loss_rule {meta['eval_loss_rule']!r}, not a whole number"
    elif "eval_sts_order" in meta and not isinstance(meta["eval_sts_order"], str):
        what = f"records eval_sts_order {meta['eval_sts_order']!r}, not a name"
    if what:  # damaged or hand-edited: not the record write_adapter keeps, so not known to be this run's
        raise PickError(f"{path}: adapter/engine_encoder.json {what}: it is not the record the engine writes, so "
                        f"adapter/ cannot be checked against the run")
    if "step" in meta and meta["step"] != cfg.max_steps:
        raise PickError(f"{path}: adapter/ holds step {meta['step']}, not the run's last step {cfg.max_steps}: it was "
                        f"left by an earlier run in this folder (this run did not write its own)")
    if "fingerprint" in meta:  # local paths left out: config.yaml may name them relative to another folder
        diff = [k for k, _, _ in fingerprint_diff(meta["fingerprint"], fingerprint(cfg)) if k not in _PATH_KEYS]
        if diff:
            raise PickError(f"{path}: adapter/ was trained under other settings than config.yaml ({', '.join(diff)}): "
                            f"it was left by an earlier run in this folder")
    # no record: written before the rule was (2 once adapters recorded their fingerprint, 8c2120c; 1 before)
    return meta.get("eval_loss_rule", 2 if "fingerprint" in meta else 1), meta.get("eval_sts_order", FIRST_PAIRS)


def _readings(metrics_path, by):
    """{step: reading} of ``by`` in a metrics.csv; PickError when a column is missing or a value is no number."""
    with open(metrics_path, newline="", encoding="utf-8") as f:
        rows = csv.DictReader(f)
        for column, why in (("step", "not a metrics.csv the engine wrote"),
                            (by, "was eval_data set, and eval_every?")):
            if column not in (rows.fieldnames or []):
                raise PickError(f"metrics.csv has no {column} column ({why})")
        last = {}
        for row in rows:  # a resumed run repeats steps after its checkpoint: the later row stands
            if row.get(by):
                last[_number(row, "step", int)] = _number(row, by, float)
    return last


def _number(row, column, kind):
    try:
        return kind(row[column])
    except (TypeError, ValueError):  # TypeError: a short row's missing value (None)
        raise PickError(f"metrics.csv step {row.get('step')!r}: {column} {row[column]!r} is not a number") from None


def check_comparable(runs, by="eval_loss"):
    """The settings that differ between the runs; PickError if a must-match setting differs, or, by the held-out
    loss, anything but the seed."""
    first = runs[0]
    # the text length that acts on the stage: MNTP's max_seq_len, a contrastive stage's contrastive.max_len
    keys = MUST_MATCH if first["cfg"].stage == "mntp" else tuple(
        "contrastive.max_len" if k == "max_seq_len" else k for k in MUST_MATCH)
    ref = {k: _get(first["cfg"], k) for k in keys}
    ref_eval = [_source_id(s) for s in first["cfg"].eval_data]
    for r in runs[1:]:
        for k in keys:
            if json.dumps(_get(r["cfg"], k), sort_keys=True) != json.dumps(ref[k], sort_keys=True):
                raise PickError(f"{r['path']} and {first['path']} differ in {k} ({_get(r['cfg'], k)!r} against "
                                f"{ref[k]!r}): their held-out readings do not compare")
        if [_source_id(s) for s in r["cfg"].eval_data] != ref_eval:
            raise PickError(f"{r['path']} and {first['path']} were scored on different eval_data: their held-out "
                            f"readings do not compare")
        if by == "eval_loss" and first["cfg"].stage == "mntp" and r["eval_loss_rule"] != first["eval_loss_rule"]:
            old = r if r["eval_loss_rule"] < first["eval_loss_rule"] else first
            raise PickError(f"{r['path']} and {first['path']} hold two definitions of MNTP's eval_loss: {old['path']} "
                            f"was trained before 2026-12-06, when it became the mean over every masked token, so "
                            f"their losses do not compare (retrain it, or compare with --by eval_sts_spearman)")
        if by == "eval_sts_spearman" and r["eval_sts_order"] != first["eval_sts_order"]:
            _check_same_dev_pairs(first, r)
        if r["step"] != first["step"]:
            raise PickError(f"{r['path']} ends at step {r['step']} and {first['path']} at {first['step']}: "
                            f"compare runs of the same length")
    fp = fingerprint(first["cfg"])
    differ = set()
    for r in runs[1:]:
        keys = {k for k, _, _ in fingerprint_diff(fp, fingerprint(r["cfg"]))}
        if by == "eval_loss" and keys - {"seed"}:
            raise PickError(f"{r['path']} and {first['path']} differ in {', '.join(sorted(keys - {'seed'}))}, not only "
                            f"in seed: the held-out loss ranks seeds of one run, not runs of other data or settings "
                            f"(compare those with --by eval_sts_spearman)")
        differ |= keys
    return sorted(differ)


def _check_same_dev_pairs(a, b):
    """PickError unless runs whose dev Spearman took its pairs by two rules took the same pairs of the file."""
    path, n = a["cfg"].eval_data[0], a["cfg"].eval_sts_pairs
    old = a if a["eval_sts_order"] != EVAL_STS_ORDER else b
    try:
        if sts_eval_pairs_are_the_first(path, n):
            return
    except (OSError, DataError) as e:
        raise PickError(f"eval_data {path} does not read as an STS file ({e}): the dev scores of {a['path']} and "
                        f"{b['path']} cannot be compared") from None
    raise PickError(f"{a['path']} and {b['path']} scored dev Spearman on other pairs of {path}: {old['path']} was "
                    f"trained before 2026-12-07 and took its first {n} pairs, the newer run {n} pairs of its genres in "
                    f"turn, so their dev scores do not compare (retrain it to compare them)")


def pick(paths, by="eval_loss"):
    """The readings of the runs at ``paths`` and the best by ``by``: a dict for printing and for --json."""
    if by not in METRICS:
        raise PickError(f"--by must be one of {', '.join(METRICS)}")
    if len(set(map(os.path.realpath, paths))) != len(paths):
        raise PickError("a run folder is named twice")
    runs = [read_run(p, by) for p in paths]
    differ = check_comparable(runs, by)
    finite = [r for r in runs if math.isfinite(r["value"])]
    left_out = [r["path"] for r in runs if not math.isfinite(r["value"])]
    if not finite:
        raise PickError(f"no run has a finite {by} at its last step")
    lower = METRICS[by]
    ranked = sorted(finite, key=lambda r: r["value"] if lower else -r["value"])  # stable: ties keep the given order
    best = ranked[0]
    return {
        "by": by, "lower_is_better": lower, "step": best["step"],
        "runs": [{"path": r["path"], "seed": r["cfg"].seed, by: r["value"]} for r in ranked],
        "left_out_non_finite": left_out,
        "settings_that_differ": differ,
        "picked": {"path": best["path"], "adapter": best["adapter"], by: best["value"]},
    }


def main(argv=None):
    ap = ArgumentParser(prog="python -m engine.pick", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders (output_dir) of finished runs of one stage")
    ap.add_argument("--by", default="eval_loss", choices=sorted(METRICS))
    ap.add_argument("--json", help="also write the readings and the choice to this JSON file")
    args = ap.parse_args(argv)
    if args.json is not None and unwritable(args.json):  # said now, not after the choice is made and printed
        return fail(f"--json {unwritable(args.json)}")
    try:
        res = pick(args.runs, args.by)
    except PickError as e:
        return fail(e)
    by = res["by"]
    print(f"{len(res['runs'])} runs by {by} at step {res['step']} ({'lowest' if res['lower_is_better'] else 'highest'}"
          f" first); settings that differ: {', '.join(res['settings_that_differ']) or 'none'}")
    for r in res["runs"]:
        print(f"  {r[by]:.4f}  seed {r['seed']}  {r['path']}")
    if res["left_out_non_finite"]:
        print(f"{len(res['left_out_non_finite'])} run(s) left out, {by} not finite: "
              + ", ".join(res["left_out_non_finite"]))
    print(f"picked: {res['picked']['path']} (adapter: {res['picked']['adapter']})")
    if args.json is not None:
        try:
            write_json(args.json, res)
        except OSError as e:  # a full disk, or the folder gone since the check
            return fail(f"--json {args.json}: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Reproduce the STS-B quality table for LLM2Vec-SmolLM2-135M on CPU or GPU.

    python benchmarks/quality_smollm2.py --nproc 2 --out benchmarks/results/quality-smollm2-135m

Rows (STS Benchmark test, cosine Spearman x 100, mean pooling):
  (a) the causal base model;  (b) bidirectional, untrained;  (c) after MNTP;
  (d) MNTP + SimCSE on the sentences of STS-B train (scores unused);
  (e) MNTP + supervised InfoNCE on STS-B train pairs (score >= 4 positives, low-score hard negatives);
  (f) MNTP + a graded-score loss (AnglE by default, configs/smollm2-135m/graded.yaml) on every STS-B train pair.
The general recipe (``--rows aghijk``; not in the default rows) trains on no STS-B text up to its last step:
  (g) MNTP on general-domain sentences (data/wikitext2-sentences, configs/smollm2-135m/general-mntp.yaml);
  (h) (g) + SimCSE on the same sentences (configs/smollm2-135m/general-simcse.yaml);
  (i) (h) + the graded loss of (f) on STS-B train (the optional last step of the general recipe);
  (j) (h) + supervised InfoNCE on NLI triplets (data/snli-triplets, configs/smollm2-135m/general-supervised.yaml);
  (k) (j) + the graded loss of (f) on STS-B train (the whole general recipe, then its optional last step).
(g), (h) and (j) are trained once and hand on their last adapters (no STS-B selection: their STS-B dev curves
are logged, not used); each protocol scores them on its own test set. (i) and (k) are trained per protocol like
(f).
Training uses the committed configs configs/smollm2-135m/{mntp,simcse,supervised,graded}.yaml. Each stage
evaluates on STS-B dev every ``eval_every`` steps. Dev is interleaved genre by genre (:func:`interleave_genres`),
so the first ``eval_sts_pairs`` pairs that the selection scores hold every genre, not only the captions that open
``sts-dev.csv``. The contrastive stages keep their best adapter by dev Spearman (``best/``) and the table reports
that one. MNTP hands on its last adapter, chosen for the held-out MNTP loss (the loss on the dev sentences),
which was lowest at the last evaluation in every committed table, though not falling at every evaluation; the
script records whether it was (``lowest_at_last``) and the README says where it was not: MNTP's
dev Spearman moves non-monotonically while its loss falls (24 / 44 / 35 / 55 at steps 50-200 in the 2026-11-30
table), so picking by it picks a point on a path MNTP does not optimise; (c)-(f) all use that adapter. ``--set`` overrides apply to every stage,
``--stage-set STAGE:key=value`` to one (e.g. ``--stage-set mntp:max_steps=300``). ``--test-limit N`` scores
only the first N test pairs (rehearsals: the README then says so). Writes results.json, README.md and each
stage's metrics.csv and best-adapter record into --out; README.md's sections written by hand (from its first
``## `` heading on) are kept. results.json records the command as it was run, the metrics files this run wrote
(``metrics_files``), each row that failed (``failed``: a training or evaluation command that did not succeed, and
the rows built on it; the other rows go on, and the script exits 1 at the end) and whether the table is whole
(``complete``). A --work that an earlier run used is refused: its stages would resume their finished
checkpoints rather than train. Every evaluation keeps each pair's cosine in
``--work/scores/``, and each row's difference to the causal model (a) gets a 95% paired bootstrap interval over
the test pairs (``vs_causal`` in results.json, and a table in the README): how far the pairs alone could move it.

Held-out protocol (``--holdout-genre forums|news|captions``, default news; ``none`` skips it): beside the
in-domain table, every row is trained
again on the other two STS-B genres only (train split), selected on the dev pairs of those genres only
(interleaved genre by genre, so the first ``eval_sts_pairs`` cover both), and scored on the test pairs of the
held-out genre. The README then shows both columns for every row, each against the causal model's figure on the
same test set; results.json keeps the in-domain rows under ``rows`` and the held-out ones under ``holdout``.
"""
import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.common import cli_error, git_commit, parser  # noqa: E402
from engine.files import write_json, write_text  # noqa: E402

GENERAL = os.path.join(ROOT, "data", "wikitext2-sentences", "sentences.txt")  # the general recipe's corpus
GENERAL_PAIRS = os.path.join(ROOT, "data", "snli-triplets", "triplets.jsonl")  # and its supervised rows
STS = os.path.join(ROOT, "data", "stsbenchmark")  # shipped with the repo (see data/stsbenchmark/LICENSE.txt)
GENRES = ("captions", "forums", "news")  # STS-B's three genres (engine.data.sts_genre)
STAGES = {"d": "simcse", "e": "supervised", "f": "graded"}
CONFIGS = ("mntp", "simcse", "supervised", "graded", "general-mntp", "general-simcse",
           "general-supervised")  # configs/smollm2-135m/
GENERAL_STAGES = {"g": "general-mntp", "h": "general-simcse", "j": "general-supervised"}  # trained once, no STS-B
STAGE_OF = {"c": "mntp", **STAGES, **GENERAL_STAGES, "i": "general-graded", "k": "general-nli-graded"}
NAMES = {"a": "(a) causal SmolLM2-135M-Instruct, mean pooling", "b": "(b) bidirectional, untrained",
         "c": "(c) + MNTP", "d": "(d) + MNTP + SimCSE (STS-B train sentences, no scores)",
         "e": "(e) + MNTP + supervised InfoNCE (STS-B train pairs >= 4, hard negatives)",
         "f": "(f) + MNTP + graded loss (every STS-B train pair with its score)",
         "g": "(g) general MNTP (WikiText-2 sentences, no STS-B)",
         "h": "(h) general MNTP + SimCSE (WikiText-2 sentences, no STS-B)",
         "i": "(i) (h) + graded loss on STS-B train",
         "j": "(j) (h) + supervised InfoNCE (SNLI triplets, no STS-B)",
         "k": "(k) (j) + graded loss on STS-B train"}


class RowFailed(Exception):
    """A training or evaluation command of one row failed (not bad input): the row is recorded as failed and the
    rows that do not need it go on."""


def fresh_work(work, flag="--work"):
    """``work``/log.txt, the run's log, once ``work`` is this run's: refused (one line, exit 2) when an earlier run
    used it (its ``log.txt``): every stage there ends with a checkpoint at its last step, which the trainer's
    ``resume=auto`` would take as a finished run, so the rows would be the old adapters scored again, not trained.
    The log is created here, so a second run into ``work`` is refused too."""
    log = os.path.join(work, "log.txt")
    if os.path.isfile(log):
        cli_error(f"{flag} {work} holds an earlier run (its log.txt): its stages would resume their finished "
                  f"checkpoints instead of training; give a new {flag} or remove that one")
    os.makedirs(work, exist_ok=True)
    with open(log, "a"):
        pass
    return log


def sh(cmd, log):
    t0 = time.time()
    print("+", " ".join(cmd), flush=True)
    with open(log, "a") as f:
        f.write("+ " + " ".join(cmd) + "\n")
        f.flush()
        start = f.tell()
        r = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode == 2:  # the command refused its input (an override, a path): its one line, and exit 2
        with open(log, errors="replace") as f:
            f.seek(start)
            said = [ln.strip() for ln in f if ln.startswith(("error:", "config error:"))]
        if said:
            line = said[-1][len("error: "):] if said[-1].startswith("error: ") else said[-1]
            cli_error(f"{line} (log: {log})")
    if r.returncode != 0:
        raise RowFailed(f"command failed ({r.returncode}); see {log}")
    return time.time() - t0


def evaluate(model, test, log, causal=False, scores=None, extra=()):
    """engine.evaluate's JSON for ``model`` on ``test``; ``scores``: also keep each pair's cosine in that file;
    ``extra``: more of its options (e.g. ``--bootstrap N``, ``--compare FILE``)."""
    cmd = [sys.executable, "-m", "engine.evaluate", "--model", model, "--task", "sts", "--data", test]
    if causal:
        cmd.append("--causal")
    if scores:
        os.makedirs(os.path.dirname(scores), exist_ok=True)
        cmd += ["--scores", scores]
    cmd += list(extra)
    t0 = time.time()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    with open(log, "a") as f:
        f.write("+ " + " ".join(cmd) + "\n" + out.stderr[-2000:] + out.stdout)
    if out.returncode != 0:
        said = [ln for ln in out.stderr.splitlines() if ln.strip()]
        raise RowFailed(f"evaluation failed ({out.returncode}): {said[-1] if said else 'no output'}; see {log}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["eval_seconds"] = round(time.time() - t0, 1)
    return res


N_BOOT = 2000  # resamples of the test pairs for each row's interval against the causal model


def vs_causal(row_scores, causal_scores, test, row, causal):
    """Row minus the causal model (a) on the same test pairs, with its 95% paired bootstrap interval over the pairs
    (engine.stats.paired_bootstrap), from the two evaluations' --scores files. Refuses files whose difference is
    not the two figures' difference: they would not be the table's models."""
    from engine.data import read_sts
    from engine.evaluate import read_scores
    from engine.stats import paired_bootstrap

    pairs = read_sts(test)
    gold = [p[2] for p in pairs]
    res = paired_bootstrap(read_scores(row_scores, pairs), read_scores(causal_scores, pairs), gold, n_boot=N_BOOT)
    if abs(res["difference"] - (row["spearman"] - causal["spearman"])) > 1e-6:
        raise SystemExit(f"{row_scores}: its pairs give {res['difference']:+.4f} against the causal model, the table's "
                         f"figures {row['spearman'] - causal['spearman']:+.4f}: not the same evaluations")
    return {k: res[k] for k in ("difference", "ci", "share_at_or_below_0", "level", "n_boot", "undefined")}


def selected(run_dir):
    """The adapter a stage hands on: best/ (by dev Spearman) when the run kept one, else the last adapter."""
    best = os.path.join(run_dir, "best")
    if os.path.isfile(os.path.join(best, "engine_best.json")):
        with open(os.path.join(best, "engine_best.json")) as f:
            return best, json.load(f)
    return os.path.join(run_dir, "adapter"), None


def budget(run_dir):
    with open(os.path.join(run_dir, "config.yaml")) as f:
        c = yaml.safe_load(f)
    return {k: c[k] for k in ("max_steps", "batch_size", "micro_batch_size", "learning_rate", "lr_schedule",
                              "eval_every", "eval_sts_pairs", "max_seq_len")} | {
        "loss": c["contrastive"]["loss"] if c["stage"] != "mntp" else "mntp",
        "temperature": c["contrastive"]["temperature"] if c["stage"] != "mntp" else None}


def _write(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)
    return path


def interleave_genres(lines):
    """STS TSV lines reordered genre by genre in turn (each genre's lines keep their order), so that the first N
    lines of a dev file (``eval_sts_pairs``) hold every genre rather than the file's first one only. The trainer's
    dev score takes its pairs by the same rule (``engine.data.sts_eval_pairs``), so an interleaved file scores the
    same pairs as the file it came from; the table's runs before that rule relied on this copy."""
    from engine.data import in_turn, sts_genre

    return in_turn(lines, lambda line: sts_genre(line.split("\t", 1)[0]))


def interleaved_dev(dev, work):
    """``work``/sts-dev-interleaved.csv: the STS file ``dev`` reordered by :func:`interleave_genres`; its path."""
    with open(dev) as f:
        lines = [line.rstrip("\n") for line in f if line.strip()]
    return _write(os.path.join(work, "sts-dev-interleaved.csv"), interleave_genres(lines))


def mntp_selection(run_dir):
    """MNTP's hand-on adapter, the last one (``adapter/``), with the held-out MNTP loss curve it was chosen by:
    {"adapter", "step", "eval_loss", "lowest_at_last", "curve"}."""
    import csv

    with open(os.path.join(run_dir, "metrics.csv")) as f:
        curve = [(int(r["step"]), float(r["eval_loss"])) for r in csv.DictReader(f) if r.get("eval_loss")]
    sel = {"adapter": "adapter", "selected_by": "last step (lowest_at_last: whether its held-out MNTP loss was "
                                                "the lowest of the curve)", "curve": curve}
    if curve:
        sel.update(step=curve[-1][0], eval_loss=curve[-1][1], lowest_at_last=min(curve, key=lambda x: x[1]) == curve[-1])
    return os.path.join(run_dir, "adapter"), sel


def mntp_loss_note(selected):
    """How the README describes the MNTP adapters handed on (``selected``: {label: a stage's selection}): the last
    ones, and whether each one's held-out MNTP loss was the lowest of its curve (``lowest_at_last``), naming those
    where it was not; "" when no MNTP stage ran."""
    sels = {k: sel for k, sel in selected.items() if "lowest_at_last" in sel}
    if not sels:
        return ""
    not_lowest = sorted(k for k, sel in sels.items() if not sel["lowest_at_last"])
    if not not_lowest:
        return ", whose held-out MNTP loss (dev sentences) was the lowest of its curve"
    return (f", though its held-out MNTP loss (dev sentences) was not the lowest of its curve for "
            f"{', '.join(not_lowest)} (see `lowest_at_last` in results.json)")


def holdout_files(genre, train, dev, test, work):
    """{train, dev, test}: STS TSVs in ``work`` for the held-out protocol: train and dev without ``genre`` (dev
    interleaved, :func:`interleave_genres`), test with ``genre`` only."""
    from engine.data import sts_genre_lines

    others = [g for g in GENRES if g != genre]
    os.makedirs(work, exist_ok=True)
    return {"train": _write(os.path.join(work, "sts-train.csv"), sts_genre_lines(train, others)),
            "dev": _write(os.path.join(work, "sts-dev.csv"), interleave_genres(sts_genre_lines(dev, others))),
            "test": _write(os.path.join(work, "sts-test.csv"), sts_genre_lines(test, [genre]))}


def hand_written(readme):
    """What a README.md in --out holds from its first ``## `` heading on: sections written by hand (readings of the
    table), which the script's own table never has; kept when the table is rewritten. "" when there are none."""
    if not os.path.isfile(readme):
        return ""
    with open(readme, encoding="utf-8") as f:
        lines = f.read().splitlines()
    at = next((i for i, line in enumerate(lines) if line.startswith("## ")), None)
    return "" if at is None else "\n".join(lines[at:]) + "\n"


def ci_lines(rows, held_rows, genre):
    """The README's table of each row's difference to the causal model with its 95% paired interval."""
    keys = [k for k in NAMES if "vs_causal" in rows.get(k, {}) or (held_rows and "vs_causal" in held_rows.get(k, {}))]
    if not keys:
        return []

    def ci(r):
        if "vs_causal" not in r:
            return "-"
        v = r["vs_causal"]
        return f"{v['difference']:+.2f} [{v['ci'][0]:+.2f}, {v['ci'][1]:+.2f}]"

    lines = ["", "Difference to the causal model (a) on the same test pairs, with its 95% paired bootstrap interval "
             f"over those pairs ({N_BOOT} resamples, `engine.stats`). It covers the pairs' sampling only: a second "
             "training run of the same row moves its figure too (seeds, float sums), which needs several runs.", ""]
    if held_rows is not None:
        lines += [f"| model | in-domain, difference [95%] | held-out {genre}, difference [95%] |", "| --- | ---: | ---: |"]
        lines += [f"| {NAMES[k]} | {ci(rows.get(k, {}))} | {ci(held_rows.get(k, {}))} |" for k in keys]
    else:
        lines += ["| model | difference [95%] |", "| --- | ---: |"]
        lines += [f"| {NAMES[k]} | {ci(rows.get(k, {}))} |" for k in keys]
    return lines


def main(argv=None):
    ap = parser(__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2, help="ranks for deepspeed (GPUs, or CPU processes)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "quality-smollm2-135m"))
    ap.add_argument("--work", default=os.path.join(ROOT, "outputs", "quality-smollm2"))
    ap.add_argument("--test", default=os.path.join(STS, "sts-test.csv"))
    ap.add_argument("--train", default=os.path.join(STS, "sts-train.csv"))
    ap.add_argument("--dev", default=os.path.join(STS, "sts-dev.csv"))
    ap.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every stage")
    ap.add_argument("--stage-set", nargs="*", default=[], metavar="STAGE:key=value",
                    help="overrides for one stage's config: " + ", ".join(CONFIGS))
    ap.add_argument("--rows", default="abcdef", help="rows to run: abcdef (default, the STS-B recipe), ghijk (the "
                    "general recipe), any mix")
    ap.add_argument("--test-limit", type=int, default=0, help="score only the first N test pairs (rehearsal)")
    ap.add_argument("--label", default="", help="a line for the README (e.g. the budget's purpose)")
    ap.add_argument("--holdout-genre", choices=GENRES + ("none",), default="news",
                    help="also train every row without this STS-B genre and score its test pairs (held-out column); "
                         "none: the in-domain column only")
    args = ap.parse_args(argv)
    if not args.rows or set(args.rows) - set(NAMES):
        ap.error(f"--rows {args.rows!r}: expected letters from {''.join(NAMES)}")
    per_stage = {}
    for item in args.stage_set:
        stage, _, kv = item.partition(":")
        if stage not in CONFIGS or "=" not in kv:
            ap.error(f"--stage-set {item!r}: expected STAGE:key=value with STAGE in {', '.join(CONFIGS)}")
        per_stage.setdefault(stage, []).append(kv)
    from engine.data import DataError, check_sources

    try:  # a mistyped path in one line now, not a traceback once the first files are written
        check_sources([args.train, args.dev, args.test], e5_folders=False)
    except DataError as e:
        cli_error(e)
    for flag in ("--out", "--work"):
        path = getattr(args, flag[2:])
        if os.path.exists(path) and not os.path.isdir(path):
            cli_error(f"{flag} {path} is a file, not a folder")
    log = fresh_work(args.work)
    os.makedirs(args.out, exist_ok=True)
    cmdline = "python benchmarks/quality_smollm2.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.holdout_genre == "none":
        args.holdout_genre = None
    dev = interleaved_dev(args.dev, args.work)
    protocols = {"in-domain": {"train": args.train, "dev": dev, "test": args.test}}
    if args.holdout_genre:
        protocols[f"holdout-{args.holdout_genre}"] = holdout_files(
            args.holdout_genre, args.train, args.dev, args.test, os.path.join(args.work, f"holdout-{args.holdout_genre}"))
    if args.test_limit:
        for name, files in protocols.items():
            files["test"] = _write(os.path.join(args.work, f"{name}-test-first{args.test_limit}.csv"),
                                   [line.rstrip("\n") for line in open(files["test"]) if line.strip()][:args.test_limit])
    t_all = time.time()
    commit = git_commit()
    results = {name: {"rows": {}, "timings": {}, "budgets": {}, "selected": {}, "failed": {}} for name in protocols}
    general = {"timings": {}, "budgets": {}, "selected": {}, "failed": {}}  # the stages (g), (h), (j), trained once
    written = []  # the metrics files this run copied into --out (an earlier run's may sit beside them)
    ds = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.nproc)]

    def train(stage, out, files, res, prefix, extra=(), config=None):
        """Run one stage (``config``: its file's name in configs/smollm2-135m, default ``stage``). The general
        stages keep their config's corpus (``files["train"]`` is None) and hand on their last adapter."""
        from engine.distributed import free_port

        port = free_port()  # not the launcher's default 29500, which another run on the machine may hold
        config = config or stage
        data = [f"data={files['train']}"] if files["train"] else []
        cmd = ds + ["--master_port", str(port), "engine/train.py", "--config", f"configs/smollm2-135m/{config}.yaml",
                    *data, f"eval_data={files['dev']}", f"output_dir={out}", "progress_bar=false",
                    *extra, *args.set, *per_stage.get(config, [])]
        res["timings"][f"{stage}_train_s"] = round(sh(cmd, log), 1)
        res["budgets"][stage] = budget(out)
        if stage in ("mntp", "general-mntp"):
            path, meta = mntp_selection(out)
            res["selected"][stage] = {**meta, "eval_data": files["dev"]}
        elif stage in ("general-simcse", "general-supervised"):
            path = os.path.join(out, "adapter")
            res["selected"][stage] = {"adapter": "adapter", "selected_by": "last step (no STS-B selection)"}
        else:
            path, meta = selected(out)
            res["selected"][stage] = {"adapter": os.path.relpath(path, out), **(meta or {})}
        shutil.copy(os.path.join(out, "metrics.csv"), os.path.join(args.out, f"{prefix}{stage}_metrics.csv"))
        written.append(f"{prefix}{stage}_metrics.csv")
        return path

    def attempt(failed, keys, work, needs=None):
        """Run ``work()`` for the rows ``keys``; a failed command (:class:`RowFailed`) is recorded as each row's
        failure in ``failed`` and said on stderr, and the table goes on with the rows that do not need it.
        ``needs``: (row, its failure) this one builds on, already failed: recorded, not run."""
        if needs and needs[1]:
            for k in keys:
                failed[k] = f"needs {needs[0]}, which failed"
            return None
        try:
            return work()
        except RowFailed as e:
            for k in keys:
                failed[k] = str(e)
            print(f"row(s) {', '.join(f'({k})' for k in keys)} failed: {e}", file=sys.stderr, flush=True)
            return None

    def run_protocol(name):
        files, res = protocols[name], results[name]
        work = args.work if name == "in-domain" else os.path.join(args.work, name)
        prefix = "" if name == "in-domain" else f"{name}_"
        rows, failed = res["rows"], res["failed"]

        def score(key, model, causal=False):  # each pair's cosine is kept for the interval against (a)
            rows[key] = evaluate(model, files["test"], log, causal=causal, scores=scores_file(name, key))
            report(False)

        def row(key, work_fn, needs=None):
            attempt(failed, [key], work_fn, needs)
            if key in failed:
                report(False)

        if "a" in args.rows:
            row("a", lambda: score("a", "smollm2-135m", causal=True))
        if "b" in args.rows:
            row("b", lambda: score("b", "smollm2-135m"))
        mntp_adapter, mntp_failed = None, None
        if set("cdef") & set(args.rows):
            mntp_keys = [k for k in "cdef" if k in args.rows]
            mntp_adapter = attempt(failed, mntp_keys, lambda: train("mntp", os.path.join(work, "mntp"), files, res,
                                                                    prefix))
            mntp_failed = failed.get(mntp_keys[0]) if mntp_adapter is None else None
            if mntp_failed:
                report(False)
            elif "c" in args.rows:
                row("c", lambda: score("c", mntp_adapter))
        for key, stage in STAGES.items():
            if key in args.rows:
                row(key, lambda key=key, stage=stage: score(key, train(
                    stage, os.path.join(work, stage), files, res, prefix, [f"model.adapters=[{mntp_adapter}]"])),
                    needs=("the MNTP stage", mntp_failed))
        for key in "ghj":
            if key in args.rows:
                row(key, lambda key=key: score(key, general_adapters[key]),
                    needs=(f"the general stage of ({key})", general_failed.get(key)))
        for key, under in (("i", "gh"), ("k", "ghj")):  # the graded stage of (f) on top of general adapters
            if key in args.rows:
                lost = next((general_failed[u] for u in under if general_failed.get(u)), None)
                row(key, lambda key=key, under=under: score(key, train(
                    STAGE_OF[key], os.path.join(work, STAGE_OF[key]), files, res, prefix,
                    [f"model.adapters=[{','.join(general_adapters[u] for u in under)}]"], config="graded")),
                    needs=(f"the general stages ({', '.join(under)})", lost))

    def scores_file(protocol, key):
        return os.path.join(args.work, "scores", f"{protocol}_{key}.tsv")

    def intervals(name):
        """Each row's difference to (a) with its paired interval, once both --scores files exist (computed once)."""
        rows = results[name]["rows"]
        for k, row in rows.items():
            if k == "a" or "a" not in rows or "vs_causal" in row:
                continue
            mine, base = scores_file(name, k), scores_file(name, "a")
            if os.path.isfile(mine) and os.path.isfile(base):
                row["vs_causal"] = vs_causal(mine, base, protocols[name]["test"], row, rows["a"])

    def cell(rows, k):
        if k not in rows:
            return "-"
        s = f"{rows[k]['spearman']:.2f}"
        if k != "a" and "a" in rows:
            s += f" ({rows[k]['spearman'] - rows['a']['spearman']:+.2f})"
        return s

    def report(final):
        wall = time.time() - t_all
        import torch

        hw = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores, {platform.machine()})"
        for name in protocols:
            intervals(name)
        ind = results["in-domain"]
        rows, timings, budgets, picked = ind["rows"], ind["timings"], ind["budgets"], ind["selected"]
        result = {"date": datetime.date.today().isoformat(), "commit": commit, "hardware": hw, "nproc": args.nproc,
                  "command": cmdline, "label": args.label, "test_pairs": rows[next(iter(rows))]["pairs"] if rows else 0,
                  "wall_seconds": round(wall, 1), "timings": timings, "budgets": budgets, "selected": picked,
                  "overrides": args.set, "stage_overrides": per_stage, "rows": rows, "failed": ind["failed"],
                  "complete": final and not any(r["failed"] for r in results.values()),
                  "metrics_files": sorted(written)}
        if general["timings"] or general["failed"]:
            result["general"] = {"data": os.path.relpath(GENERAL, ROOT), **general}
            if set("jk") & set(args.rows):
                result["general"]["supervised_data"] = os.path.relpath(GENERAL_PAIRS, ROOT)
        hname = f"holdout-{args.holdout_genre}" if args.holdout_genre else None
        if hname:
            h = results[hname]
            result["holdout"] = {"genre": args.holdout_genre, "train_genres": [g for g in GENRES if g != args.holdout_genre],
                                 "files": {k: os.path.relpath(v, ROOT) for k, v in protocols[hname].items()},
                                 "test_pairs": h["rows"][next(iter(h["rows"]))]["pairs"] if h["rows"] else 0, **h}
        write_json(os.path.join(args.out, "results.json"), result)  # rewritten after every row: atomically
        lines = ["# STS Benchmark test: LLM2Vec on SmolLM2-135M-Instruct", ""]
        if not final:
            lines += ["**Partial: the run is still going (or was cut short); rows so far.**", ""]
        for name, r in results.items():
            for k, why in r["failed"].items():
                lines += [f"**Failed: {NAMES[k]}{'' if name == 'in-domain' else f' ({name})'}: {why}**", ""]
        if args.label:
            lines += [f"**{args.label}**", ""]
        if args.test_limit:
            lines += [f"**Rehearsal: scored on the first {args.test_limit} test pairs only, not the full test set.**", ""]
        lines += [f"Measured {result['date']} at commit `{commit}` on {hw}, {args.nproc} ranks; wall time "
                  f"{wall / 60:.1f} min for the whole table{'' if final else ' so far'}.", "", f"Command: `{cmdline}`", "",
                  "Each training stage evaluates on STS-B dev every `eval_every` steps (the first `eval_sts_pairs` "
                  "pairs of dev interleaved genre by genre, so every genre is in the selection). The contrastive "
                  "stages keep their best adapter by dev Spearman (`best/`), and their rows use it"
                  + (f"; MNTP hands on its last adapter to row (c) and to (d)-(f)"
                     f"{mntp_loss_note({f'{n} {st}': sel for n, r in results.items() for st, sel in r['selected'].items()})}"
                     if set("cdef") & set(args.rows) else "") + ".", ""]
        if general["timings"]:
            lines += ["General recipe: (g) and (h) train on `data/wikitext2-sentences` only, (j) on top of them on "
                      "`data/snli-triplets` only, once for both columns; they hand on their last adapters (their STS-B "
                      f"dev curves are logged, not used to choose){mntp_loss_note(general['selected'])}. (i) and (k) "
                      "are (f)'s graded stage on top of (g) and (h), and of (g), (h) and (j), trained and selected per "
                      "column like (f).", ""]
        if hname:
            h = result["holdout"]
            g, others = args.holdout_genre, " and ".join(h["train_genres"])
            lines += [f"Held-out column: every STS-B stage trained on the {others} pairs of STS-B train only, selected on "
                      f"the {others} pairs of STS-B dev (interleaved), scored on the {h['test_pairs']} {g} pairs of "
                      f"STS-B test; the in-domain column trains on all of STS-B train and scores all "
                      f"{result['test_pairs']} test pairs. In brackets: the difference to the causal model (a) on the "
                      "same test set.", "",
                      f"| model | in-domain Spearman x100 | held-out {g} Spearman x100 | training (in-domain) "
                      f"| selected adapter in-domain (step, dev) | selected adapter held-out (step, dev) |",
                      "| --- | ---: | ---: | --- | --- | --- |"]
        else:
            lines += ["| model | Spearman x100 | test pairs | training | selected adapter (step, dev Spearman) |",
                      "| --- | ---: | ---: | --- | --- |"]

        def sel_s(sel):
            if "eval_loss" in sel:
                return f"{sel['adapter']} ({sel['step']}, MNTP loss {sel['eval_loss']:.2f})"
            return (f"{sel['adapter']} ({sel['step']}, {sel['spearman']:.2f})" if "step" in sel
                    else sel.get("adapter", "-"))

        for k in NAMES:
            if k not in rows and not (hname and k in results[hname]["rows"]):
                continue
            st = STAGE_OF.get(k)
            tm, bu, pk = (general["timings"], general["budgets"], general["selected"]) if k in GENERAL_STAGES else (
                timings, budgets, picked)
            train_s = f"{tm[st + '_train_s'] / 60:.1f} min" if st and st + "_train_s" in tm else "-"
            if st in bu:
                b = bu[st]
                train_s += f", {b['max_steps']} steps x {b['batch_size']}" + (f", {b['loss']}" if "mntp" not in st else "")
            if hname:
                h = results[hname]
                h_sel = pk.get(st, {}) if k in GENERAL_STAGES else h["selected"].get(st, {})
                lines.append(f"| {NAMES[k]} | {cell(rows, k)} | {cell(h['rows'], k)} | {train_s} | "
                             f"{sel_s(pk.get(st, {}))} | {sel_s(h_sel)} |")
            else:
                lines.append(f"| {NAMES[k]} | {rows[k]['spearman']:.2f} | {rows[k]['pairs']} | {train_s} | "
                             f"{sel_s(pk.get(st, {}))} |")
        lines += ci_lines(rows, results[hname]["rows"] if hname else None, args.holdout_genre)
        lines += ["", "Per-step training logs (loss, lr, dev Spearman): `<stage>_metrics.csv`"
                  + (f" (held-out: `{hname}_<stage>_metrics.csv`)" if hname else "")
                  + "; budgets and the selected adapters: `results.json`.", "",
                  "For scale (published, other models): unsupervised SimCSE BERT-base about 77; supervised "
                  "all-MiniLM-L6-v2 about 82."]
        kept = hand_written(os.path.join(args.out, "README.md"))
        if kept:
            lines += ["", "The sections below were written by hand about the measurements of their dates; the script "
                      "keeps them when it rewrites the table above."]
        write_text(os.path.join(args.out, "README.md"), "\n".join(lines) + "\n" + ("\n" + kept if kept else ""))
        if final:
            print("\n".join(lines))

    general_adapters, general_failed = {}, general["failed"]  # a general stage's adapter, or why it failed
    if set("ghijk") & set(args.rows):  # the general stages: their config's corpus, trained once for every protocol
        gfiles = {"train": None, "dev": dev}
        for key, below, users in (("g", "", "ghijk"), ("h", "g", "hijk"), ("j", "gh", "jk")):
            if not set(users) & set(args.rows):
                continue
            lost = next((general_failed[u] for u in below if general_failed.get(u)), None)
            adapters = [f"model.adapters=[{','.join(general_adapters[u] for u in below)}]"] if below and not lost else []
            general_adapters[key] = attempt(general_failed, [key], lambda key=key, adapters=adapters: train(
                GENERAL_STAGES[key], os.path.join(args.work, GENERAL_STAGES[key]), gfiles, general, "", adapters,
                config=GENERAL_STAGES[key]), needs=(f"the general stage of ({below[-1:]})", lost))
    for name in protocols:
        run_protocol(name)
    report(True)
    if any(r["failed"] for r in results.values()):
        raise SystemExit(f"some rows failed (see results.json's failed, and {log})")


if __name__ == "__main__":
    main()

"""Evaluate an encoder.

    python -m engine.evaluate --model DIR --task sts --data data/stsbenchmark/sts-test.csv
    python -m engine.evaluate --model DIR --task mteb:STSBenchmark        # needs `mteb` (and network for its data)
    python -m engine.evaluate --model DIR --task mteb:STSBenchmarkLocal --data data/stsbenchmark/sts-dev.csv  # offline
    python -m engine.evaluate --model BASE --causal --data news.csv --scores base.tsv      # keep each pair's cosine
    python -m engine.evaluate --model DIR --data news.csv --bootstrap 2000 --compare base.tsv  # how sure, paired

DIR: a run dir (its ``best/`` adapter when the run kept one, said on stderr; ``--adapter last`` for ``adapter/``),
adapter dir / hub id, LLM2Vec-style checkpoint or a folder from ``python -m engine.export``.

Prints one JSON object: for STS, the cosine Spearman x 100 (and Pearson) and the pair count; for mteb tasks,
each task's main score, its scores per split and the languages, subsets and splits that score averages. A hub
task is scored in English by default, as MTEB(eng, v1) defines it (the LLM2Vec paper's figures: e.g.
MassiveIntentClassification's "en" test split, not the mean over 51 languages and two splits); a task outside that
benchmark on its English-only subsets. ``--languages all`` takes every subset and split, ``--languages eng,deu``
the subsets entirely in those languages. mteb tasks run with llm2vec's per-task instructions
(``engine.mteb_model.TASK_INSTRUCTIONS``); ``--instruction`` replaces them (for an aggregate such as
CQADupstackRetrieval, in every task it is made of). ``--bootstrap N`` adds
``spearman_ci``: a 95% percentile bootstrap interval over the pairs (``engine.stats``). ``--compare FILE`` (another
model's ``--scores`` on the same pairs) adds ``compare``: this model's Spearman minus that one's, its paired bootstrap
interval and the share of resamples where the difference is <= 0. Both cover the pairs' sampling, not run-to-run noise.
Bad input exits 2 with one line on stderr, before any model loads: a missing or malformed data file (naming the
file and line), fewer than 3 pairs (also after --max-pairs) or one gold score for all (sts and
mteb:STSBenchmarkLocal alike), a gold score that is not finite, an option the task does not use (--max-pairs
outside mteb:STSBenchmarkLocal, --data with a hub task, --languages outside hub tasks), an unknown language code
or a task with no subset in the languages asked for, a path that holds no model (empty, an
unfinished run, another kind of folder), a bad choice, a negative --seed, --bootstrap over 1000000, a --scores file
that cannot be written (its folder missing) or that names the --data or --compare file, an mteb task whose data
cannot be fetched (naming the offline task that works), and a --compare file that cannot be read, does not hold the
same pairs (count, gold scores, sentences), holds a cosine that is not finite or was written before --scores kept
the sentences' digest (rewrite it). Cosines of this model that
are not finite (NaN weights, an overflow) leave no score: one line naming how many, exit 1 (after --scores has
kept them). A figure that is not defined (constant cosines: no rank correlation) is printed as null.
"""
import argparse
import hashlib
import json
import math
import os
import sys
import time

from engine.files import atomic_open


def sts_cosines(encoder, pairs, batch_size=64, instruction=None):
    """The cosine of each pair's two embeddings, as a float64 numpy array in the pairs' order."""
    import torch

    a = encoder.encode([p[0] for p in pairs], batch_size=batch_size, instruction=instruction, convert_to_tensor=True)
    b = encoder.encode([p[1] for p in pairs], batch_size=batch_size, instruction=instruction, convert_to_tensor=True)
    return torch.nn.functional.cosine_similarity(a, b).double().numpy()


def sts_scores(encoder, pairs, batch_size=64, instruction=None, cos=None):
    from scipy.stats import pearsonr, spearmanr

    if cos is None:
        cos = sts_cosines(encoder, pairs, batch_size, instruction)
    gold = [p[2] for p in pairs]
    return {"spearman": float(spearmanr(cos, gold).statistic * 100), "pearson": float(pearsonr(cos, gold).statistic * 100),
            "pairs": len(pairs)}


SCORES_TEXT_HEADER = "pair\tgold\ttext\tcosine"  # what --scores writes (the cosine last, as it was)
SCORES_HEADER = "pair\tgold\tcosine"  # a file from before the text column: read_scores cannot check its sentences


def text_digest(pair):
    """A pair's ``text`` column in a --scores file: the first 12 hex digits of the SHA-256 of its sentence1, a tab
    and its sentence2 (UTF-8), so that a file is matched to the sentences it was scored on, not only their golds."""
    return hashlib.sha256(f"{pair[0]}\t{pair[1]}".encode("utf-8")).hexdigest()[:12]


def write_scores(path, pairs, cos):
    """SCORES_TEXT_HEADER, then one line a pair: its index in --data, the gold score, the text digest of its
    sentences (:func:`text_digest`) and the model's cosine (repr, so that both numbers read back exactly). Written
    to a temporary name and renamed, so a reader never sees half a file."""
    with atomic_open(path) as f:
        f.write(SCORES_TEXT_HEADER + "\n")
        for i, (p, c) in enumerate(zip(pairs, cos)):
            f.write(f"{i}\t{p[2]!r}\t{text_digest(p)}\t{float(c)!r}\n")


def read_scores(path, pairs, flag="--compare", need_text=False):
    """The cosines of a file from ``--scores``, checked against ``pairs``: the same count, and on every line the same
    gold score and the same sentences (the text digest), so that two models are compared on the same pairs. A file
    written before the text column (SCORES_HEADER) has no sentences to check: refused when ``need_text`` (as
    --compare does), else checked by gold scores alone. Raises ValueError naming ``flag``, the file and line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:  # a folder, no permission, bytes that are not UTF-8
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ValueError(f"{flag} {path}: cannot be read as a --scores file ({type(e).__name__}: {why})") from None
    header = lines[0] if lines else None
    if header == SCORES_HEADER and need_text:
        raise ValueError(f"{flag} {path}: written before --scores kept each pair's text digest, so its pairs cannot "
                         f"be checked against --data's sentences: rewrite it with --scores")
    if header not in (SCORES_TEXT_HEADER, SCORES_HEADER):
        raise ValueError(f"{path}: not a --scores file (its first line must be {SCORES_TEXT_HEADER!r})")
    text = header == SCORES_TEXT_HEADER
    rows = lines[1:]
    if len(rows) != len(pairs):
        raise ValueError(f"{path}: {len(rows)} pairs, but --data has {len(pairs)}: score both models on the same file")
    cos = []
    for n, (line, p) in enumerate(zip(rows, pairs), start=2):
        parts = line.split("\t")
        try:
            if len(parts) != 3 + text:
                raise ValueError
            i, gold, c = int(parts[0]), float(parts[1]), float(parts[-1])
        except ValueError:
            raise ValueError(f"{path}:{n}: expected {header.replace(chr(9), '<TAB>')!r}, got {line[:80]!r}") from None
        if i != n - 2 or gold != p[2]:
            raise ValueError(f"{path}:{n}: pair {i} with gold {gold:g}, but --data's pair {n - 2} has gold {p[2]:g}: "
                             f"score both models on the same file")
        if text and parts[2] != text_digest(p):
            raise ValueError(f"{path}:{n}: pair {i} was scored on other sentences than --data's pair {n - 2} (text "
                             f"digest {parts[2][:20]!r}, not {text_digest(p)!r}): score both models on the same file")
        if not math.isfinite(c):
            raise ValueError(f"{path}:{n}: cosine {parts[-1]!r} is not finite: that model's scores cannot be compared")
        cos.append(c)
    return cos


def check_pairs(path, pairs, least):
    """Raises ValueError naming ``path`` when ``pairs`` have no rank correlation to report: too few of them, or
    one gold score for all (Spearman's rho divides by the spread of the gold ranks, which is then 0). read_sts
    has refused gold scores that are not finite."""
    if len(pairs) < least:
        raise ValueError(f"{path}: {len(pairs)} pair(s), but a rank correlation needs at least {least}")
    golds = {float(p[2]) for p in pairs}
    if len(golds) == 1:
        raise ValueError(f"{path}: every one of its {len(pairs)} pairs has the gold score {golds.pop():g}, so a rank "
                         f"correlation with them is undefined")


def nonfinite_cosines(cos):
    """One line naming the pairs whose cosine is not finite, or None when every one is."""
    import numpy as np

    bad = np.flatnonzero(~np.isfinite(np.asarray(cos, dtype=np.float64)))
    if not bad.size:
        return None
    return (f"the model's cosine is not finite for {bad.size} of {len(cos)} pairs (the first: pair {bad[0]}): its "
            f"embeddings hold NaN or inf (weights, or a bf16/fp16 overflow: try --dtype fp32), so there is no "
            f"score to report, bootstrap or compare")


def json_safe(value):
    """``value`` with every float that is not finite as None: JSON has no NaN, and ``json.dumps`` would write a
    bare ``NaN`` that strict readers refuse."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def model_failed(message):
    """One line on stderr for a failure that is not the input's (the model's output, the disk): exit code 1."""
    from engine.cli import fail

    fail(message)
    return 1


OFFLINE_TASK = "--task mteb:STSBenchmarkLocal --data data/stsbenchmark/sts-dev.csv"
MAX_BOOTSTRAP = 1_000_000  # engine.stats.MAX_BOOT: named here so the check needs no numpy
LOCAL_TASK = "mteb:STSBenchmarkLocal"  # engine.mteb_model.LOCAL_STS_NAME: named here so option checks need no mteb
ENG_BENCHMARK = "MTEB(eng, v1)"  # the benchmark whose English figures the LLM2Vec paper reports


def local_pairs(data, max_pairs):
    """The pairs mteb:STSBenchmarkLocal scores (the first ``max_pairs`` of ``data``), checked as --task sts checks
    its own: a rank correlation needs 3 pairs and more than one gold score."""
    from engine.data import read_sts
    from engine.stats import MIN_PAIRS

    pairs = read_sts(data)
    if max_pairs and max_pairs < len(pairs):
        pairs, data = pairs[:max_pairs], f"{data} (its first {max_pairs}, --max-pairs)"
    check_pairs(data, pairs, MIN_PAIRS)
    return pairs


def select_mteb_task(name, languages=None):
    """The mteb task ``name`` cut to the subsets and splits its score is to average, and the benchmark that defines
    that cut (else None). ``languages``: None or ["eng"] for English, as MTEB(eng, v1) defines the task when it
    holds it (its English subsets and splits), else the subsets in English alone, every eval split; "all" for every
    subset and split; a list of ISO 639-3 codes (or code-Script) for the subsets entirely in those languages, every
    split. Only task metadata is read (no data). ValueError for an unknown task or code, or no subset left."""
    import copy

    import mteb
    from mteb.languages import check_language_code

    try:
        task = mteb.get_task(name)
    except KeyError as e:
        raise ValueError(f"unknown mteb task {name!r} ({e.args[0] if e.args else e})") from None
    if languages == "all":
        return task, None
    if languages is None or list(languages) == ["eng"]:
        bench = {t.metadata.name: t for t in mteb.get_benchmark(ENG_BENCHMARK).tasks}
        if name in bench:  # a copy: loading data fills the task object, and the benchmark's is shared
            return copy.deepcopy(bench[name]), ENG_BENCHMARK
        languages = ["eng"]
    for code in languages:
        try:
            check_language_code(code)
        except ValueError:
            raise ValueError(f"--languages: {code!r} is not an ISO 639-3 language code (eng, deu, ...; or "
                             f"eng-Latn), nor 'all'") from None
    have = task.metadata.hf_subsets_to_langscripts
    try:  # exclusive: a subset counts when all its languages are asked for (STS22's de-en is not English)
        task.filter_languages(languages, exclusive_language_filter=True)
    except ValueError:
        langs = sorted({ls.split("-")[0] for v in have.values() for ls in v})
        raise ValueError(f"mteb:{name} has no subset in {','.join(languages)} alone (its languages: "
                         f"{','.join(langs[:12])}{', ...' if len(langs) > 12 else ''}): use --languages all or "
                         f"--languages CODE[,CODE...]") from None
    return task, None


def task_coverage(task, benchmark=None):
    """What a task's score averages (for the output JSON): its subsets, their languages and the splits, and how
    many of the task's subsets and which of its splits were left out."""
    have = task.metadata.hf_subsets_to_langscripts
    subsets, splits = list(task.hf_subsets or have), list(task.eval_splits)
    out = {"languages": sorted({ls for s in subsets for ls in have.get(s, [])}), "subsets": subsets,
           "splits": splits, "defined_by": benchmark, "subsets_left_out": len(set(have) - set(subsets)),
           "splits_left_out": [s for s in task.metadata.eval_splits if s not in splits]}
    if task.is_aggregate:
        out["subtasks"] = [t.metadata.name for t in task.metadata.tasks]
    return out


def coverage_note(name, c):
    """One line for stderr when a task's score leaves some of its subsets or splits out, else None."""
    if not (c["subsets_left_out"] or c["splits_left_out"]):
        return None
    how = f" (as {c['defined_by']} defines it)" if c["defined_by"] else ""
    return (f"mteb:{name}{how}: {len(c['subsets'])} subset(s) ({', '.join(c['subsets'][:6])}"
            f"{', ...' if len(c['subsets']) > 6 else ''}) and split(s) {', '.join(c['splits'])}; left out: "
            f"{c['subsets_left_out']} subset(s), split(s) {', '.join(c['splits_left_out']) or 'none'} "
            f"(--languages all scores every one)")


def _mteb_tasks(name, data, max_pairs, languages=None):
    """The mteb task(s) for ``--task mteb:NAME`` and what each score covers (:func:`task_coverage`), their data
    loaded now (before any model loads), so that a task whose data cannot be fetched is one clear error naming the
    offline task that works."""
    from engine.mteb_model import LOCAL_STS_NAME, local_sts_task

    if name == LOCAL_STS_NAME:
        data = data or "data/stsbenchmark/sts-dev.csv"
        pairs = local_pairs(data, max_pairs)  # refused here, not scored null after the model has loaded
        task = local_sts_task(data, max_pairs, pairs=pairs)
        return [task], {LOCAL_STS_NAME: task_coverage(task)}
    task, benchmark = select_mteb_task(name, languages)
    try:  # an aggregate (CQADupstackRetrieval) has no data of its own: mteb runs the tasks it is made of
        for t in task.metadata.tasks if task.is_aggregate else [task]:
            t.load_data()
    except Exception as e:  # offline, hub unreachable, gated dataset: whatever datasets raised
        raise ValueError(f"mteb:{name} needs its data from the Hugging Face hub, which could not be reached "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); offline, use "
                         f"{OFFLINE_TASK}") from None
    return [task], {task.metadata.name: task_coverage(task, benchmark)}


def misplaced_option(args):
    """One line for an option given to a task that does not use it (each used to be ignored without a word), else
    None."""
    kind = ("sts" if args.task == "sts" else "local" if args.task == LOCAL_TASK
            else "hub" if args.task.startswith("mteb:") else None)
    if kind is None:
        return None  # an unknown task: said after the model path check
    if args.max_pairs is not None and kind != "local":
        return f"--max-pairs applies to --task {LOCAL_TASK} only; --task {args.task} scores every pair of its data"
    if args.data is not None and kind == "hub":
        return (f"--data applies to --task sts and --task {LOCAL_TASK}; --task {args.task} reads its own data "
                f"from the Hugging Face hub")
    if args.languages is not None and kind != "hub":
        return f"--languages applies to mteb hub tasks; --task {args.task} is English STS Benchmark pairs"
    return None


def parse_languages(value):
    """--languages: "all", else a comma-separated list of codes (checked against the task's metadata later)."""
    if value.strip().lower() == "all":
        return "all"
    codes = [c.strip() for c in value.split(",") if c.strip()]
    if not codes:
        raise argparse.ArgumentTypeError("expected 'all' or language codes such as eng or eng,deu")
    return codes


def device_problem(spec):
    """Why ``spec`` names no device this machine has (not a torch device, CUDA without a GPU, an index past the
    GPUs), else None; said before the model loads."""
    import torch

    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError) as e:
        return f"not a device ({str(e).splitlines()[0][:120]})"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device on this machine"
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return f"this machine has {torch.cuda.device_count()} CUDA device(s)"
    elif dev.type not in ("cpu", "mps", "xpu"):
        return "not a device the encoder runs on (cpu, cuda[:N])"
    return None


def main(argv=None):
    from engine.cli import ArgumentParser, fail, positive_int, unwritable
    from engine.encoder import RUN_ADAPTERS
    from engine.pooling import POOLING_MODES

    ap = ArgumentParser(prog="python -m engine.evaluate", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="run output dir, adapter dir, or HF model name/folder")
    ap.add_argument("--adapter", choices=sorted(RUN_ADAPTERS), default=None,
                    help="for a training run folder: best (the default when the run kept best/) or last (adapter/)")
    ap.add_argument("--task", default="sts", help="sts, or mteb:TASK_NAME")
    ap.add_argument("--data", help="STS Benchmark TSV (task sts)")
    ap.add_argument("--batch-size", type=positive_int, default=64)
    ap.add_argument("--instruction", default=None)
    ap.add_argument("--pooling", default=None, choices=POOLING_MODES)
    ap.add_argument("--causal", action="store_true", help="keep the causal attention of the base model")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                    help="weights dtype (auto: bf16 on CUDA from Ampere, fp16 on older GPUs, fp32 on CPU)")
    ap.add_argument("--max-length", type=positive_int, default=None,
                    help="inference max tokens (default: the model's, else 512)")
    ap.add_argument("--max-pairs", type=positive_int, default=None,
                    help="mteb:STSBenchmarkLocal: use the first N pairs")
    ap.add_argument("--languages", type=parse_languages, default=None, metavar="all|CODE[,CODE...]",
                    help="mteb hub tasks: the subsets to score (default eng: English, as MTEB(eng, v1) defines the "
                         "task, else its English-only subsets; all: every subset and split; eng,deu: the subsets "
                         "entirely in those languages)")
    ap.add_argument("--scores", default=None, metavar="FILE",
                    help="task sts: also write each pair's gold score, cosine and sentence digest to FILE (for "
                         "--compare; the format: engine.evaluate.write_scores)")
    ap.add_argument("--bootstrap", type=positive_int, default=None, metavar="N",
                    help="task sts: add a 95%% percentile bootstrap interval over the pairs from N resamples "
                         "(engine.stats; 2000 is plenty)")
    ap.add_argument("--compare", default=None, metavar="FILE",
                    help="task sts: a --scores file of another model on the same --data; adds this model's Spearman "
                         "minus that one's, with a paired bootstrap interval (--bootstrap N, default 2000)")
    ap.add_argument("--seed", type=int, default=0, help="the bootstrap's resampling seed")
    args = ap.parse_args(argv)
    if args.task != "sts" and (args.scores is not None or args.bootstrap or args.compare is not None):
        return fail("--scores, --bootstrap and --compare are for --task sts")
    if args.compare is not None and not args.compare:
        return fail("--compare: an empty path")
    why = misplaced_option(args)
    if why:
        return fail(why)
    if args.device is not None:
        why = device_problem(args.device)
        if why:
            return fail(f"--device {args.device!r}: {why}")
    if args.bootstrap is not None and args.bootstrap < 100:
        return fail(f"--bootstrap {args.bootstrap}: use at least 100 resamples")
    if args.bootstrap is not None and args.bootstrap > MAX_BOOTSTRAP:
        return fail(f"--bootstrap {args.bootstrap}: use at most {MAX_BOOTSTRAP} resamples (2000 is plenty)")
    if args.seed < 0:
        return fail(f"--seed {args.seed}: the bootstrap's seed must be >= 0")
    if args.scores is not None and unwritable(args.scores):  # said now, not after the whole evaluation
        return fail(f"--scores {unwritable(args.scores)}")
    for flag, path in (("--compare", args.compare), ("--data", args.data)):
        if args.scores and path and os.path.realpath(args.scores) == os.path.realpath(path):
            return fail(f"--scores {args.scores} is the {flag} file: writing this model's scores would overwrite it; "
                        f"name another file")

    from engine.data import DataError, read_sts
    from engine.encoder import ModelPathError, check_model_path
    from engine.stats import MIN_PAIRS

    try:
        check_model_path(args.model)  # a missing or wrong folder: said now, before any data or model loads
    except ModelPathError as e:
        return fail(e)
    if args.task == "sts":
        if not args.data:
            return fail("--task sts needs --data FILE (an STS Benchmark TSV, e.g. data/stsbenchmark/sts-test.csv)")
        try:
            pairs = read_sts(args.data)
            check_pairs(args.data, pairs, MIN_PAIRS)
            other = read_scores(args.compare, pairs, need_text=True) if args.compare is not None else None
        except (DataError, OSError, ValueError) as e:
            return fail(e)
    elif not args.task.startswith("mteb:"):
        return fail(f"unknown task {args.task!r}: use sts or mteb:TASK")
    else:
        try:
            import mteb
        except ImportError:
            return fail("mteb tasks need `pip install -e '.[eval]'` (and network for the task data)")
        try:
            tasks, coverage = _mteb_tasks(args.task.split(":", 1)[1], args.data, args.max_pairs, args.languages)
        except (DataError, OSError, ValueError) as e:
            return fail(e)
        for name, c in coverage.items():
            note = coverage_note(name, c)
            if note:
                print(note, file=sys.stderr)

    from engine import Encoder
    from engine.modeling import ModelLoadError

    t0 = time.time()
    try:
        enc = Encoder.from_pretrained(args.model, pooling=args.pooling, device=args.device, dtype=args.dtype,
                                      max_length=args.max_length, bidirectional=False if args.causal else None,
                                      adapter=args.adapter)
    except (ValueError, FileNotFoundError, ModelLoadError) as e:  # a bad path, architecture, adapter or tokenizer
        return fail(e)
    selected = (enc.source or {}).get("selected")
    if selected:
        print(selected, file=sys.stderr)
    if args.task == "sts":
        try:
            cos = sts_cosines(enc, pairs, args.batch_size, args.instruction)
        except ValueError as e:  # an instruction that leaves --max-length no room for the text
            return fail(e)
        if args.scores is not None:  # first, so the cosines are kept whatever is made of them
            try:
                write_scores(args.scores, pairs, cos)
            except OSError as e:  # a full disk, the folder gone since the check
                return model_failed(f"--scores {args.scores}: {e}")
        why = nonfinite_cosines(cos)
        if why:  # the model's output, not the input (checked before it loaded): no score, exit 1
            return model_failed(why)
        result = {"task": "sts", "data": args.data, **sts_scores(enc, pairs, cos=cos)}
        try:
            result.update(_intervals(args, cos, other, [p[2] for p in pairs]))
        except ValueError as e:  # engine.stats' own checks on the model's cosines: one line, not a traceback
            return model_failed(e)
    else:
        from engine.mteb_model import EngineMTEBModel

        model = EngineMTEBModel(enc, name=f"llm2vec-engine/{os.path.basename(os.path.normpath(args.model))}",
                                instructions={t.metadata.name: args.instruction for t in tasks}
                                if args.instruction is not None else None)
        try:
            res = mteb.evaluate(model, tasks=tasks, cache=None, encode_kwargs={"batch_size": args.batch_size},
                                show_progress_bar=False)
        except ValueError as e:  # as for sts: the encoder's one-line errors on its input
            return fail(e)
        result = {"task": args.task, "languages": args.languages or "eng", "results": [
            {"task": r.task_name, "main_score": r.get_score(), **coverage.get(r.task_name, {}), "scores": r.scores}
            for r in res.task_results]}
    result.update({"model": args.model, "pooling": enc.pooling, "seconds": round(time.time() - t0, 1)})
    print(json.dumps(json_safe(result), allow_nan=False))
    return 0


def _intervals(args, cos, other, gold):
    """``spearman_ci`` (--bootstrap) and ``compare`` (--compare) for the result; the caller has checked that the
    cosines are finite."""
    from engine.stats import bootstrap_spearman, paired_bootstrap

    if not (args.bootstrap or other is not None):
        return {}
    out = {}
    if args.bootstrap:
        b = bootstrap_spearman(cos, gold, n_boot=args.bootstrap, seed=args.seed)
        out["spearman_ci"] = {k: b[k] for k in ("ci", "level", "n_boot", "undefined")}
    if other is not None:
        out["compare"] = {"scores": args.compare, **paired_bootstrap(cos, other, gold, n_boot=args.bootstrap or 2000,
                                                                    seed=args.seed)}
    return out


if __name__ == "__main__":
    sys.exit(main())

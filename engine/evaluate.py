"""Evaluate an encoder.

    python -m engine.evaluate --model DIR --task sts --data data/stsbenchmark/sts-test.csv
    python -m engine.evaluate --model DIR --task mteb:STSBenchmark        # needs `mteb` (and network for its data)
    python -m engine.evaluate --model DIR --task mteb:STSBenchmarkLocal --data data/stsbenchmark/sts-dev.csv  # offline

DIR: a run dir (its ``best/`` adapter when the run kept one, said on stderr; ``--adapter last`` for ``adapter/``),
adapter dir / hub id, LLM2Vec-style checkpoint or a folder from ``python -m engine.export``.
Prints one JSON object: for STS, the cosine Spearman x 100 (and Pearson) and the pair count; for mteb tasks,
each task's main score and its scores per split. mteb tasks run with llm2vec's per-task instructions
(``engine.mteb_model.TASK_INSTRUCTIONS``); ``--instruction`` replaces them.
Bad input exits 2 with one line on stderr, before any model loads: a missing or malformed data file (naming the
file and line), a path that holds no model (empty, an unfinished run, another kind of folder), a bad choice, and
an mteb task whose data cannot be fetched (naming the offline task that works).
"""
import argparse
import json
import os
import sys
import time


def sts_scores(encoder, pairs, batch_size=64, instruction=None):
    import torch
    from scipy.stats import pearsonr, spearmanr

    a = encoder.encode([p[0] for p in pairs], batch_size=batch_size, instruction=instruction, convert_to_tensor=True)
    b = encoder.encode([p[1] for p in pairs], batch_size=batch_size, instruction=instruction, convert_to_tensor=True)
    cos = torch.nn.functional.cosine_similarity(a, b).numpy()
    gold = [p[2] for p in pairs]
    return {"spearman": float(spearmanr(cos, gold).statistic * 100), "pearson": float(pearsonr(cos, gold).statistic * 100),
            "pairs": len(pairs)}


OFFLINE_TASK = "--task mteb:STSBenchmarkLocal --data data/stsbenchmark/sts-dev.csv"


def _mteb_tasks(name, data, max_pairs):
    """The mteb task(s) for ``--task mteb:NAME``, their data loaded now (before any model loads), so that a task
    whose data cannot be fetched is one clear error naming the offline task that works."""
    import mteb

    from engine.mteb_model import LOCAL_STS_NAME, local_sts_task

    if name == LOCAL_STS_NAME:
        return [local_sts_task(data or "data/stsbenchmark/sts-dev.csv", max_pairs)]
    try:
        tasks = list(mteb.get_tasks(tasks=[name]))
    except KeyError as e:
        raise ValueError(f"unknown mteb task {name!r} ({e.args[0] if e.args else e})") from None
    for t in tasks:
        try:
            t.load_data()
        except Exception as e:  # offline, hub unreachable, gated dataset: whatever datasets raised
            raise ValueError(f"mteb:{name} needs its data from the Hugging Face hub, which could not be reached "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); offline, use "
                             f"{OFFLINE_TASK}") from None
    return tasks


def main(argv=None):
    from engine.cli import ArgumentParser, fail, positive_int
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
                    help="weights dtype (auto: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--max-length", type=positive_int, default=None,
                    help="inference max tokens (default: the model's, else 512)")
    ap.add_argument("--max-pairs", type=positive_int, default=None,
                    help="mteb:STSBenchmarkLocal: use the first N pairs")
    args = ap.parse_args(argv)

    from engine.data import DataError, read_sts
    from engine.encoder import ModelPathError, check_model_path

    try:
        check_model_path(args.model)  # a missing or wrong folder: said now, before any data or model loads
    except ModelPathError as e:
        return fail(e)
    if args.task == "sts":
        if not args.data:
            return fail("--task sts needs --data FILE (an STS Benchmark TSV, e.g. data/stsbenchmark/sts-test.csv)")
        try:
            pairs = read_sts(args.data)
        except (DataError, OSError) as e:
            return fail(e)
    elif not args.task.startswith("mteb:"):
        return fail(f"unknown task {args.task!r}: use sts or mteb:TASK")
    else:
        try:
            import mteb
        except ImportError:
            return fail("mteb tasks need `pip install -e '.[eval]'` (and network for the task data)")
        try:
            tasks = _mteb_tasks(args.task.split(":", 1)[1], args.data, args.max_pairs)
        except (DataError, OSError, ValueError) as e:
            return fail(e)

    from engine import Encoder

    t0 = time.time()
    try:
        enc = Encoder.from_pretrained(args.model, pooling=args.pooling, device=args.device, dtype=args.dtype,
                                      max_length=args.max_length, bidirectional=False if args.causal else None,
                                      adapter=args.adapter)
    except (ModelPathError, FileNotFoundError) as e:
        return fail(e)
    selected = (enc.source or {}).get("selected")
    if selected:
        print(selected, file=sys.stderr)
    if args.task == "sts":
        result = {"task": "sts", "data": args.data, **sts_scores(enc, pairs, args.batch_size, args.instruction)}
    else:
        from engine.mteb_model import EngineMTEBModel

        model = EngineMTEBModel(enc, name=f"llm2vec-engine/{os.path.basename(os.path.normpath(args.model))}",
                                instructions={t.metadata.name: args.instruction for t in tasks}
                                if args.instruction is not None else None)
        res = mteb.evaluate(model, tasks=tasks, cache=None, encode_kwargs={"batch_size": args.batch_size},
                            show_progress_bar=False)
        result = {"task": args.task, "results": [
            {"task": r.task_name, "main_score": r.get_score(), "scores": r.scores} for r in res.task_results]}
    result.update({"model": args.model, "pooling": enc.pooling, "seconds": round(time.time() - t0, 1)})
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

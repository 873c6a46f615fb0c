"""Evaluate an encoder.

    python -m engine.evaluate --model DIR --task sts --data data/stsbenchmark/sts-test.csv
    python -m engine.evaluate --model DIR --task mteb:STSBenchmark        # needs `mteb` (and network for its data)
    python -m engine.evaluate --model DIR --task mteb:STSBenchmarkLocal --data data/stsbenchmark/sts-dev.csv  # offline

DIR: a run dir, adapter dir / hub id, LLM2Vec-style checkpoint or a folder from ``python -m engine.export``.
Prints one JSON object: for STS, the cosine Spearman x 100 (and Pearson) and the pair count; for mteb tasks,
each task's main score and its scores per split. mteb tasks run with llm2vec's per-task instructions
(``engine.mteb_model.TASK_INSTRUCTIONS``); ``--instruction`` replaces them.
A malformed data file exits non-zero with a message naming the file and line.
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="run output dir, adapter dir, or HF model name/folder")
    ap.add_argument("--task", default="sts", help="sts, or mteb:TASK_NAME")
    ap.add_argument("--data", help="STS Benchmark TSV (task sts)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--instruction", default=None)
    ap.add_argument("--pooling", default=None)
    ap.add_argument("--causal", action="store_true", help="keep the causal attention of the base model")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                    help="weights dtype (auto: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--max-length", type=int, default=None, help="inference max tokens (default: the model's, else 512)")
    ap.add_argument("--max-pairs", type=int, default=None, help="mteb:STSBenchmarkLocal: use the first N pairs")
    args = ap.parse_args(argv)

    from engine.data import DataError, read_sts

    if args.task == "sts":
        if not args.data:
            ap.error("--task sts needs --data FILE")
        try:
            pairs = read_sts(args.data)
        except DataError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    elif not args.task.startswith("mteb:"):
        ap.error(f"unknown task {args.task!r}: use sts or mteb:TASK")
    else:
        try:
            import mteb
        except ImportError:
            print("error: mteb tasks need `pip install -e '.[eval]'` (and network for the task data)", file=sys.stderr)
            return 2
        from engine.mteb_model import LOCAL_STS_NAME, local_sts_task

        name = args.task.split(":", 1)[1]
        try:
            if name == LOCAL_STS_NAME:
                tasks = [local_sts_task(args.data or "data/stsbenchmark/sts-dev.csv", args.max_pairs)]
            else:
                tasks = list(mteb.get_tasks(tasks=[name]))
        except (DataError, KeyError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    from engine import Encoder

    t0 = time.time()
    enc = Encoder.from_pretrained(args.model, pooling=args.pooling, device=args.device, dtype=args.dtype,
                                  max_length=args.max_length, bidirectional=False if args.causal else None)
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

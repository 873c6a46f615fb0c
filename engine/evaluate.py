"""Evaluate an encoder.

    python -m engine.evaluate --model DIR --task sts --data data/stsbenchmark/sts-test.csv
    python -m engine.evaluate --model DIR --task mteb:STSBenchmark        # needs `mteb` and network

Prints one JSON object: for STS, the cosine Spearman x 100 (and Pearson) and the pair count.
A malformed data file exits non-zero with a message naming the file and line.
"""
import argparse
import json
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

    from engine import Encoder

    t0 = time.time()
    enc = Encoder.from_pretrained(args.model, pooling=args.pooling, device=args.device,
                                  bidirectional=False if args.causal else None)
    if args.task == "sts":
        result = {"task": "sts", "data": args.data, **sts_scores(enc, pairs, args.batch_size, args.instruction)}
    else:
        try:
            import mteb
        except ImportError:
            print("error: mteb tasks need `pip install mteb` (and network for the task data)", file=sys.stderr)
            return 2
        name = args.task.split(":", 1)[1]
        res = mteb.evaluate(enc, tasks=mteb.get_tasks(tasks=[name]))
        result = {"task": args.task, "results": [r.to_dict() if hasattr(r, "to_dict") else str(r) for r in res]}
    result.update({"model": args.model, "pooling": enc.pooling, "seconds": round(time.time() - t0, 1)})
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

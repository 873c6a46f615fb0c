"""How sure is an MNTP adapter's figure against the causal model? A 95% bootstrap interval over the test pairs.

    python benchmarks/results/quality-smollm2-135m-general/mntp-lr-mask/intervals.py \\
        --work WORK_OF_AN_MNTP_CURVE_RUN --out .../FOLDER [--step 300 | --adapter PATH]

scores the causal model and the adapter that ``mntp_curve.py`` kept at ``--step`` (or ``--adapter``: another
adapter, e.g. the SimCSE stage that ``simcse_on.py`` trained on it) on all of STS-B test and on its
held-out genre's test pairs (the run's ``holdout/sts-test.csv``), through ``engine.evaluate --scores``,
``--bootstrap 2000`` and ``--compare`` (engine.stats). Writes ``intervals.json``: for each test set, the causal
model's Spearman and interval, the adapter's, and the adapter minus the causal model with its paired interval.
The intervals cover the pairs' sampling only, not a second training run's.
"""
import argparse
import datetime
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import quality_smollm2 as q  # noqa: E402
from engine.files import write_json  # noqa: E402
from benchmarks.common import git_commit  # noqa: E402

N_BOOT = 2000


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="the --work folder of an mntp_curve.py run")
    ap.add_argument("--out", required=True)
    ap.add_argument("--step", type=int, default=300)
    ap.add_argument("--adapter", default=None, help="score this adapter instead of the MNTP run's --step one")
    args = ap.parse_args(argv)
    adapter = args.adapter or os.path.join(args.work, "run", "checkpoints", f"step_{args.step:07d}", "adapter")
    tests = {"test": os.path.join(ROOT, "data", "stsbenchmark", "sts-test.csv"),
             "news": os.path.join(args.work, "holdout", "sts-test.csv")}
    for path in (adapter, *tests.values()):
        if not os.path.exists(path):
            print(f"error: {path} not found: --work must be an mntp_curve.py run"
                  + ("" if args.adapter else f" that kept step {args.step}"), file=sys.stderr)
            return 2
    os.makedirs(args.out, exist_ok=True)
    res = {"date": datetime.date.today().isoformat(), "commit": git_commit(), "n_boot": N_BOOT, "level": 0.95,
           **({"adapter": os.path.relpath(adapter, args.work)} if args.adapter else {"step": args.step})}
    log = os.path.join(args.work, "intervals.log")
    boot = ["--bootstrap", str(N_BOOT)]
    for name, data in tests.items():
        base_scores = os.path.join(args.work, f"causal-{name}.tsv")
        base = q.evaluate("smollm2-135m", data, log, causal=True, scores=base_scores, extra=boot)
        mine = q.evaluate(adapter, data, log, extra=[*boot, "--compare", base_scores])
        res[name] = {"pairs": mine["pairs"],
                     "causal": {"spearman": base["spearman"], "ci": base["spearman_ci"]["ci"]},
                     "adapter": {"spearman": mine["spearman"], "ci": mine["spearman_ci"]["ci"]},
                     "adapter_minus_causal": {k: mine["compare"][k] for k in ("difference", "ci", "share_at_or_below_0")}}
        print(name, json.dumps(res[name]), flush=True)
    write_json(os.path.join(args.out, "intervals.json"), res)  # atomic: a reader never sees half a file
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Is general MNTP's level on news seed noise? Average the weight updates of MNTP adapters trained from different
seeds (a "soup") and score the average on all of STS-B test and on its news pairs. Writes ``<OUT>/soup.json``.

    python benchmarks/results/quality-smollm2-135m-general/mntp-lr-mask/soup.py --news WORK/holdout/sts-test.csv \\
        --adapters A B C --out benchmarks/results/quality-smollm2-135m-general/mntp-lr-mask/soup

The n adapters (LoRA rank r, scale alpha/r, the same target modules) become one adapter of rank n r whose update
is their mean, exactly: A = [A_1; ...; A_n] stacked by rows, B = [B_1, ..., B_n] / n side by side, alpha n, so
B A alpha/(n r) = (1/n) sum_i B_i A_i alpha/r. One adapter alone (n = 1) is copied unchanged, which checks the
path: it must score what that adapter scores. Every list of adapters is scored, first the singles in order,
then their soup. Run from the repository root, alone on the machine. A missing or mismatched adapter is one line
on stderr and exit 2.
"""
import argparse
import datetime
import json
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", "..", ".."))
sys.path.insert(0, ROOT)

from benchmarks import quality_smollm2 as q  # noqa: E402
from benchmarks.common import git_commit  # noqa: E402

WEIGHTS = "adapter_model.safetensors"


class SoupError(ValueError):
    pass


def _config(path):
    cfg_path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(cfg_path) or not os.path.isfile(os.path.join(path, WEIGHTS)):
        raise SoupError(f"{path}: not a LoRA adapter folder (adapter_config.json and {WEIGHTS})")
    with open(cfg_path) as f:
        return json.load(f)


def make_soup(adapters, out):
    """Write the adapter whose update is the mean of ``adapters``' updates to ``out``; returns its rank."""
    import torch
    from safetensors.torch import load_file, save_file

    cfgs = [_config(a) for a in adapters]
    keys = ("r", "lora_alpha", "target_modules", "use_rslora", "use_dora")
    for a, c in zip(adapters[1:], cfgs[1:]):
        if any(c.get(k) != cfgs[0].get(k) for k in keys):
            raise SoupError(f"{a}: its LoRA settings ({', '.join(keys)}) differ from {adapters[0]}'s")
    if cfgs[0].get("use_rslora") or cfgs[0].get("use_dora"):
        raise SoupError(f"{adapters[0]}: rsLoRA and DoRA adapters are not averaged here")
    weights = [load_file(os.path.join(a, WEIGHTS)) for a in adapters]
    for a, w in zip(adapters[1:], weights[1:]):
        if w.keys() != weights[0].keys():
            raise SoupError(f"{a}: its LoRA tensors differ from {adapters[0]}'s")
    n = len(adapters)
    soup = {}
    for k in weights[0]:
        if "lora_A" in k:
            soup[k] = torch.cat([w[k] for w in weights], 0).contiguous()
        elif "lora_B" in k:
            soup[k] = (torch.cat([w[k] for w in weights], 1) / n).contiguous()
        else:
            raise SoupError(f"{adapters[0]}: {k} is neither lora_A nor lora_B")
    os.makedirs(out, exist_ok=True)
    for f in os.listdir(adapters[0]):
        if f not in (WEIGHTS, "adapter_config.json") and os.path.isfile(os.path.join(adapters[0], f)):
            shutil.copy(os.path.join(adapters[0], f), out)
    cfg = dict(cfgs[0], r=cfgs[0]["r"] * n, lora_alpha=cfgs[0]["lora_alpha"] * n)
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    save_file(soup, os.path.join(out, WEIGHTS))
    return cfg["r"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", nargs="+", required=True)
    ap.add_argument("--news", required=True, help="the held-out protocol's news test file (WORK/holdout/sts-test.csv)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default=os.path.join(ROOT, "outputs", "mntp-soup"), help="where the soups are built")
    args = ap.parse_args(argv)
    try:
        for a in args.adapters:
            _config(a)
        if not os.path.isfile(args.news):
            raise SoupError(f"{args.news}: missing; give the news test file of a mntp_curve.py --work folder")
    except SoupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tests = {"test": os.path.join(q.STS, "sts-test.csv"), "news": args.news}
    os.makedirs(args.out, exist_ok=True)
    log = os.path.join(args.work, "soup.log")
    runs = [[a] for a in args.adapters] + ([args.adapters] if len(args.adapters) > 1 else [])
    rows = []
    for k, members in enumerate(runs):
        path = os.path.join(args.work, f"soup{k}")
        try:
            rank = make_soup(members, path)
        except SoupError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        row = {"adapters": [os.path.relpath(os.path.abspath(m), ROOT) for m in members], "rank": rank}
        for name, test in tests.items():
            res = q.evaluate(path, test, log)
            row[f"{name}_spearman"], row[f"{name}_pairs"] = round(res["spearman"], 2), res["pairs"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {"date": datetime.date.today().isoformat(), "commit": git_commit(),
           "what": "STS-B test Spearman x100 (all pairs, and the 500 news pairs) of each MNTP adapter and of the "
                   "mean of their weight updates (last row), mean pooling, engine.evaluate",
           "rows": rows}
    with open(os.path.join(args.out, "soup.json"), "w") as f:
        json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

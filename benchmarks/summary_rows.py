"""The rows a GPU run's summary reads (benchmarks.summarize), from its $OUT: one CSV's rows (``read``), a row's
extras, and which rows may be compared: a kernel CSV's rows of one device (newest_gpu), the train-step rows with a
follow-up call's rerun/ rows in place but for another GPU's (with_reruns), in today's impl names (legacy_rows).
No torch: the summary runs where the GPU run's folder was fetched to."""
import csv
import glob
import os


def read(path):  # None without the file
    if os.path.isfile(path):
        with open(path, newline="") as f:
            return list(csv.DictReader(f))


def extra(row):
    return dict(kv.split("=", 1) for kv in (row.get("extra") or "").split(";") if "=" in kv)


def legacy_rows(rows):
    """Train-step rows in today's impl names, and whether they needed renaming. In runs before llm2vec's HF + PEFT
    recipe joined the benchmark (the committed 2026-11-26 H200 run) `reference` was the ZeRO-3 ablation, whose step
    rows say zero=3: today's `reference-zero3`. Today's `reference` is the HF recipe, without DeepSpeed (zero=none).
    In such a legacy run every `reference` row (profile rows too) is renamed."""
    legacy = any(r["impl"] == "reference" and r["pass"] == "step" and extra(r).get("zero") == "3" for r in rows)
    return [dict(r, impl="reference-zero3") if legacy and r["impl"] == "reference" else r for r in rows], legacy


def newest_gpu(rows):
    """(kept, apart): a kernel CSV's rows measured on the GPU of its last row, and the others. A benchmark appends
    to its CSV, so one file can hold a --tiny rehearsal's rows (gpu=cpu) or another card's run beside this one's;
    a target pairs each impl's newest row, which could then pair two devices' times (an impl the GPU run skipped
    keeps its CPU row). No ratio is made across devices, as for train-step rows."""
    if not rows:
        return rows, []
    gpu = rows[-1].get("gpu")
    return [r for r in rows if r.get("gpu") == gpu], [r for r in rows if r.get("gpu") != gpu]


def key(row):
    return row["shape"].split()[0], row["impl"], row["pass"]


def with_reruns(rows, folder):
    """(rows, apart): a run folder's train-step rows, a rerun/ CSV's row replacing the first call's of its stage, impl
    and pass, unless on a GPU no first-call row names (apart: left out; no ratio mixes calls or GPUs either)."""
    reruns, gpus = [], {r.get("gpu") for r in rows}
    for path in sorted(glob.glob(os.path.join(glob.escape(folder), "rerun", "*.csv"))):
        reruns += [r for r in read(path) or [] if r.get("bench") == "train_step"]
    apart = [r for r in reruns if gpus and r.get("gpu") not in gpus]
    reruns = [r for r in reruns if r not in apart]
    redone = {key(r) for r in reruns}
    return [r for r in rows if key(r) not in redone] + reruns, apart


def train_step_rows(folder):
    """(bench_train_step.csv's rows with the folder's reruns in place and in today's impl names, legacy, the rerun
    rows left out for another GPU), or (None, False, []) without that file."""
    rows = read(os.path.join(folder, "bench_train_step.csv"))
    if rows is None:
        return None, False, []
    rows, apart = with_reruns(rows, folder)
    return (*legacy_rows(rows), apart)

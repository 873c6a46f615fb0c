"""Copy a fetched GPU run into the repository's results: ``python -m benchmarks.summarize --dir <fetched $OUT>
--archive benchmarks/results`` calls ``archive``, which files the run under <date>-<gpu>/ with a README naming
what ran, the card and the commit (the figures themselves are the run's files, unchanged)."""
import csv
import os
import re
import shutil
import tarfile


def _rows(path):
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _archived_commit(folder):
    """The commit an archive folder's README names, "" for a folder without one (not an archive: never written
    into), None where there is no folder (a new archive). The same commit is the same run, archived again."""
    if not os.path.exists(folder):
        return None
    try:
        with open(os.path.join(folder, "README.md")) as f:
            found = re.search(r"^- commit: (\S+)", f.read(), re.M)
    except OSError:
        return ""
    return found.group(1) if found else ""


def archive(src, root):
    """Copy a fetched GPU run into root/<date>-<gpu>/ with a README; returns the folder."""
    rows = []
    for name in ("bench_train_step.csv", "bench_attention.csv", "bench_masked_ce.csv", "bench_contrastive.csv"):
        rows += _rows(os.path.join(src, name))
    meta = next((r for r in rows if r.get("gpu")), {"gpu": "unknown", "date": "unknown", "commit": "unknown"})
    slug = re.sub(r"[^A-Za-z0-9]+", "-", meta["gpu"].replace("NVIDIA", "")).strip("-").lower() or "gpu"
    dst = os.path.join(root, f"{meta['date']}-{slug}")
    if _archived_commit(dst) not in (None, meta["commit"]):  # another run of that day on that card: beside it
        dst = f"{dst}-{meta['commit']}"
        if _archived_commit(dst) not in (None, meta["commit"]):
            raise FileExistsError(f"{dst} holds another run's archive; archive this one elsewhere")
    os.makedirs(dst, exist_ok=True)
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if name == "results.tar.gz":
            with tarfile.open(path) as tar:
                for m in tar.getmembers():
                    base = os.path.basename(m.name)
                    if (m.isfile() and base.endswith((".png", ".txt", ".tsv")) and "/assets/" not in m.name
                            and base != "summary_stdout.txt"):
                        with tar.extractfile(m) as f_in, open(os.path.join(dst, base), "wb") as f_out:
                            shutil.copyfileobj(f_in, f_out)
        elif os.path.isfile(path):
            shutil.copy(path, os.path.join(dst, name))
    summary = ""
    if os.path.isfile(os.path.join(dst, "summary.md")):
        with open(os.path.join(dst, "summary.md")) as f:
            summary = f.read()
    files = sorted(n for n in os.listdir(dst) if n != "README.md")
    with open(os.path.join(dst, "README.md"), "w") as f:
        f.write(f"# GPU run {meta['date']} on {meta['gpu']}\n\n"
                f"- what ran: `bash benchmarks/gpu_run.sh` in one call: bf16 `gpu_check()` of each kernel and the "
                f"GPU-marked tests, `benchmarks/bench_attention.py`, `bench_masked_ce.py`, `bench_contrastive.py`, "
                f"`bench_train_step.py` (with profiler), then `benchmarks/summarize.py`\n"
                f"- card: {meta['gpu']} (versions in env.txt)\n- commit: {meta['commit']}\n"
                f"- files: {', '.join(files)}\n\n{summary}")
    return dst

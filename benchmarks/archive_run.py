"""Copy a fetched GPU run into the repository's results: ``python -m benchmarks.summarize --dir <fetched $OUT>
--archive benchmarks/results`` calls ``archive``, which files the run under <date>-<gpu>/ with a README naming
what ran (from the call's steps.tsv: what ran, timed out, failed, was skipped), the card and the commit (the
figures themselves are the run's files, unchanged)."""
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


def step_log(path):
    """gpu_run.sh's steps.tsv as [(name, verdict, seconds, why)]: verdict ok, TIMEOUT, TIMEOUT (killed),
    SKIPPED or FAILED rc=N; [] without the file."""
    if not path or not os.path.isfile(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 3:
                rc = parts[1]
                verdict = {"0": "ok", "124": "TIMEOUT", "137": "TIMEOUT (killed)", "skipped": "SKIPPED"}.get(
                    rc, f"FAILED rc={rc}")
                out.append((parts[0], verdict, parts[2], parts[3] if len(parts) > 3 else ""))
    return out


def steps_notes(path):
    """The summary's note lines of the step log: one per step, its verdict, seconds and reason."""
    return [f"- step {name}: {verdict} in {secs} s" + (f" ({why})" if why else "")
            for name, verdict, secs, why in step_log(path)]


def what_ran(steps):
    """The README's "what ran" line from the call's step log (step_log): the steps that ran to the end, those
    that timed out, failed or were skipped, each with its seconds or its reason, in the order they came."""
    if not steps:
        return "`bash benchmarks/gpu_run.sh`, steps not recorded (no steps.tsv in the run)"
    groups = {"ran": [], "timed out": [], "failed": [], "skipped": []}
    for name, verdict, secs, why in steps:
        if verdict == "ok":
            groups["ran"].append(f"`{name}` ({secs} s)")
        elif verdict.startswith("TIMEOUT"):
            groups["timed out"].append(f"`{name}` ({secs} s{', killed' if 'killed' in verdict else ''})")
        elif verdict == "SKIPPED":
            groups["skipped"].append(f"`{name}`" + (f" ({why})" if why else ""))
        else:
            groups["failed"].append(f"`{name}` ({verdict.split()[-1]}, {secs} s)")
    parts = [f"{k}: {', '.join(v)}" for k, v in groups.items() if v]
    return "`bash benchmarks/gpu_run.sh` in one call (steps.tsv): " + "; ".join(parts)


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
                f"- what ran: {what_ran(step_log(os.path.join(dst, 'steps.tsv')))}\n"
                f"- card: {meta['gpu']} (versions in env.txt)\n- commit: {meta['commit']}\n"
                f"- files: {', '.join(files)}\n\n{summary}")
    return dst

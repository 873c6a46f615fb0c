"""``python -m llm2vec_kernels.gpu_check [--list] [--json PATH] [--per-op-s S] [NAME ...]``: run the GPU checks.

No NAME runs every check in registry order. Prints ``gpu_check NAME: k/n ok (t s)`` per check and every failed
row; ``--json`` writes {name: rows or {"error": ...}} after each check, so a timeout keeps what finished;
``--per-op-s`` stops a check that runs longer (SIGALRM) and records the timeout as its error.
Exit status: 0 every row ok, 1 a row failed or a check raised, 2 bad arguments or no CUDA device (one line
on stderr; each check's refusal is still printed and, with ``--json``, recorded as its error).
"""
import argparse
import json
import math
import os
import signal
import sys
import tempfile
import time
import traceback

from . import CHECKS, NeedsCuda, check_function


class _OpTimeout(Exception):
    pass


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v if isinstance(v, (int, float, str, bool)) or v is None else str(v)


def _run_one(name, per_op_s):
    def alarm(signum, frame):
        raise _OpTimeout(f"gpu_check exceeded {per_op_s}s")

    fn = check_function(name)
    if per_op_s:
        signal.signal(signal.SIGALRM, alarm)
        signal.alarm(per_op_s)
    try:
        rows = fn()
    finally:
        if per_op_s:
            signal.alarm(0)
    return [{k: _clean(v) for k, v in dict(r).items()} for r in rows]


class _Parser(argparse.ArgumentParser):
    """A usage error in one line on stderr and exit 2 (argparse's own prints its usage block first)."""

    def error(self, message):
        print(f"llm2vec_kernels.gpu_check: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def _unwritable(path):
    """Why ``path`` takes no file (empty, a folder, its folder missing or read-only: tried), else None."""
    if not path:
        return "an empty path"
    if os.path.isdir(path):
        return f"{path} is a folder"
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=folder)
    except OSError as e:
        return f"{path}: its folder {folder} cannot be written ({e.strerror or e})"
    os.close(fd)
    os.remove(probe)
    return None


def main(argv=None):
    ap = _Parser(prog="python -m llm2vec_kernels.gpu_check", description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", metavar="NAME", help=f"checks to run (default all): {', '.join(CHECKS)}")
    ap.add_argument("--list", action="store_true", help="print the check names, one a line, and exit")
    ap.add_argument("--json", metavar="PATH", help="write the rows here")
    ap.add_argument("--per-op-s", type=int, default=0, metavar="S", help="time limit per check (0: none)")
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(CHECKS))
        return 0
    if args.json is not None and _unwritable(args.json):  # said now, not after the checks ran
        print(f"llm2vec_kernels.gpu_check: --json {_unwritable(args.json)}", file=sys.stderr)
        return 2
    unknown = [n for n in args.names if n not in CHECKS]
    if unknown or args.per_op_s < 0:
        what = f"unknown check(s) {', '.join(unknown)}" if unknown else "--per-op-s must be >= 0"
        print(f"llm2vec_kernels.gpu_check: {what}; checks: {', '.join(CHECKS)}", file=sys.stderr)
        return 2
    result, failed, no_cuda = {}, False, False
    for name in args.names or CHECKS:
        t0 = time.time()
        try:
            result[name] = _run_one(name, args.per_op_s)
        except NeedsCuda as exc:
            no_cuda = True
            result[name] = {"error": f"NeedsCuda: {exc}"}
        except Exception as exc:
            traceback.print_exc()
            result[name] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
        res = result[name]
        skipped = [r for r in res if r.get("skipped")] if isinstance(res, list) else []
        checked = [r for r in res if not r.get("skipped")] if isinstance(res, list) else None
        bad = [r for r in checked if not r.get("ok")] if checked is not None else None
        failed |= bad is None or bool(bad)
        print(f"gpu_check {name}: " + (f"{len(checked) - len(bad)}/{len(checked)} ok" if bad is not None else res["error"])
              + (f", {len(skipped)} case(s) NOT RUN ({skipped[0]['skipped']}): "
                 + ", ".join(str(r.get("case")) for r in skipped) if skipped else "")
              + f" ({time.time() - t0:.1f}s)", flush=True)
        for r in bad or ():
            print("   FAIL", r, flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    if no_cuda:
        print("llm2vec_kernels.gpu_check: the GPU checks need CUDA (no CUDA device here)", file=sys.stderr)
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

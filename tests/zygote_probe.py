"""What a process sees at its start, for tests/test_zygote.py: run as ``python [-u] -m tests.zygote_probe MODE``
both as a real subprocess and from tests/zygote.py's server, the two must print the same."""
import json
import os
import sys

START = {
    "argv": sys.argv,
    "orig_argv": sys.orig_argv,
    "executable": sys.executable,
    "cwd": os.getcwd(),
    "env": dict(os.environ),
    "path0": sys.path[0],
    "path": sys.path,
    "file": __file__,
    "name": __name__,
    "spec": getattr(__spec__, "name", None),
    "main_file": getattr(sys.modules["__main__"], "__file__", None),
    "engine_loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("engine", "llm2vec_kernels", "deepspeed")),
    "stdio": [None if s is None else [s.encoding, s.errors, s.line_buffering, s.write_through, type(s.buffer).__name__]
              for s in (sys.stdin, sys.stdout, sys.stderr)],
    "umask": os.umask(0o022),
}
os.umask(START["umask"])
import signal  # noqa: E402

START["signals"] = {s.name: str(signal.getsignal(s)) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE,
                                                               signal.SIGXFSZ, signal.SIGCHLD, signal.SIGHUP,
                                                               signal.SIGQUIT, signal.SIGUSR1)}
START["torch_preloaded"] = "torch" in sys.modules


def main():
    mode = sys.argv[1]
    if mode == "start":
        print(json.dumps(START))
        return
    if mode == "exit0":
        print("out")
        print("err", file=sys.stderr)
        sys.exit(0)
    if mode == "exit3":
        print("three")
        sys.exit(3)
    if mode == "exitmsg":
        sys.exit("a message")
    if mode == "raise":
        print("before")
        raise ValueError("boom")
    if mode == "interleave":
        for i in range(5):
            print(f"out{i}")
            print(f"err{i}", file=sys.stderr)
        sys.stdout.write("no newline")
        return
    if mode == "buffered":  # without -u the two streams reach a shared file in another order
        for i in range(3):
            print(f"out{i}")
            print(f"err{i}", file=sys.stderr)
        return
    if mode == "grandchild":
        import subprocess

        r = subprocess.run([sys.executable, "-c", "import os, sys; print(os.environ['GRAND'], sys.argv[1:])", "x"],
                           env=dict(os.environ, GRAND="g"), capture_output=True, text=True)
        print(r.returncode, r.stdout.strip())
        return
    if mode == "sleep":
        print("sleeping" + (f" pid {os.getpid()}" if "--pid" in sys.argv else ""), flush=True)
        import time

        time.sleep(120)
        return
    if mode == "atexit":
        import atexit

        atexit.register(lambda: print("at exit"))
        sys.stdout.write("partial")
        return
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()

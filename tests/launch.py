"""The multi-rank tests' launcher: DeepSpeed's single-node launch, less its overhead.

``python -m deepspeed.launcher.runner --num_gpus N --master_port P script args`` starts an interpreter that
imports deepspeed, which starts ``deepspeed.launcher.launch`` in another one (importing deepspeed again), which
spawns the N ranks and polls them once a second. On this 2-core machine that costs about 5 s a launch before the
ranks do anything. This module does what those two processes do for one node, in one light process:

* rank r runs ``python -u script --local_rank=r args`` with RANK=r, LOCAL_RANK=r, WORLD_SIZE=LOCAL_SIZE=N,
  CROSS_RANK=0, CROSS_SIZE=1, MASTER_ADDR, MASTER_PORT and CUDA_VISIBLE_DEVICES=0,...,N-1 over the caller's
  environment;
* the first rank to exit non-zero has every rank's process tree terminated (killed after 30 s) and the launcher
  exits with that rank's code; otherwise it exits 0 once all ranks have.

``tests/test_launch.py`` holds the equivalence against the real launcher on a script that records what each rank
sees, and on a rank that fails while the other waits. The runs whose subject is the launch itself (a rank killed
mid-run, in test_train) keep the real launcher, as does every command the README gives users.

Unlike DeepSpeed's single-node runner, a SIGTERM or SIGINT to this process is passed on to the ranks.
"""
import argparse
import os
import signal
import subprocess
import sys
import time

MASTER_ADDR = "127.0.0.1"
POLL_S = 0.02


def rank_commands(nproc, port, script, script_args, base_env):
    """[(argv, env)] for each local rank, as deepspeed.launcher.launch builds them on a single node."""
    env = dict(base_env)
    env.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # what importing deepspeed leaves in its launcher's env
    env.update(MASTER_ADDR=MASTER_ADDR, MASTER_PORT=str(port), WORLD_SIZE=str(nproc), CROSS_RANK="0",
               CROSS_SIZE="1", LOCAL_SIZE=str(nproc), CUDA_VISIBLE_DEVICES=",".join(map(str, range(nproc))))
    out = []
    for rank in range(nproc):
        e = dict(env, RANK=str(rank), LOCAL_RANK=str(rank))
        out.append(([sys.executable, "-u", script, f"--local_rank={rank}", *script_args], e))
    return out


def _spawn(cmd, env, zygote_dir):
    if zygote_dir:
        from tests import zygote

        zygote.SERVERS.attach(zygote_dir)
        return zygote.popen(cmd, env=env)
    return subprocess.Popen(cmd, env=env)


def _terminate(procs):
    import psutil  # a deepspeed dependency, imported only on the failure path

    tree = []
    for p in procs:
        try:
            parent = psutil.Process(p.pid)
            tree += parent.children(recursive=True) + [parent]
        except psutil.NoSuchProcess:
            pass
    for p in tree:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=30)
    for p in alive:
        p.kill()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num_gpus", type=int, required=True)
    ap.add_argument("--master_port", type=int, required=True)
    ap.add_argument("script")
    ap.add_argument("script_args", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    # Under the tests (helpers.run_cmd), the folder of tests/zygote.py's servers: a rank that runs engine/train.py
    # forks from one (same argv, environment and stdio); the ranks never see the variable.
    zygote_dir = os.environ.pop("LLM2VEC_TEST_ZYGOTE_DIR", None)
    procs = [_spawn(cmd, env, zygote_dir)
             for cmd, env in rank_commands(args.num_gpus, args.master_port, args.script, args.script_args, os.environ)]

    def on_signal(signum, frame):
        _terminate(procs)
        sys.exit(1)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    running = list(procs)
    while running:
        for p in list(running):
            code = p.poll()
            if code is None:
                continue
            if code != 0:
                _terminate(procs)
                sys.exit(code)
            running.remove(p)
        time.sleep(POLL_S)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""tests/launch.py, the multi-rank tests' launcher, against DeepSpeed's own: each rank gets the same argv and the same
environment, and a failing rank ends the launch the same way (its exit code, the other rank terminated)."""
import json
import sys
import time

import pytest

from engine.distributed import free_port

from .helpers import light_launch_cmd, real_launch_cmd, run_cmd

pytestmark = pytest.mark.slow

# Each rank records its argv, environment and pid. Rank 1 then waits for rank 0's record and fails with exit 3;
# rank 0 waits far longer than the launch may take, so only the launcher's failure rule can end it.
RANK_SCRIPT = """
import json, os, sys, time
out, rank = os.environ["RECORD_DIR"], os.environ["RANK"]
with open(os.path.join(out, f"rank{rank}.tmp"), "w") as f:
    json.dump({"exe": sys.executable, "argv": sys.argv[1:], "env": dict(os.environ), "pid": os.getpid()}, f)
os.replace(os.path.join(out, f"rank{rank}.tmp"), os.path.join(out, f"rank{rank}.json"))
if rank == "1":
    while not os.path.exists(os.path.join(out, "rank0.json")):
        time.sleep(0.01)
    sys.exit(3)
time.sleep(300)
"""


def _gone(pid):
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _launch(tmp_path, name, make_cmd):
    script, out = tmp_path / "rank.py", tmp_path / name
    script.write_text(RANK_SCRIPT)
    out.mkdir()
    port = free_port()
    start = time.monotonic()
    r = run_cmd(make_cmd(2, port, str(script), "--flag", "k=v"), env={"RECORD_DIR": str(out)}, timeout=120)
    took = time.monotonic() - start
    records = [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]
    return r, took, port, records


def test_the_light_launcher_gives_the_ranks_what_deepspeeds_gives_them_and_fails_the_same_way(tmp_path):
    got = {name: _launch(tmp_path, name, make) for name, make in (("deepspeed", real_launch_cmd),
                                                                   ("light", light_launch_cmd))}
    for name, (r, took, port, records) in got.items():
        # rank 1's exit code is the launch's, and rank 0 (asleep for 300 s) was terminated, not waited for
        assert r.returncode == 3, (name, r.stdout[-2000:], r.stderr[-2000:])
        assert took < 100 and _gone(records[0]["pid"]), (name, took)
        for rank, rec in enumerate(records):
            assert rec["argv"] == [f"--local_rank={rank}", "--flag", "k=v"], (name, rec["argv"])
            assert rec["exe"] == sys.executable, (name, rec["exe"])
            env = rec["env"]
            assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["MASTER_PORT"]) == \
                (str(rank), str(rank), "2", str(port)), name
    for rank in range(2):
        ds, light = (got[name][3][rank]["env"] for name in ("deepspeed", "light"))
        for env, name in ((ds, "deepspeed"), (light, "light")):
            env.pop("RECORD_DIR"), env.pop("MASTER_PORT")  # this test's own, and the port each launch was given
        assert light == ds, {k: (ds.get(k), light.get(k)) for k in set(ds) | set(light) if ds.get(k) != light.get(k)}

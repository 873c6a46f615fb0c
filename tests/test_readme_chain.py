"""The README's commands connect (issue 23): each one reads what an earlier one wrote.

``test_readme_paths_connect`` walks every command and Python snippet of the README in order, without running them:
each folder a command reads (``--model``, ``model.adapters`` given or in its config, ``from_pretrained`` /
``SentenceTransformer`` paths) must be one an earlier command writes (a run's ``output_dir``, an export's ``--out``).
``test_readme_quick_start_chain_runs`` runs the quick-start block itself (MNTP -> SimCSE -> evaluate -> export ->
SentenceTransformer) in a plain ``git clone`` (committed state only) on the tiny configs: the only edits are
``configs/smollm2-135m/`` -> ``configs/tiny/``, 6 steps a stage and one process instead of two ranks.
"""
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import yaml

from .helpers import ROOT, run_cmd

README = os.path.join(ROOT, "README.md")


def _blocks(lang):
    with open(README) as f:
        return re.findall(rf"```{lang}\n(.*?)```", f.read(), re.S)


def _commands(block):
    """Shell commands of a block: continuation lines joined, comments, blank and ``pip`` lines dropped, ``&&``
    chains split."""
    text = block.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.split(" # ")[0].strip() if not line.lstrip().startswith("python -c") else line.strip()
        if not line or line.startswith("#"):
            continue
        out += [c.strip() for c in line.split(" && ") if c.strip() and not c.strip().startswith("pip ")]
    return out


def _train_io(argv):
    """(output_dir, adapters read) of an ``engine/train.py`` command line."""
    cfg_path = argv[argv.index("--config") + 1]
    with open(os.path.join(ROOT, cfg_path)) as f:
        cfg = yaml.safe_load(f)
    overrides = dict(a.split("=", 1) for a in argv if "=" in a and not a.startswith("-"))
    out = overrides.get("output_dir", cfg.get("output_dir"))
    adapters = overrides.get("model.adapters")
    adapters = [a for a in adapters.strip("[]").split(",") if a] if adapters else \
        (cfg.get("model") or {}).get("adapters") or []
    return out, adapters


def _norm(p):
    return os.path.normpath(p.strip("'\""))


def _reads_and_writes(command):
    argv = shlex.split(command)
    if "engine/train.py" in argv:
        out, adapters = _train_io(argv)
        return [_norm(os.path.dirname(_norm(a))) if os.path.basename(_norm(a)) == "adapter" else _norm(a)
                for a in adapters], [_norm(out)]
    if "engine.evaluate" in argv or "engine.export" in argv:
        reads = [_norm(argv[argv.index("--model") + 1])]
        return reads, [_norm(argv[argv.index("--out") + 1])] if "--out" in argv else []
    if "engine.pick" in argv:  # run folders, not --json's file
        args = argv[argv.index("engine.pick") + 1:]
        return [_norm(a) for i, a in enumerate(args) if not a.startswith("-") and (i == 0 or args[i - 1] != "--json")], []
    if argv[:2] == ["python", "-c"]:
        return [_norm(p) for p in re.findall(r"SentenceTransformer\(['\"]([^'\"]+)['\"]\)", argv[2])], []
    return [], []


def test_readme_paths_connect():
    written, checked = set(), 0
    with open(README) as f:
        text = f.read()
    for lang, block in re.findall(r"```(bash|python)\n(.*?)```", text, re.S):
        if lang == "bash":
            for command in _commands(block):
                reads, writes = _reads_and_writes(command)
                for r in reads:
                    assert r in written, f"README: `{command}` reads {r}, which no earlier command writes"
                    checked += 1
                written.update(writes)
        else:
            for path in re.findall(r"(?:from_pretrained|SentenceTransformer)\(\"([^\"]+)\"", block):
                if path.startswith(("outputs/", "exported/")):
                    assert _norm(path) in written, f"README snippet reads {path}, which no earlier command writes"
                    checked += 1
    assert checked >= 8  # the quick start, the recipe, the Python snippet and the export section all read


def _quick_start():
    for block in _blocks("bash"):
        cmds = _commands(block)
        if any("engine.export" in c for c in cmds) and any("engine/train.py" in c for c in cmds):
            return cmds
    raise AssertionError("the README has no block that runs the chain from training to an export")


def _for_tiny(command):
    argv = shlex.split(command)
    if argv[0] == "deepspeed":  # one process instead of the launcher's ranks
        argv = ["python"] + argv[argv.index("engine/train.py"):]
    argv = [re.sub(r"^eval_every=\d+$", "eval_every=3", re.sub(r"^max_steps=\d+$", "max_steps=6", a))
            .replace("configs/smollm2-135m/", "configs/tiny/") for a in argv]
    return [sys.executable if a == "python" else a for a in argv]


@pytest.mark.slow
def test_readme_quick_start_chain_runs(tmp_path):
    clone = str(tmp_path / "clone")
    subprocess.run(["git", "clone", "-q", ROOT, clone], check=True)
    commands = _quick_start()
    kinds = [next((k for k in ("sentence_transformers", "train.py", "engine.evaluate", "engine.export") if k in c), c)
             for c in commands]
    assert kinds == ["train.py", "train.py", "engine.evaluate", "engine.export", "sentence_transformers"], kinds
    # The tiny configs score dev every 3 of their 6 steps; the README's own SimCSE command must score dev too, or
    # its run has no best/ for evaluate and export to take, as the README says they do
    from engine.config import load_config

    argv = shlex.split(commands[1])
    real = load_config(argv[argv.index("--config") + 1], [a for a in argv if "=" in a and not a.startswith("-")])
    assert real.eval_data and 0 < real.eval_every <= real.max_steps, (real.eval_every, real.max_steps)
    results = []
    for command in commands:
        # the engine's commands import the clone's engine/ as a real process in the clone would (cwd first on
        # sys.path for -m, train.py its own root), and fork from the zygote there; the python -c snippet needs it said
        env = {"PYTHONPATH": clone} if "-c" in shlex.split(command) else None
        r = run_cmd(_for_tiny(command), cwd=clone, env=env, timeout=600)
        assert r.returncode == 0, (command, r.stdout[-2000:], r.stderr[-4000:])
        results.append(r)
    evaluate, export, st = results[2:]
    assert "using best/" in evaluate.stderr and "using best/" in export.stderr  # the run's selected adapter
    assert 0 < json.loads(evaluate.stdout.strip().splitlines()[-1])["pairs"]
    assert st.stdout.strip().splitlines()[-1] == "(1, 64)"  # one text, the tiny model's width


def test_every_readme_training_command_with_overrides_plans():
    """Each `engine/train.py` command of the README that gives overrides loads its config with them and dry-runs at
    its rank count (test_dry_run plans every shipped config as shipped; test_readme_quick_start_chain_runs runs the
    quick start on the tiny configs): a README override the config no longer takes fails here."""
    from engine.train import main

    planned = 0
    for block in _blocks("bash"):
        for command in _commands(block):
            argv = shlex.split(command)
            if "engine/train.py" not in argv:
                continue
            args = argv[argv.index("engine/train.py") + 1:]
            if not any("=" in a and not a.startswith("-") for a in args):
                continue  # the config as shipped: test_dry_run
            world = argv[argv.index("--num_gpus") + 1] if "--num_gpus" in argv else "1"
            assert main([*args, "--dry-run", "--world", world]) == 0, command
            planned += 1
    assert planned >= 5  # the quick start's two stages and the three MNTP seeds

"""Train one LLM2Vec stage.

    deepspeed [--num_gpus N | --hostfile H] engine/train.py --config configs/X.yaml [key=value ...]
    python engine/train.py --config configs/X.yaml [key=value ...]        # one process

Exit codes: 0 done; 2 bad input (config, data, model, an output_dir that cannot be a run folder, or a different
run in output_dir), one line on stderr; 3 the run diverged (max_nonfinite_steps non-finite steps in a row).
A run that fails leaves no empty output_dir (nor empty parents) that it created behind.
"""
import argparse
import os
import sys
import tempfile

if __package__ in (None, ""):  # run as a script: make the repo importable without installing it
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.cli import ArgumentParser, fail, missing_folders, remove_empty  # noqa: E402
from engine.config import ConfigError, load_config  # noqa: E402


def prepare_output_dir(path):
    """Check that ``path`` can be the run's folder, creating it (and its parents) now, before any data or model
    loads; returns the folders created, for ``remove_empty`` when the run fails. Raises ConfigError."""
    if not path or not str(path).strip():
        raise ConfigError("output_dir is empty: name the run's folder")
    if os.path.islink(path) and not os.path.exists(path):
        raise ConfigError(f"output_dir {path} is a link to nothing ({os.readlink(path)})")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ConfigError(f"output_dir {path} is a file, not a folder")
    created = missing_folders(path)
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        remove_empty(created)
        raise ConfigError(f"output_dir {path} cannot be written: {e.strerror or e}") from None
    return created


def main(argv=None):
    ap = ArgumentParser(prog="engine/train.py", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML run config")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    ap.add_argument("overrides", nargs="*", help="key=value overrides, dotted for sections (lora.r=8)")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        created = prepare_output_dir(cfg.output_dir)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        return _train(cfg)
    finally:
        if os.environ.get("RANK", "0") == "0":
            remove_empty(created)  # nothing written (a failed run): no empty folder left behind


def _train(cfg):
    from engine.bidirectional import UnsupportedArchitectureError
    from engine.data import DataError
    from engine.modeling import ModelLoadError
    from engine.trainer import NonFiniteError, train

    try:
        train(cfg)
    except (DataError, ConfigError, UnsupportedArchitectureError, ModelLoadError, FileNotFoundError) as e:
        return fail(e)
    except NonFiniteError as e:  # a diverged run: exit 3, distinct from bad input
        fail(e)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())

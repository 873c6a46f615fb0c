"""Train one LLM2Vec stage.

    deepspeed [--num_gpus N | --hostfile H] engine/train.py --config configs/X.yaml [key=value ...]
    python engine/train.py --config configs/X.yaml [key=value ...]        # one process

Exit codes: 0 done; 2 bad input (config, data, model, a different run in output_dir, output_dir held by another
live run, a checkpoint file that could run code); 3 the run diverged
(max_nonfinite_steps non-finite steps in a row).
"""
import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repo importable without installing it
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.config import ConfigError, load_config  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML run config")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    ap.add_argument("overrides", nargs="*", help="key=value overrides, dotted for sections (lora.r=8)")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from engine.bidirectional import UnsupportedArchitectureError
    from engine.data import DataError
    from engine.modeling import ModelLoadError
    from engine.trainer import NonFiniteError, train

    try:
        train(cfg)
    except (DataError, ConfigError, UnsupportedArchitectureError, ModelLoadError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:  # a diverged run: exit 3, distinct from bad input
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())

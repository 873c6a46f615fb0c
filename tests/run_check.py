"""``python -m tests.run_check tests.<module>:<function> [args...]``: run a check function of a test module in a
process of its own (DeepSpeed's process group and its globals must not leak into the pytest process), exiting with
what it returns. The `-m` form lets tests/helpers.py run_cmd fork it from tests/zygote.py's server, where a
``python -c "from tests.x import f; f()"`` child paid the import of torch, transformers and peft each time."""
import importlib
import sys


def main():
    if len(sys.argv) < 2 or ":" not in sys.argv[1]:
        sys.exit("usage: python -m tests.run_check tests.<module>:<function> [args...]")
    module, function = sys.argv[1].split(":", 1)
    sys.argv = [sys.argv[0], *sys.argv[2:]]
    sys.exit(getattr(importlib.import_module(module), function)())


if __name__ == "__main__":
    main()

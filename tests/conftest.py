import os

# Triton decides between compiling and interpreting when a kernel is decorated, so the interpreter
# must be switched on before anything imports `kernels`. On a CUDA machine (GPU tests) leave it off.
if os.environ.get("LLM2VEC_TEST_GPU", "0") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No model hub is reachable here or in CI: a test that reaches for one fails at once instead of retrying for minutes.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") == "0":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run with LLM2VEC_TEST_GPU=1 on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

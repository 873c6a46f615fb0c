import os

# Triton decides between compiling and interpreting when a kernel is decorated, so the interpreter
# must be switched on before anything imports `llm2vec_kernels`. On a CUDA machine (GPU tests) leave it off.
if os.environ.get("LLM2VEC_TEST_GPU", "0") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No model hub is reachable here or in CI: a test that reaches for one fails at once instead of retrying for minutes.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The item cache (engine.token_cache) of this test session, children included: tests never fill the user's cache
# nor reuse an entry a previous session left.
if "LLM2VEC_ENGINE_TOKEN_CACHE" not in os.environ:
    import tempfile

    os.environ["LLM2VEC_ENGINE_TOKEN_CACHE"] = tempfile.mkdtemp(prefix="llm2vec-test-token-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers.utils.logging  # noqa: E402

# transformers gives its log handler the sys.stderr of the moment it is first asked for a logger. Inside a test that
# is the test's captured stream, closed when the test ends: a later test's transformers warning then fails as a
# "--- Logging error ---" traceback on stderr (order-dependent: tests/test_cli_errors.py). Ask now, at collection,
# when sys.stderr is the session's.
transformers.utils.logging.get_logger("transformers")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") == "0":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run with LLM2VEC_TEST_GPU=1 on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

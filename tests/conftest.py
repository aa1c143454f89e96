import atexit
import os
import shutil
import sys
import tempfile

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # golden_utils, script_loader

from script_loader import load_benchmark_script  # noqa: E402

# The automatic backend choice caches its measurements per machine: tests (and their subprocesses) use a
# throw-away cache, never the user's ~/.cache.
if "FUSIONBLOCKS_CACHE_DIR" not in os.environ:
    os.environ["FUSIONBLOCKS_CACHE_DIR"] = tempfile.mkdtemp(prefix="fusionblocks-test-cache-")
    atexit.register(shutil.rmtree, os.environ["FUSIONBLOCKS_CACHE_DIR"], ignore_errors=True)

# Triton reads TRITON_INTERPRET when it is imported; without a GPU the Triton kernels are tested on the interpreter.
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (`-n N`) the workers share the cores: each gets its share of torch's threads instead of all of
# them (N workers x all cores would oversubscribe the machine). Tests that need more threads set them themselves.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
if _WORKERS > 1:
    torch.set_num_threads(max(1, torch.get_num_threads() // _WORKERS))


EXPENSIVE_ENV = "FUSIONBLOCKS_SLOW_TESTS"

MAX_AUTO_WORKERS = 8
"""``-n auto`` takes xdist's own count (one worker per core) up to this many: every worker imports torch and builds
whole models, and with ``--dist loadfile`` the longest test files bound the wall time long before that."""


@pytest.hookimpl(optionalhook=True, hookwrapper=True)
def pytest_xdist_auto_num_workers(config):
    outcome = yield
    outcome.force_result(min(outcome.get_result(), MAX_AUTO_WORKERS))


def pytest_collection_modifyitems(config, items):
    """GPU tests skip without CUDA; ``expensive`` tests (minutes each on a 2-core CPU: whole-network inductor
    compiles and ONNX exports of the wide models) run only with ``FUSIONBLOCKS_SLOW_TESTS=1``."""
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_expensive = pytest.mark.skip(reason=f"expensive (minutes on a 2-core CPU); set {EXPENSIVE_ENV}=1 to run it")
    run_expensive = bool(os.environ.get(EXPENSIVE_ENV))
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "expensive" in item.keywords and not run_expensive:
            item.add_marker(skip_expensive)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["reference", "auto"])
def dispatch_backend(request, monkeypatch):
    """Run a test once on the reference ops (the spec) and once on whatever automatic dispatch picks here."""
    from fusionblocks.ops.dispatch import ENV_VAR

    if request.param == "reference":
        monkeypatch.setenv(ENV_VAR, "reference")
    else:
        monkeypatch.delenv(ENV_VAR, raising=False)
    return request.param


@pytest.fixture
def one_thread():
    """Single-threaded torch for the test: steadier and faster on a shared 2-core machine, where
    OpenMP start-up costs more than tiny ops and threads fight for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def compile_models_script():
    """``benchmarks/compile_models.py`` as a module."""
    return load_benchmark_script("compile_models")

"""pytest-benchmark options for the fusionblocks benchmark suite.

``pytest benchmarks/`` runs the small (``--quick``) shapes; ``--fb-shapes paper`` runs the papers'
shapes (batch 32, 224² input stages). ``--fb-dtype bf16`` picks the dtype (default fp32; bf16 on CUDA is
the training setting). Compare two runs with ``--benchmark-save NAME`` / ``--benchmark-compare``.
"""
import pytest


def pytest_addoption(parser):
    group = parser.getgroup("fusionblocks")
    group.addoption("--fb-shapes", choices=("quick", "paper"), default="quick",
                    help="benchmark shapes: quick (small) or paper (batch 32, 224² stages)")
    group.addoption("--fb-dtype", default="fp32", help="fp32, bf16 or fp16")
    group.addoption("--fb-device", default=None, help="cuda or cpu (default: cuda when available)")


@pytest.fixture(scope="session")
def fb_options(request):
    import torch

    from fusionblocks.bench import parse_dtype

    device = request.config.getoption("--fb-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    return {
        "quick": request.config.getoption("--fb-shapes") == "quick",
        "dtype": parse_dtype(request.config.getoption("--fb-dtype")),
        "device": torch.device(device),
    }

"""Every model trains under autocast, on CPU and under CUDA's autocast policy emulated on CPU.

CUDA's autocast runs the norms and softmax in float32 (CPU's keeps them in the input's dtype), so a block there gets a
float32 input while its linear layers give bfloat16. HEMF's attention once mixed the two (rotary tables cast to the
input's dtype) and failed with "expected q, k, v of one floating dtype" on the GPU only.
"""
import pytest
import torch
import torch.nn.functional as F

from fusionblocks import create_model

SMALL = {
    "hifuse_tiny": dict(dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8)),
    "hemf": dict(dims=(16, 32, 64, 128), num_heads=4),
    "hatr_conv2d": dict(embed_dim=32, vit_depth=1, vit_heads=2),
}
CUDA_FLOAT32_OPS = ("layer_norm", "group_norm", "softmax", "log_softmax")


@pytest.fixture
def cuda_autocast_policy(monkeypatch):
    """Make CPU autocast run ``CUDA_FLOAT32_OPS`` in float32, as CUDA's autocast does; records the calls it cast."""
    cast = []

    def in_float32(name, fn):
        def wrapped(x, *args, **kwargs):
            if not torch.is_autocast_enabled("cpu"):
                return fn(x, *args, **kwargs)
            cast.append(name)
            up = lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
            with torch.autocast("cpu", enabled=False):
                return fn(up(x), *map(up, args), **{k: up(v) for k, v in kwargs.items()})
        return wrapped

    for name in CUDA_FLOAT32_OPS:
        monkeypatch.setattr(F, name, in_float32(name, getattr(F, name)))
    return cast


def _train_step(name: str) -> torch.Tensor:
    torch.manual_seed(0)
    m = create_model(name, num_classes=3, **SMALL[name]).train()
    x = torch.randn(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    y.float().sum().backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    return y


@pytest.mark.parametrize("name", sorted(SMALL))
def test_train_step_under_cpu_autocast(name):
    y = _train_step(name)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


@pytest.mark.parametrize("name", sorted(SMALL))
def test_train_step_under_cuda_autocast_policy(name, cuda_autocast_policy):
    y = _train_step(name)
    assert "layer_norm" in cuda_autocast_policy  # the emulation took effect
    assert torch.isfinite(y.float()).all()

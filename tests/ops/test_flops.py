"""FlopCounterMode counts every backend's attention as the reference (the spec) does, forward and backward.

Without the formulas (fusionblocks/ops/flops.py) a fused kernel's op counted 0 FLOPs, so a model's count followed
the automatic choice. Sizes do not divide evenly; the Triton ops run under the interpreter where it is usable.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import fusionblocks.ops as ops
from fusionblocks.ops import decay_attention, window_attention
from fusionblocks.ops.flops import attention_flops


def _backends():
    out = ["reference"]
    if not ops.explain("decay_attention", torch.randn(1, 1, 6, 4), torch.randn(1, 1, 6, 4), torch.randn(1, 1, 6, 4),
                       torch.zeros(1), hw=(2, 3), mode="full")["cpp"]:
        out.append("cpp")
    try:
        from fusionblocks.ops.triton import window as tw
        from fusionblocks.ops.triton._common import interpreter_defect

        if tw._interpreting() and interpreter_defect() is None:
            out.append("triton")
    except ImportError:
        pass
    return out


BACKENDS = _backends()
DTYPE = torch.float64  # the interpreter's tl.dot handles float64; the count does not depend on the dtype


def _count(fn, leaves, grad: bool) -> int:
    with FlopCounterMode(display=False) as c:
        out = fn()
        if grad:
            out.sum().backward()
    for t in leaves:
        t.grad = None
    return c.get_total_flops()


@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("mode,hw", [("full", (5, 7)), ("decomposed", (5, 7)), ("decomposed", (3, 1))])
def test_decay_counts_equal_the_reference(mode, hw, grad):
    h, w = hw
    b, nh, d = 2, 3, 8
    q, k, v = (torch.randn(b, nh, h * w, d, dtype=DTYPE, requires_grad=grad) for _ in range(3))
    lg = torch.tensor([-0.3, -0.5, -0.9], dtype=DTYPE)
    want = attention_flops(mode, q.shape, h, w) * (3 if grad else 1)
    assert want == 4 * b * nh * d * h * w * (h * w if mode == "full" else h + w) * (3 if grad else 1)
    got = {be: _count(lambda: decay_attention(q, k, v, lg, hw=hw, mode=mode, backend=be), (q, k, v), grad)
           for be in BACKENDS}
    assert got == {be: want for be in BACKENDS}


@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("hw,ws,shift", [((8, 12), 4, 2), ((6, 6), 3, 0)])
def test_window_counts_equal_the_reference(hw, ws, shift, grad):
    h, w = hw
    b, nh, d = 2, 3, 16  # the Triton window kernel takes head dims of 12 and more
    q, k, v = (torch.randn(b, nh, h * w, d, dtype=DTYPE, requires_grad=grad) for _ in range(3))
    table = torch.randn((2 * ws - 1) ** 2, nh, dtype=DTYPE, requires_grad=grad)
    want = 4 * b * nh * d * h * w * ws * ws * (3 if grad else 1)
    got = {be: _count(lambda: window_attention(q, k, v, table, hw=hw, window_size=ws, shift=shift, backend=be),
                      (q, k, v, table), grad)
           for be in BACKENDS}
    assert got == {be: want for be in BACKENDS}


def test_a_model_counts_the_same_whichever_backend_runs(monkeypatch):
    from fusionblocks import create_model

    m = create_model("hemf", num_classes=3, dims=(16, 32, 64, 128), num_heads=4).eval()
    x = torch.randn(1, 3, 64, 64)
    counts = {}
    for be in [b for b in BACKENDS if b != "triton"]:  # a whole model under the interpreter takes minutes
        monkeypatch.setenv("FUSIONBLOCKS_BACKEND", be)
        with torch.no_grad(), FlopCounterMode(display=False) as c:
            m(x)
        counts[be] = c.get_total_flops()
    assert len(set(counts.values())) == 1, counts


@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "fwd+bwd"])
def test_torch_sdpa_on_cpu_counts_its_matrix_products(grad):
    # torch's counter has formulas for its CUDA attention kernels only: on CPU, F.scaled_dot_product_attention (HATR's
    # ViT) counted 0 FLOPs, and `fusionblocks summary hatr_conv2d` said 5.42 instead of 5.66 GFLOPs
    b, nh, n, d = 2, 3, 13, 8
    q, k, v = (torch.randn(b, nh, n, d, requires_grad=grad) for _ in range(3))
    want = 4 * b * nh * n * n * d * (3 if grad else 1)
    assert _count(lambda: F.scaled_dot_product_attention(q, k, v), (q, k, v), grad) == want
    with sdpa_kernel(SDPBackend.MATH):  # torch's unfused path: its bmm's are counted one by one
        assert _count(lambda: F.scaled_dot_product_attention(q, k, v), (q, k, v), grad) == want

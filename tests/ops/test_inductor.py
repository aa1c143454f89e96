"""The ops under ``torch.compile`` with inductor (the default backend), as the blocks call them.

torch 2.14's inductor rewrote the decomposed decay's rank-5 row/column attention with its SDPA pattern
(``_sfdp_replacement_21``) and crashed ("Attempting to permute a tensor of rank 5, but received a permutation
of length 4") under ``no_grad``; the reference now keeps its attention rank 4. One compiled function holds
every op so that the test pays one compilation per mode.
"""
import torch

import fusionblocks.ops as ops

B, HEADS, D, SIDE = 2, 2, 8, 6


def block_like(x, lg, table, backend):
    """q, k, v sliced out of one projection and permuted, as ManhattanSelfAttention / WindowAttention do."""
    n = SIDE * SIDE
    q, k, v = x.reshape(B, n, 3, HEADS, D).permute(2, 0, 3, 1, 4)
    full = ops.decay_attention(q, k, v, lg, hw=(SIDE, SIDE), mode="full", scale=1.0, backend=backend)
    dec = ops.decay_attention(q, k, v, lg, hw=(SIDE, SIDE), mode="decomposed", scale=1.0, backend=backend)
    win = ops.window_attention(q, k, v, table, hw=(SIDE, SIDE), window_size=3, shift=1, backend=backend)
    return full, dec, win


def _inputs(requires_grad=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, SIDE * SIDE, 3 * HEADS * D, generator=g).requires_grad_(requires_grad)
    lg = torch.tensor([-0.3, -0.9]).requires_grad_(requires_grad)
    table = (0.1 * torch.randn(25, HEADS, generator=g)).requires_grad_(requires_grad)
    return x, lg, table


def test_inductor_inference_no_grad(one_thread):
    x, lg, table = _inputs()
    torch._dynamo.reset()
    compiled = torch.compile(block_like, fullgraph=True)
    with torch.no_grad():
        got = compiled(x, lg, table, "reference")
        want = block_like(x, lg, table, "reference")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_inductor_backward_matches_eager(one_thread):
    x, lg, table = _inputs(requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(block_like, fullgraph=True)
    weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)) for i, o in
               enumerate(block_like(x, lg, table, "reference"))]

    def grads(fn):
        out = fn(x, lg, table, "reference")
        loss = sum((o * w).sum() for o, w in zip(out, weights))
        return torch.autograd.grad(loss, (x, lg, table))

    for g, w in zip(grads(compiled), grads(block_like)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)

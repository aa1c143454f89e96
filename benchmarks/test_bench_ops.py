"""pytest-benchmark tests of every op × implementation × pass, driven by :mod:`fusionblocks.bench`.

Each benchmark's group is ``<op> <shape> <dtype> <pass>`` and its name carries the implementation, so
``pytest benchmarks/ --benchmark-group-by=group`` lays implementations side by side and
``--benchmark-compare`` matches the same case across saved runs. Implementations that cannot run here
are skipped with the dispatcher's reasons. Inputs, runners and gradient resets are the engine's, as in
``fusionblocks bench`` (the forward pass sees the inputs detached).

    pytest benchmarks/test_bench_ops.py --benchmark-save=cpu-quick
    pytest benchmarks/test_bench_ops.py --fb-shapes paper --fb-dtype bf16 --benchmark-compare
"""
import pytest
import torch

from fusionblocks import bench


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    quick = metafunc.config.getoption("--fb-shapes") == "quick"
    cases = [
        (op.name, i, impl, p)
        for op in bench.OPS.values()
        for i in range(len(op.shapes(quick)))
        for impl in op.impl_names
        for p in bench.PASSES
    ]
    metafunc.parametrize("case", cases, ids=[f"{o}-{i}-{m}-{p}" for o, i, m, p in cases])


def test_op(benchmark, fb_options, case):
    op, index, impl, pass_ = case
    ob = bench.OPS[op]
    shape, device, dtype = ob.shapes(fb_options["quick"])[index], fb_options["device"], fb_options["dtype"]
    x = ob.make_inputs(shape, device, dtype)
    found = {i.name: i for i in ob.impls(shape, x, device)}
    if found[impl].reasons:
        pytest.skip(f"{impl}: " + "; ".join(found[impl].reasons))
    if impl == "triton" and device.type == "cpu":
        pytest.skip(bench.INTERPRETER_REASON)
    run = bench._runner(found[impl].fn, x if pass_ == "fwd+bwd" else bench._detached(x), pass_)
    grads = bench._grads_of(ob, x) if pass_ == "fwd+bwd" else []

    def call():
        for t in grads:
            t.grad = None
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    call()  # warm-up (compilation, autotuning) outside the measurement
    benchmark.group = f"{op} {bench.shape_str(shape)} {bench.dtype_name(dtype)} {pass_}"
    benchmark.extra_info.update(op=op, impl=impl, shape=shape, dtype=bench.dtype_name(dtype), pass_=pass_,
                                device=bench.device_name(device))
    benchmark(call)

"""The benchmark engine behind ``fusionblocks bench``, ``benchmarks/`` and the per-op GPU scripts.

One concept per module: :mod:`.records` (the record schema, checked with jsonschema), :mod:`.timing`,
:mod:`.memory`, :mod:`.anchors` (SDPA, FlexAttention, compiled reference), :mod:`.cases` (op cases, shape
presets), :mod:`.runner` (side-by-side runs, the per-op scripts), :mod:`.models` (whole networks),
:mod:`.report` (tables, pivot, plot, result files). Every public name is importable from here.

One run times every implementation of every op side by side, in one process, on the same inputs:

* the registered backends of the op (``reference``, ``triton``, ``cpp``, ``cuda``) that can run here,
  asked through :func:`fusionblocks.ops.explain` (those that cannot are listed with the reasons);
* the anchors: ``sdpa`` (``F.scaled_dot_product_attention`` with the bias and masks materialized,
  built from the parameters inside the timed call as a module would) and ``flex`` (FlexAttention with
  a ``score_mod``/``mask_mod``, compiled, CUDA only; eager on CPU in ``smoke`` runs).

``benchmarks/bench_decay_attention.py`` and ``benchmarks/bench_window_attention.py`` (issues 3 and 4) are
thin wrappers over :func:`run` that add their own derived fields (TFLOP/s, HBM bandwidth share);
``benchmarks/bench_cpu.py`` (issue 7) times the ``cpu`` shape preset (:data:`PRESETS`) on CPU.

Definitions, the same everywhere (``benchmarks/results/README.md`` repeats them):

* **Time** (``ms``, :func:`time_ms`): CUDA: :func:`triton.testing.do_bench` median after one explicit
  warm-up call (compilation stays out); input gradients reset between calls. CPU: the implementations
  of a case take turns over interleaved rounds (:func:`time_interleaved_ms`: a block of calls each per
  round, rotating order, after a warm-up call; the median over the rounds of the block means), so that a
  shared machine's load falls on all of them alike; :func:`time_ms` times one function alone. With
  ``rotate > 1`` the timed calls cycle through that many input sets.
* **Peak memory** (``peak_mem_mb``, :func:`peak_mem_mb`): the bytes of the call's own inputs (and module
  parameters and buffers) plus the most memory the call allocates above what was allocated before it
  (outputs, saved activations, gradients), in MiB. Whatever else the process holds (other input sets,
  caches) is not counted. CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats`` minus
  ``memory_allocated`` before; CPU: one extra untimed call under ``torch.profiler`` with
  ``profile_memory=True`` (peak of the running sum of its allocation and free events); ``null`` when
  the profiler cannot report it. The profiler sees every allocation through PyTorch's CPU allocator,
  which is where the compiled ``cpp`` kernels put their outputs, softmax statistics and gradient
  workspaces (``at::empty``/``at::zeros``); it does not see their per-thread tile scratch
  (``std::vector``, under 1 MiB per thread at the benchmarked shapes) nor other non-PyTorch memory
  (BLAS buffers). Cross-check on a 2-core Xeon, 1 thread, issue 7's shapes: the profiler's figure minus
  the inputs agrees with the peak-RSS growth of a fresh process over the same call within 0.6 MiB for
  reference and cpp, fwd and fwd+bwd (e.g. decay full 56²: 489.3 vs 490.1 MiB reference, 1.6 vs 1.8
  MiB cpp). RSS is not used: in one process the allocator reuses freed pages, so it needs a fresh process
  per measurement and still misses memory freed and reused within the call.
* **Records** (:data:`RECORD_SCHEMA`): issue 3's ``{"op", "impl", "shape": {...}, "dtype", "pass", "ms",
  "peak_mem_mb", "device", "torch", "triton"}``. ``triton`` is ``null`` when Triton is not installed;
  ``device`` is :func:`device_name`; the head dimension is ``D`` in every shape. An implementation that
  was run and raised is a record too, with ``"error"`` and ``"ms": null, "peak_mem_mb": null``; one that
  cannot run here at all (the dispatcher's reasons) is not timed and is listed in
  :attr:`BenchResult.skipped` instead. Optional fields: ``max_abs_err``, ``tflops``,
  ``pct_of_dense_bf16_peak``, ``io_mb``, ``gbps``, ``hbm_share`` (the scripts), ``img_per_s``
  (``--model``), ``compile_s``, ``grad_rel_err`` and ``grad_err_ratio`` (``benchmarks/compile_models.py``).
"""
from __future__ import annotations

import argparse
from .anchors import decay_flex, decay_sdpa, reference_compiled, window_flex, window_sdpa
from .cases import (INTERPRETER_REASON, OPS, PRESETS, Impl, OpBench, _log_gamma, _qkv, preset, register_op,
                    resolve_ops)
from .memory import _cpu_alloc_peak_bytes, _tensor_bytes, peak_mem_mb
from .models import run_model
from .records import (ANCHORS, DTYPES, PASSES, RECORD_SCHEMA, RECORDS_SCHEMA, device_name, device_slug, dtype_name,
                      error_text, isa_variant, make_record, parse_dtype, require_validator, triton_version, validate_records,
                      write_json)
from .report import (format_markdown, format_pivot, format_table, plot, shape_str, side_by_side, speedups, table_rows,
                     write_results)
from .runner import (BenchResult, Skipped, _detached, _grads_of, _max_abs_err, _resident, _runner, run, run_case,
                     run_script, script_parser)
from .timing import time_interleaved_ms, time_ms

__all__ = [
    "ANCHORS", "DTYPES", "INTERPRETER_REASON", "OPS", "PASSES", "PRESETS", "RECORD_SCHEMA", "RECORDS_SCHEMA",
    "BenchResult", "Impl", "OpBench", "Skipped",
    "decay_flex", "decay_sdpa", "device_name", "device_slug", "dtype_name", "error_text", "format_markdown",
    "format_pivot", "format_table", "isa_variant", "make_record", "parse_dtype", "peak_mem_mb", "plot", "preset",
    "reference_compiled", "register_op", "require_validator", "resolve_ops", "run", "run_case", "run_model", "run_script",
    "script_parser", "shape_str", "side_by_side", "speedups", "table_rows", "time_interleaved_ms", "time_ms", "triton_version",
    "validate_records", "window_flex", "window_sdpa", "write_json", "write_results",
]

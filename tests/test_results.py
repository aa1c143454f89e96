"""Every committed benchmark result is well formed: the records under ``benchmarks/results/`` pass the
record schema (``bench.validate_records``), and a GPU check's ``determinism.json`` has its fields.

A GPU machine may write records without the schema check (its image has no jsonschema, see
benchmarks/gpu_check.py), so they are checked here, where they are committed.
"""
import json
import os

import pytest

from fusionblocks import bench

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results")
FILES = sorted(os.path.relpath(os.path.join(d, f), RESULTS) for d, _, fs in os.walk(RESULTS) for f in fs if f.endswith(".json"))


def test_results_folder_has_records():
    assert FILES, RESULTS


@pytest.mark.parametrize("name", FILES)
def test_committed_result_is_valid(name):
    with open(os.path.join(RESULTS, name)) as f:
        data = json.load(f)
    if os.path.basename(name) == "determinism.json":
        assert isinstance(data, list) and data, name
        for row in data:
            assert {"op", "impl", "shape", "dtype"} <= set(row), row
            if "error" not in row:
                assert isinstance(row["bitwise_identical"], bool), row
                assert set(row["max_abs_err_vs_float64"]) == set(row["grad_scale"]), row
        return
    pytest.importorskip("jsonschema")  # bench.validate_records checks with it
    bench.validate_records(data)

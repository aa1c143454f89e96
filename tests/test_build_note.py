"""setup.py's build note (fusionblocks/_C_build.json) reaches the cuda backend's reasons."""
import json

import torch

import fusionblocks._build as build
from fusionblocks import ops
from fusionblocks.ops import cpp, cuda


def test_cuda_reason_names_why_the_build_left_cuda_out(tmp_path, monkeypatch):
    note = tmp_path / "_C_build.json"
    note.write_text(json.dumps({"built": True, "cuda": False, "torch": torch.__version__,
                                "cuda_note": "a CUDA torch and nvcc were found but the CUDA build cannot be configured: "
                                             "no GPU is visible", "error": None}))
    monkeypatch.setattr(build, "NOTE", str(note))
    assert build.build_note()["cuda"] is False
    assert build.why_no_cuda() == " (a CUDA torch and nvcc were found but the CUDA build cannot be configured: no GPU is visible)"
    monkeypatch.setattr(cuda, "_BUILD_REASON", build.why_no_cuda())  # what cuda.py reads at import
    q = torch.randn(1, 2, 49, 8)
    reasons = ops.explain("window_attention", q, q, q, torch.zeros(169, 2), hw=(7, 7), window_size=7, shift=0, scale=None)["cuda"]
    if cpp.available() and not cuda.available():  # CI builds _C (and checks it) without CUDA
        assert any("without CUDA kernels (a CUDA torch and nvcc were found but" in r for r in reasons), reasons
    note.write_text("not json")
    assert build.build_note() is None and build.why_no_cuda() == ""


def _setup_namespace(monkeypatch):
    """setup.py's functions, without building or installing anything (FUSIONBLOCKS_NO_EXT, a no-op setup())."""
    import os
    import runpy

    import setuptools

    monkeypatch.setenv("FUSIONBLOCKS_NO_EXT", "1")
    monkeypatch.setattr(setuptools, "setup", lambda **kw: None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return runpy.run_path(os.path.join(root, "setup.py"), run_name="fusionblocks_setup")


def test_toolkit_found_through_an_nvcc_wrapper(tmp_path, monkeypatch):
    # /usr/local/bin/nvcc calling /usr/local/cuda-13.0/bin/nvcc: torch's guess (/usr/local) has no headers
    import os
    import types

    toolkit = tmp_path / "cuda-13.0"
    (toolkit / "include").mkdir(parents=True)
    (toolkit / "include" / "cuda_runtime.h").write_text("")
    wrapper = tmp_path / "local" / "bin" / "nvcc"
    wrapper.parent.mkdir(parents=True)
    wrapper.write_text(f"#!/bin/sh\necho '#$ _HERE_={toolkit}/bin' >&2\necho '#$ TOP={toolkit}/bin/..' >&2\n")
    wrapper.chmod(0o755)
    ns = _setup_namespace(monkeypatch)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    guess = types.SimpleNamespace(CUDA_HOME=str(tmp_path / "local"))
    assert ns["_toolkit_root"](guess, str(wrapper)) == os.path.realpath(toolkit)
    # torch's guess is kept when it has the headers; a TOP without them, or a CUDA_HOME without them, is refused
    assert ns["_toolkit_root"](types.SimpleNamespace(CUDA_HOME=str(toolkit)), str(wrapper)) == str(toolkit)
    (toolkit / "include" / "cuda_runtime.h").unlink()
    assert ns["_toolkit_root"](guess, str(wrapper)) is None
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "local"))
    assert ns["_toolkit_root"](guess, str(wrapper)) is None

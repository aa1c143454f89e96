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

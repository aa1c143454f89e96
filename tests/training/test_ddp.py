"""Multi-process training through torchrun (DDP over gloo on CPU)."""
import json
import shutil
import subprocess
import sys

import pytest


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_torchrun_two_processes(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port,
        "-m", "fusionblocks", "train", "--model", "hatr_conv2d", "--data", "synthetic", "--epochs", "1",
        "--batch-size", "4", "--image-size", "48", "--out", str(out), "--synthetic-samples", "16", "--no-progress",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("trained hatr_conv2d") == 1  # only rank 0 reports and writes
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["epochs"]) == 1 and (out / "best.pt").is_file()
    # the train loss/accuracy are over both processes' shards (8 samples each), not rank 0's alone
    assert m["epochs"][0]["train_samples"] == 16
    # rank 0 refuses the folder (a run is there): every rank ends, with rank 0's message alone, not rank 1 failing
    # in DDP's first collective ("Connection closed by peer")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0
    assert r.stderr.count("already holds a run of this configuration") == 1, r.stderr[-3000:]
    assert "Connection closed" not in r.stderr and "[rank1]" not in r.stderr, r.stderr[-3000:]

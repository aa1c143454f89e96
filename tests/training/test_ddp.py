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
        "--batch-size", "4", "--image-size", "48", "--out", str(out), "--synthetic-samples", "17", "--no-progress",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("trained hatr_conv2d") == 1  # only rank 0 reports and writes
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["epochs"]) == 1 and (out / "best.pt").is_file()
    # 17 samples: one is taken twice so that each process has 9, and each process's 9th is left out (a batch of 1)
    assert "1 of them is taken twice each epoch" in r.stdout, r.stdout
    assert "each process's last training batch would hold 1 sample" in r.stdout and "(2 samples in all" in r.stdout
    # the train loss/accuracy are over both processes' shards (8 samples each), not rank 0's alone
    assert m["epochs"][0]["train_samples"] == 16
    # rank 0 refuses the folder (a run is there): every rank ends, with rank 0's message alone, not rank 1 failing
    # in DDP's first collective ("Connection closed by peer")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0
    assert r.stderr.count("already holds a run of this configuration") == 1, r.stderr[-3000:]
    assert "Connection closed" not in r.stderr and "[rank1]" not in r.stderr, r.stderr[-3000:]
    # a resume refused for a changed setting: said once (by rank 0), not by every rank
    r = subprocess.run(cmd[:cmd.index("--epochs") + 1] + ["2"] + cmd[cmd.index("--epochs") + 2:] + ["--resume"],
                       capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0
    assert r.stderr.count("--epochs: 1 in the saved run, 2 now") == 1, r.stderr[-3000:]


DRIVER = """
import sys
from fusionblocks.training.engine import TrainConfig, train
train(TrainConfig(model="hatr_conv2d", data="synthetic", out=sys.argv[1], epochs=2, batch_size=4, image_size=32,
                  synthetic_samples=16, progress=False, plots=False, tensorboard=False, log=False,
                  resume="auto", model_kwargs={"drop_rate": 0.5}))
"""


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_torchrun_rng_per_rank_and_resume(tmp_path):
    """Each process draws dropout from a stream of its own, and --resume after a kill restores every rank's
    stream: the resumed 2-process run ends where the uninterrupted one does."""
    import os
    import socket

    import torch

    script = tmp_path / "driver.py"
    script.write_text(DRIVER)

    def run(out, **env):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port,
               str(script), str(out)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1", **env})

    full, killed = tmp_path / "full", tmp_path / "killed"
    r = run(full)
    assert r.returncode == 0, r.stderr[-3000:]
    rngs = torch.load(full / "last.pt", weights_only=True)["rng_ranks"]
    assert not torch.equal(rngs[0]["torch"], rngs[1]["torch"])
    r = run(killed, FUSIONBLOCKS_TEST_CRASH_AT="after_last@1", FUSIONBLOCKS_TEST_CRASH_MODE="exit")
    assert r.returncode != 0 and (killed / "last.pt").is_file()
    r = run(killed)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (full, killed))
    for key in ("train_loss", "train_accuracy", "val_loss"):
        assert [e[key] for e in a["epochs"]] == [e[key] for e in b["epochs"]], key
    assert a["test"]["loss"] == b["test"]["loss"]

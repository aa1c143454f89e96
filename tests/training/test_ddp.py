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


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_torchrun_unreadable_images_checked_in_shares_and_reported_once(tmp_path):
    """Under torchrun each process decodes a share of the images before training; the unreadable ones found by
    any process are listed together, once (by rank 0), and no process is left in a collective."""
    import os
    import socket

    import numpy as np
    from PIL import Image

    data = tmp_path / "data"
    bad = []
    for c in ("a", "b"):
        (data / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(data / c / f"{i}.png")
        for name in ("empty.png", "text.png"):
            p = data / c / name
            p.write_bytes(b"" if name == "empty.png" else b"not an image")
            bad.append(p)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port,
           "-m", "fusionblocks", "train", "--model", "hatr_conv2d", "--data", str(data), "--epochs", "1",
           "--batch-size", "4", "--image-size", "48", "--out", str(tmp_path / "run"), "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0
    assert r.stderr.count("4 of 16 images cannot be read") == 1, r.stderr[-3000:]
    for p in bad:
        assert r.stderr.count(f" {p}: ") == 1, (p, r.stderr[-3000:])
    # no process died in a collective or with a traceback of its own (torchrun's launcher may print its own)
    assert "Connection closed" not in r.stderr and "fusionblocks/training" not in r.stderr, r.stderr[-3000:]
    assert "rank      : 0" in r.stderr or "Root Cause" not in r.stderr  # the failing process is rank 0, which said why


def test_image_problems_parts_cover_every_image_once(tmp_path):
    from fusionblocks.training import data as D

    files = []
    for i in range(7):
        p = tmp_path / f"{i}.png"
        p.write_bytes(b"" if i % 3 == 0 else b"junk")  # every file is bad: each part reports exactly its own
        files.append((p, 0))
    splits = {"train": files[:5], "val": files[5:]}
    total, every = D.image_problems(splits)
    assert total == 7 and [i for i, _ in every] == list(range(7))
    parts = [D.image_problems(splits, part=(k, 3)) for k in range(3)]
    assert all(t == 7 for t, _ in parts)
    gathered = [b for _, share in parts for b in share]
    assert sorted(i for i, _ in gathered) == list(range(7)) and [i for i, _ in parts[1][1]] == [1, 4]
    assert str(D.unreadable_images(7, gathered)) == str(D.unreadable_images(7, every))
    assert "val: " + str(files[6][0]) in str(D.unreadable_images(7, every))

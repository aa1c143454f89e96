"""The README's usage example runs as written."""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_usage_example_runs():
    block = re.search(r"## Use\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    ns: dict = {}
    exec(compile(block, "README.md", "exec"), ns)
    assert ns["f"].shape == (2, 96, 28, 28)
    assert ns["y"].shape == (2, 96, 13, 17)
    assert ns["logits"].shape == (1, 7) and torch.isfinite(ns["logits"]).all()


def test_readme_test_command_is_what_ci_runs():
    cmd = re.search(r"(python -m pytest[^\n`]*)", README.read_text()).group(1).strip()
    assert cmd in (README.parent / ".ci" / "run").read_text()

import pytest
import torch
import torch.nn as nn

from fusionblocks.models import registry


class TinyNet(nn.Module):
    """A small registered model with the fusionblocks model API, for fast engine tests."""

    def __init__(self, num_classes=2, in_chans=3, width=8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU())
        self.stage = nn.Sequential(nn.Conv2d(width, 2 * width, 3, 2, 1), nn.ReLU())
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(2 * width, num_classes)
        self.feature_info = [dict(num_chs=2 * width, reduction=4, module="stage")]

    def forward(self, x):
        return self.head(self.drop(self.stage(self.stem(x)).mean((2, 3))))


@pytest.fixture
def tiny_model():
    registry._load()

    def tiny_test_net(num_classes=2, **kw):
        return TinyNet(num_classes, **kw)

    registry.register_model(tiny_test_net)
    yield "tiny_test_net"
    registry._MODELS.pop("tiny_test_net", None)


@pytest.fixture
def image_tree(tmp_path):
    """root/{train,val,test}/{normal,pneumonia}/*.png with a learnable difference (bright vs dark)."""
    from PIL import Image

    root = tmp_path / "data"
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 6), ("val", 3), ("test", 3)):
        for c, name in enumerate(("normal", "pneumonia")):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                arr = (torch.rand(20 + i, 24, generator=g) * 100 + 120 * c).clamp(0, 255).to(torch.uint8).numpy()
                Image.fromarray(arr, mode="L").save(d / f"{i}.png")
    return root


@pytest.fixture(autouse=True)
def _training_one_thread(one_thread):
    """Training tests run tiny models, where threads only fight for the shared cores."""
    yield

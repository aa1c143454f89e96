"""FusionUNet: HEF/HFF-fused encoders as U-Net skips, trained a few steps on synthetic masks."""
import pytest
import torch
import torch.nn.functional as F

from fusionblocks.models.hemf import HEMF
from fusionblocks.models.unet import FusionUNet


def _small_hemf():
    return HEMF((1, 1, 1, 1), (1, 1, 1, 1), dims=(16, 32, 64, 128), num_heads=4, num_classes=0)


def _disc_batch(n, size, g):
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    imgs, masks = [], []
    for _ in range(n):
        cy, cx = (torch.rand(2, generator=g) * 0.5 + 0.25) * size
        r = (0.15 + 0.1 * torch.rand((), generator=g)) * size
        m = (((yy - cy) ** 2 + (xx - cx) ** 2) < r**2).float()
        imgs.append((0.3 + 0.5 * m + 0.1 * torch.randn(size, size, generator=g)).expand(3, -1, -1))
        masks.append(m[None])
    return torch.stack(imgs), torch.stack(masks)


def test_shapes_any_size():
    net = FusionUNet(num_classes=2, encoder=_small_hemf(), decoder_channels=(32, 16, 16, 8)).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 64, 96)).shape == (1, 2, 64, 96)
        assert net(torch.randn(2, 3, 45, 70)).shape == (2, 2, 45, 70)


def test_trains_on_synthetic_masks():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    net = FusionUNet(num_classes=1, encoder=_small_hemf(), decoder_channels=(32, 16, 16, 8))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    x, y = _disc_batch(4, 64, g)
    losses = []
    for _ in range(8):
        loss = F.binary_cross_entropy_with_logits(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    fusion_grads = [p.grad for n, p in net.named_parameters() if ".fusion." in f".{n}" and p.requires_grad]
    assert fusion_grads and all(gr is not None for gr in fusion_grads)


def test_encoder_by_name_and_errors():
    net = FusionUNet(encoder="hifuse_tiny", decoder_channels=(16, 16, 8, 8))
    assert [f["reduction"] for f in net.encoder.feature_info] == [4, 8, 16, 32]
    with pytest.raises(ValueError, match="FusionUNet: expected an encoder with forward_intermediates and 4 feature levels, got Linear"):
        FusionUNet(encoder=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"FusionUNet: expected 4 decoder_channels, got \(8, 8\)"):
        FusionUNet(encoder=_small_hemf(), decoder_channels=(8, 8))
    with pytest.raises(ValueError, match=r"FusionUNet: expected x as a 4-D"):
        FusionUNet(encoder=_small_hemf())(torch.randn(3, 64, 64))

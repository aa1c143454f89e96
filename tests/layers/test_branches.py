"""LocalBlock (HiFuse Local_block) and ELFBlock (HEMF ELF_block): parity, one implementation, shapes, errors."""
import pytest
import torch
import torch.nn.functional as F

from fusionblocks.layers.branches import ELFBlock, LocalBlock
from golden_utils import block, make_input, official_state_dict, rel_err


@pytest.mark.parametrize("name, cls", [("hifuse.local_block", LocalBlock), ("hemf.elf_block", ELFBlock)])
def test_matches_official_block(name, cls):
    rec = block(name)
    x = make_input(rec["inputs"][0])
    blk = cls(x.shape[1]).eval()
    blk.load_state_dict(official_state_dict(rec), strict=True)
    with torch.no_grad():
        out = blk(x)
    assert out.shape == rec["output"].shape
    assert rel_err(out, rec["output"]) <= 1e-5


def test_elf_is_the_local_block_with_a_conv_and_an_earlier_norm():
    torch.manual_seed(0)
    elf = ELFBlock(8).eval()
    assert isinstance(elf, LocalBlock)
    local = LocalBlock(8, conv=True, norm_position="before_dwconv").eval()
    local.load_state_dict(elf.state_dict(), strict=True)
    x = torch.randn(2, 8, 5, 6)
    with torch.no_grad():
        assert torch.equal(elf(x), local(x))
        y = F.conv2d(x, elf.conv.weight, elf.conv.bias, padding=1)
        y = F.layer_norm(y.permute(0, 2, 3, 1), (8,), elf.norm.weight, elf.norm.bias, 1e-6).permute(0, 3, 1, 2)
        y = F.conv2d(y, elf.dwconv.weight, elf.dwconv.bias, padding=1, groups=8)
        want = x + F.gelu(F.linear(y.permute(0, 2, 3, 1), elf.pwconv.weight, elf.pwconv.bias)).permute(0, 3, 1, 2)
    assert rel_err(elf(x), want) <= 1e-6
    assert set(LocalBlock(8).state_dict()) == {"dwconv.weight", "dwconv.bias", "norm.weight", "norm.bias",
                                                "pwconv.weight", "pwconv.bias"}


@pytest.mark.parametrize("cls", [LocalBlock, ELFBlock])
@pytest.mark.parametrize("hw", [(7, 7), (13, 57), (1, 1)])
def test_shapes_batch1_noncontiguous(cls, hw):
    torch.manual_seed(1)
    blk = cls(6).eval()
    x = torch.randn(1, 6, hw[0], 2 * hw[1])[..., ::2]
    with torch.no_grad():
        out = blk(x)
        ref = blk(x.contiguous())
    assert out.shape == (1, 6) + hw
    assert rel_err(out, ref) <= 1e-6


@pytest.mark.parametrize("cls", [LocalBlock, ELFBlock])
def test_gradcheck(cls):
    torch.manual_seed(2)
    blk = cls(4).double()
    x = torch.randn(1, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(blk, (x,), eps=1e-6, atol=1e-5)


def test_drop_path_only_in_training():
    torch.manual_seed(3)
    blk = LocalBlock(4, drop_path=0.5)
    x = torch.randn(64, 4, 3, 3)
    blk.eval()
    with torch.no_grad():
        ev = blk(x)
        blk.train()
        tr = blk(x)
    dropped = [(tr[i] - x[i]).abs().max().item() == 0 for i in range(64)]
    assert 5 < sum(dropped) < 59
    assert not torch.equal(ev, tr)


def test_errors():
    with pytest.raises(ValueError, match=r"LocalBlock: expected x with 8 channels, got \(2, 4, 5, 5\)"):
        LocalBlock(8)(torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match=r"ELFBlock: expected x as a 4-D"):
        ELFBlock(8)(torch.randn(2, 8, 5))
    with pytest.raises(ValueError, match=r"LocalBlock: expected norm_position to be one of"):
        LocalBlock(8, norm_position="middle")
    with pytest.raises(ValueError, match=r"LocalBlock: expected dim to be a positive int, got 0"):
        LocalBlock(0)


@pytest.mark.parametrize("cls", [LocalBlock, ELFBlock])
@pytest.mark.parametrize("rate", [1.0, 1.5, -0.1, [0.1]])
def test_drop_path_outside_0_1_is_an_error_not_nan(cls, rate):
    with pytest.raises(ValueError, match=rf"^{cls.__name__}: expected drop_path in \[0, 1\), got "):
        cls(4, drop_path=rate)


def test_drop_path_of_one_drops_every_sample_without_nan():
    from fusionblocks.layers.drop import drop_path

    y = drop_path(torch.randn(3, 4, 2, 2), 1.0, True)
    assert torch.equal(y, torch.zeros_like(y))

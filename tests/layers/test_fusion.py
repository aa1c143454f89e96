"""HFF / HEF / MixedAttention: official parity, key rules, variants, sizes, gradcheck, dtypes, errors."""
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import golden_utils as gu
from fusionblocks import HEF, HFF, MixedAttention
from fusionblocks.models.convert import join_rules, load_official, prefix_rules

RECORDS = [
    ("hifuse.hff_first", HFF, 96),
    ("hifuse.hff", HFF, 192),
    ("hemf.hef_first", HEF, 96),
    ("hemf.hef", HEF, 192),
]


def _randomize(m, seed=0):
    """Non-trivial parameters and BatchNorm statistics, eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(m.named_parameters()) + list(m.named_buffers()):
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif t.dim() == 1:
                t.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(t.shape, generator=g))
            else:
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=g) / fan_in**0.5)
    return m.eval()


def _small(cls, dim=8, **kw):
    if cls is HEF:
        kw = {"num_heads": 2, "memory_size": 4, "reduction": 4, **kw}
    else:
        kw = {"reduction": 4, **kw}
    return _randomize(cls(dim, **kw))


def _inputs(dim, hw, batch=2, f_hw=None, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    h, w = hw
    l = torch.randn(batch, dim, h, w, generator=g, dtype=dtype)
    gl = torch.randn(batch, dim, h, w, generator=g, dtype=dtype)
    fh, fw = f_hw or (2 * h, 2 * w)
    f = torch.randn(batch, dim // 2, fh, fw, generator=g, dtype=dtype)
    return l, gl, f


@pytest.mark.parametrize("name,cls,dim", RECORDS)
def test_matches_official_block(name, cls, dim):
    record = gu.block(name)
    m = cls(dim).eval()
    m.load_official_state_dict(gu.official_state_dict(record))
    inputs = [gu.make_input(s) for s in record["inputs"]]
    with torch.no_grad():
        assert gu.rel_err(m(*inputs), record["output"]) <= 1e-5


@pytest.mark.parametrize("name,cls,dim", [RECORDS[0], RECORDS[3]])
def test_single_path_build_loads_with_the_drop_list(name, cls, dim):
    record = gu.block(name)
    sd = gu.official_state_dict(record)
    inputs = [gu.make_input(s) for s in record["inputs"]]
    m = cls(dim, with_prev=inputs[2] is not None).eval()
    rules, drop = m.official_key_rules()
    dropped = [k for k in sd if any(re.fullmatch(p, k) for p in drop)]
    assert dropped, "a single-path block must drop the official keys of the other path"
    with pytest.raises(KeyError, match="unexpected"):
        load_official(m, sd, rules, source=name)
    load_official(m, sd, rules, drop, source=name)
    with torch.no_grad():
        assert gu.rel_err(m(*inputs), record["output"]) <= 1e-5


def test_prefix_rules_load_a_model_of_blocks():
    class TwoStages(nn.Module):
        def __init__(self):
            super().__init__()
            self.fusions = nn.ModuleList([HEF(96, with_prev=False), HEF(192, with_prev=True)])

    model = TwoStages().eval()
    sd, parts = {}, []
    for i, name in enumerate(["hemf.hef_first", "hemf.hef"]):
        sd.update({f"fu{i + 1}.{k}": v for k, v in gu.official_state_dict(gu.block(name)).items()})
        parts.append(prefix_rules(f"fu{i + 1}.", f"fusions.{i}.", *model.fusions[i].official_key_rules()))
    load_official(model, sd, *join_rules(*parts), source="two HEF stages")
    for i, name in enumerate(["hemf.hef_first", "hemf.hef"]):
        record = gu.block(name)
        with torch.no_grad():
            out = model.fusions[i](*[gu.make_input(s) for s in record["inputs"]])
        assert gu.rel_err(out, record["output"]) <= 1e-5


def test_stable_submodule_names():
    common = ["proj_l", "proj_g", "prev_proj", "prev_pool", "fuse3_norm", "fuse3_proj", "fuse2_norm", "fuse2_proj",
              "act", "norm", "attn_l", "attn_g", "mlp"]
    assert sorted(n for n, _ in HFF(16).named_children()) == sorted(common)
    assert sorted(n for n, _ in HEF(16).named_children()) == sorted(common)
    first = {n for n, _ in HEF(16, with_prev=False).named_children()}
    later = {n for n, _ in HFF(16, with_prev=True).named_children()}
    assert not first & {"prev_proj", "fuse3_norm", "fuse3_proj"} and {"fuse2_norm", "fuse2_proj"} <= first
    assert not later & {"fuse2_norm", "fuse2_proj"} and {"prev_proj", "fuse3_proj"} <= later
    assert {n for n, _ in HEF(16).attn_l.named_children()} == {"norm", "mhea", "spatial", "channel"}


@pytest.mark.parametrize("cls", [HFF, HEF])
@pytest.mark.parametrize("with_f", [False, True])
def test_gradcheck_small_blocks(cls, with_f, one_thread):
    m = _small(cls, 4, **({} if cls is HFF else {"num_heads": 2})).double()
    l, g, f = _inputs(4, (2, 3), batch=1, dtype=torch.float64)
    args = (l, g, f) if with_f else (l, g)
    args = tuple(a.requires_grad_() for a in args)
    assert torch.autograd.gradcheck(m, args, fast_mode=True)
    assert torch.autograd.gradcheck(lambda *a: m(*a).square().sum(), args, fast_mode=False)


@pytest.mark.parametrize("cls", [HFF, HEF])
def test_non_square_odd_batch1_noncontiguous(cls):
    m = _small(cls, 8)
    l, g, f = _inputs(8, (7, 13), batch=1)
    out = m(l, g, f)
    assert out.shape == (1, 8, 7, 13)
    nl = l.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
    ng = g.contiguous(memory_format=torch.channels_last)
    nf = f.transpose(2, 3).contiguous().transpose(2, 3)
    assert not (nl.is_contiguous() or ng.is_contiguous() or nf.is_contiguous())
    torch.testing.assert_close(m(nl, ng, nf), out, rtol=1e-5, atol=1e-6)
    assert m(l, g).shape == (1, 8, 7, 13)


@pytest.mark.parametrize("cls", [HFF, HEF])
def test_odd_previous_sizes(cls):
    m = _small(cls, 8)
    l, g, f = _inputs(8, (7, 13), f_hw=(13, 27))
    want = m(l, g, F.pad(f, (0, 0, 0, 1), mode="replicate")[..., :26])
    torch.testing.assert_close(m(l, g, f), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [HFF, HEF])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(cls, dtype):
    m = _small(cls, 16)
    l, g, f = _inputs(16, (5, 7))
    want = m(l, g, f)
    got = m.to(dtype)(l.to(dtype), g.to(dtype), f.to(dtype))
    assert got.dtype == dtype and got.shape == want.shape
    assert gu.rel_err(got.float(), want) <= (2e-2 if dtype == torch.float16 else 8e-2)


def test_channel_options_and_paper_variants():
    m = _randomize(HFF(16, l_dim=24, g_dim=8, reduction=4))
    l, g = torch.randn(2, 24, 5, 6), torch.randn(2, 8, 5, 6)
    assert m(l, g, torch.randn(2, 8, 10, 12)).shape == (2, 16, 5, 6)
    assert m.mlp.in_dim == 24 + 8 + 16
    off, paper = HFF(16), HFF(16, depthwise=True, spatial_order="avg_max", spatial_norm=False, fuse_kernel=3)
    n = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    c = 48
    assert n(off) - n(paper) == (c * c * 9 - c * 9) + 2 - (3 * 16 + 2 * 16) * 16 * 8
    h = HEF(16, l_dim=32, num_heads=4, depthwise=True, shared_norm=False)
    assert h.mlp.spatial.groups == 16 and h.attn_l.norm2 is not None and h.attn_l.dim == 32


def test_drop_path_is_per_sample_and_off_in_eval():
    torch.manual_seed(0)
    m = _small(HFF, 8, drop_path=0.5)
    l, g, f = _inputs(8, (3, 4), batch=16)
    full = m(l, g, f)
    ref = _small(HFF, 8)
    torch.testing.assert_close(full, ref(l, g, f))
    shortcut = m.prev_pool(m.prev_proj(f))
    m.train()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.eval()
    out = m(l, g, f)
    dropped = torch.isclose(out, shortcut, atol=1e-6).flatten(1).all(1)
    kept = torch.isclose(out, shortcut + 2 * (full - shortcut), atol=1e-5).flatten(1).all(1)
    assert bool((dropped ^ kept).all()) and dropped.any() and kept.any()


def test_mixed_attention_composition():
    torch.manual_seed(0)
    m = _randomize(MixedAttention(8, num_heads=2, memory_size=4, reduction=4))
    x = torch.randn(2, 8, 5, 7)
    t = m.norm(x)
    t = m.norm(m.mhea(t) * t)
    t = t * m.spatial.gate(t)
    torch.testing.assert_close(m(x), t * m.channel.gate(t))
    assert m.spatial.order == "avg_max" and m.spatial.bn is None and m.norm.eps == 1e-6
    sep = MixedAttention(8, num_heads=2, memory_size=4, reduction=4, shared_norm=False)
    sd = dict(m.state_dict(), **{"norm2.weight": m.norm.weight, "norm2.bias": m.norm.bias})
    sep.load_state_dict(sd)
    torch.testing.assert_close(sep(x), m(x))


def test_errors_name_block_expected_and_received():
    hef = HEF(96)
    l, g = torch.randn(2, 96, 28, 28), torch.randn(2, 96, 28, 28)
    with pytest.raises(ValueError, match=r"^HEF: expected l with 96 channels, got \(2, 64, 28, 28\)$"):
        hef(torch.randn(2, 64, 28, 28), g)
    with pytest.raises(ValueError, match=r"^HFF: expected g with 16 channels, got \(1, 8, 4, 4\)$"):
        HFF(16)(torch.randn(1, 16, 4, 4), torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match=r"HEF: expected g with the spatial size \(28, 28\) of l, got \(2, 96, 28, 27\)"):
        hef(l, torch.randn(2, 96, 28, 27))
    with pytest.raises(ValueError, match=r"HEF: expected f with 48 channels, got \(2, 96, 56, 56\)"):
        hef(l, g, torch.randn(2, 96, 56, 56))
    with pytest.raises(ValueError, match=r"HEF: expected f at twice the spatial size of l \(56, 56\).*got \(2, 48, 28, 28\)"):
        hef(l, g, torch.randn(2, 48, 28, 28))
    with pytest.raises(ValueError, match=r"HFF: expected l as a 4-D \(B, C, H, W\) tensor, got \(2, 784, 16\)"):
        HFF(16)(torch.randn(2, 784, 16), torch.randn(2, 16, 28, 28))
    with pytest.raises(ValueError, match=r"HFF: built with with_prev=False .* got \(1, 8, 8, 8\)"):
        HFF(16, with_prev=False)(torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4), torch.randn(1, 8, 8, 8))
    with pytest.raises(ValueError, match=r"HEF: built with with_prev=True, expected the previous fusion output f"):
        HEF(16, with_prev=True)(torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4))
    with pytest.raises(ValueError, match=r"HEF: expected l_dim \(100\) to be divisible by num_heads \(8\)"):
        HEF(100)
    with pytest.raises(ValueError, match=r"MixedAttention: expected dim \(12\) to be divisible by num_heads \(8\)"):
        MixedAttention(12)
    with pytest.raises(ValueError, match="HFF: expected an even dim"):
        HFF(15)
    with pytest.raises(ValueError, match=r"HFF: expected drop_path in \[0, 1\), got 1.0"):
        HFF(16, drop_path=1.0)
    with pytest.raises(ValueError, match="HFF: expected an odd fuse_kernel, got 2"):
        HFF(16, fuse_kernel=2)
    with pytest.raises(ValueError, match="HEF: expected with_prev to be one of"):
        HEF(16, with_prev="yes")
    with pytest.raises(KeyError, match=r"missing official keys \(1\): \['W_l\.conv\.weight'\]"):
        sd = gu.official_state_dict(gu.block("hemf.hef_first"))
        del sd["W_l.conv.weight"]
        HEF(96).load_official_state_dict(sd)


@pytest.mark.parametrize("cls", [HFF, HEF])
def test_batch_mismatch_is_named_before_any_kernel(cls, monkeypatch):
    blk = cls(16, num_heads=4) if cls is HEF else cls(16)
    ran = []
    monkeypatch.setattr(blk.proj_l, "forward", lambda x: ran.append(x))
    l = torch.randn(2, 16, 5, 7)
    with pytest.raises(ValueError, match=rf"^{cls.__name__}: expected g with the batch size 2 of l, got \(3, 16, 5, 7\)$"):
        blk(l, torch.randn(3, 16, 5, 7))
    with pytest.raises(ValueError, match=rf"^{cls.__name__}: expected f with the batch size 2 of l, got \(1, 8, 10, 14\)$"):
        blk(l, l, torch.randn(1, 8, 10, 14))
    assert not ran


@pytest.mark.parametrize("cls", [HFF, HEF])
def test_gate_options_are_checked_under_the_fusion_blocks_name(cls):
    # HFF(16, reduction=0) said "ChannelAttn: ...", HEF(16, memory_size=0) "MultiHeadExternalAttention: ..."
    name = cls.__name__
    with pytest.raises(ValueError, match=rf"^{name}: expected reduction to be a positive int, got 0$"):
        cls(16, reduction=0)
    with pytest.raises(ValueError, match=rf"^{name}: expected an odd spatial_kernel, got 4$"):
        cls(16, spatial_kernel=4)
    with pytest.raises(ValueError, match=rf"^{name}: expected spatial_kernel to be a positive int, got True$"):
        cls(16, spatial_kernel=True)
    if cls is HEF:
        with pytest.raises(ValueError, match=r"^HEF: expected memory_size to be a positive int, got 0$"):
            HEF(16, memory_size=0)
        with pytest.raises(ValueError, match=r"^HEF: expected num_heads to be a positive int, got 0$"):
            HEF(16, num_heads=0)


@pytest.mark.parametrize("cls", [HFF, HEF])
@pytest.mark.parametrize("bad", [1, 0, 1.0])
def test_with_prev_takes_only_none_or_a_bool(cls, bad):
    # 1 == True: a choice check let 1 through, which built both paths yet kept with_prev=1, so the drop list and
    # official_unused_params() named the f-less path unused and forward took f=None where True refuses it
    with pytest.raises(ValueError, match=rf"^{cls.__name__}: expected with_prev to be one of \[None, True, False\], "
                                         rf"got {bad!r}$"):
        cls(16, with_prev=bad)
    assert cls(16, with_prev=True).with_prev is True and cls(16, with_prev=None).official_unused_params() == 0

"""The networks keep their convolution weights channels_last (fusionblocks/models/memory_format.py): the
transformer branches feed the convolutions channels_last-strided maps, and an NCHW weight would be converted
on every call."""
import pytest
import torch
from torch import nn

from fusionblocks.models import create_model
from fusionblocks.models.unet import FusionUNet


def _four_d(module):
    return [(n, t) for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.dim() == 4]


@pytest.mark.parametrize("name", ["hifuse_tiny", "hemf", "hatr_conv2d"])
def test_models_store_convolution_weights_channels_last(name):
    model = create_model(name, num_classes=3)
    weights = _four_d(model)
    assert weights, name
    wrong = [n for n, t in weights if not t.is_contiguous(memory_format=torch.channels_last)]
    assert not wrong, f"{name}: not channels_last: {wrong[:5]}"
    # a state_dict from a contiguous copy loads into it unchanged, and its strides stay channels_last
    other = create_model(name, num_classes=3).to(memory_format=torch.contiguous_format)
    model.load_state_dict(other.state_dict())
    for (n, t), (_, u) in zip(weights, _four_d(other)):
        assert torch.equal(t, u) and t.is_contiguous(memory_format=torch.channels_last), n


def test_unet_converts_its_decoder_not_a_given_encoder():
    enc = create_model("hemf", num_classes=0).to(memory_format=torch.contiguous_format)
    net = FusionUNet(num_classes=2, encoder=enc)
    assert all(t.is_contiguous() for _, t in _four_d(net.encoder))
    for part in (net.up16, net.up8, net.up4, net.refine, net.head):
        for n, t in _four_d(part):
            assert t.is_contiguous(memory_format=torch.channels_last), n
    assert isinstance(net.head, nn.Conv2d)

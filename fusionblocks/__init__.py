"""fusionblocks: composable CNN-Transformer fusion blocks for medical imaging.

Blocks take NCHW ``(B, C, H, W)`` in and out unless their name says tokens. Models come from
:func:`create_model`; the functional ops and their backends live in :mod:`fusionblocks.ops`.
With timm installed, the models are also registered in timm's registry on import.
"""
__version__ = "0.1.0"

from . import ops
from .layers.branches import ELFBlock, LocalBlock
from .layers.conv import ConvBN
from .layers.external import MultiHeadExternalAttention
from .layers.fusion import HEF, HFF, MixedAttention
from .layers.gates import ChannelAttn, SpatialAttn
from .layers.manhattan import EGFBlock, ManhattanSelfAttention
from .layers.mlp import IRMLP, SIRMLP
from .layers.norm import LayerNorm2d
from .layers.tokens import OverlapTokenizer, TokenWeighting
from .layers.window import HiFuseGlobalBlock, HiFuseGlobalStage, PatchMerging, WindowAttention
from .models.features import FeatureExtractor, register_with_timm
from .models.registry import create_model, list_models
from .models.unet import FusionUNet

__all__ = [
    "__version__",
    "ops",
    # gates, norms, units
    "ChannelAttn",
    "SpatialAttn",
    "LayerNorm2d",
    "ConvBN",
    # MLPs and attention
    "IRMLP",
    "SIRMLP",
    "MultiHeadExternalAttention",
    "MixedAttention",
    "ManhattanSelfAttention",
    "WindowAttention",
    # branch blocks
    "LocalBlock",
    "ELFBlock",
    "HiFuseGlobalBlock",
    "HiFuseGlobalStage",
    "PatchMerging",
    "EGFBlock",
    # fusion
    "HFF",
    "HEF",
    # tokens (HATR)
    "OverlapTokenizer",
    "TokenWeighting",
    # models
    "create_model",
    "list_models",
    "FeatureExtractor",
    "FusionUNet",
]

register_with_timm()

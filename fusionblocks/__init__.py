"""fusionblocks: composable CNN-Transformer fusion blocks for medical imaging.

Blocks take NCHW ``(B, C, H, W)`` in and out unless their name says tokens. Models come from
:func:`create_model`; the functional ops and their backends live in :mod:`fusionblocks.ops`.
"""
__version__ = "0.1.0"

from .layers.conv import ConvBN
from .layers.gates import ChannelAttn, SpatialAttn
from .layers.norm import LayerNorm2d
from .layers.mlp import IRMLP, SIRMLP
from .layers.external import MultiHeadExternalAttention
from .layers.fusion import HEF, HFF, MixedAttention
from .layers.manhattan import EGFBlock, ManhattanSelfAttention
from .models.features import FeatureExtractor
from .layers.tokens import OverlapTokenizer, TokenWeighting
from .layers.window import HiFuseGlobalBlock, HiFuseGlobalStage, PatchMerging, WindowAttention
from .layers.branches import ELFBlock, LocalBlock
from .models.registry import create_model, list_models

__all__ = [
    "__version__",
    "ChannelAttn",
    "ConvBN",
    "LayerNorm2d",
    "SpatialAttn",
    "IRMLP",
    "SIRMLP",
    "MultiHeadExternalAttention",
    "MixedAttention",
    "HFF",
    "HEF",
    "ManhattanSelfAttention",
    "EGFBlock",
    "FeatureExtractor",
    "OverlapTokenizer",
    "TokenWeighting",
    "WindowAttention",
    "HiFuseGlobalBlock",
    "HiFuseGlobalStage",
    "PatchMerging",
    "LocalBlock",
    "ELFBlock",
    "create_model",
    "list_models",
]

from .models.features import register_with_timm as _register_with_timm  # noqa: E402

_register_with_timm()

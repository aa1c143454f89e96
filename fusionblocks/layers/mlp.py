"""Inverted-residual MLPs of the fusion blocks: HiFuse's IRMLP and HEMF's squeezed SIRMLP.

Both compute, on a ``(B, C, H, W)`` map ``x`` with ``C = in_dim`` (IRMLP) or ``C = hidden_dim`` after the
squeeze (SIRMLP)::

    y = BN(GELU(conv3x3(x)) + x)
    out = BN(conv1x1_{4C -> out}(GELU(conv1x1_{C -> 4C}(y))))

Official code vs papers:

* HiFuse builds the 3x3 convolution with ``group=inp_dim`` but its ``Conv`` wrapper never passes the groups on, so
  the official checkpoints hold a FULL 3x3 convolution (``C -> C``, ``C*C*9`` weights). That is the default here;
  ``depthwise=True`` gives the papers' depthwise 3x3 (``C*9`` weights). HEMF's SIRMLP has the same quirk.
* No convolution has a bias; only the last projection is followed by BatchNorm (plus the BatchNorm after the residual).

Submodule names (stable; ``official_key_rules()`` maps the official ones onto them):

===========  ======================================  ==================
ours         what                                    official
===========  ======================================  ==================
``squeeze``  SIRMLP only: 1x1 ConvBN in -> hidden    ``conv_s``
``spatial``  3x3 conv (full or depthwise), no bias   ``conv1.conv``
``norm``     BatchNorm after the residual add        ``bn1``
``expand``   1x1 conv C -> expansion*C, no bias      ``conv2.conv``
``project``  1x1 ConvBN expansion*C -> out, no bias  ``conv3``
===========  ======================================  ==================
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .._validate import expect_nchw, expect_positive_int
from ..models.convert import KeyRules
from .conv import ConvBN


class IRMLP(nn.Module):
    """HiFuse's inverted-residual MLP.

    ``out = BN(W3 · GELU(W2 · BN(GELU(conv3x3(x)) + x)))`` where ``W2``/``W3`` are 1x1 convolutions.

    Args:
        in_dim: input channels ``C``.
        out_dim: output channels.
        depthwise: the papers' depthwise 3x3 convolution; the default ``False`` is the official full 3x3
            convolution (see the module docstring).
        expansion: width of the hidden 1x1 layer as a multiple of ``C`` (4 in both official models).

    Shapes: ``(B, in_dim, H, W) -> (B, out_dim, H, W)``.
    """

    def __init__(self, in_dim: int, out_dim: int, depthwise: bool = False, *, expansion: int = 4):
        super().__init__()
        name = type(self).__name__
        in_dim = expect_positive_int(name, "in_dim", in_dim)
        out_dim = expect_positive_int(name, "out_dim", out_dim)
        expansion = expect_positive_int(name, "expansion", expansion)
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.depthwise = bool(depthwise)
        self.spatial = nn.Conv2d(in_dim, in_dim, 3, padding=1, bias=False, groups=in_dim if self.depthwise else 1)
        self.act = nn.GELU()
        self.norm = nn.BatchNorm2d(in_dim)
        self.expand = nn.Conv2d(in_dim, in_dim * expansion, 1, bias=False)
        self.project = ConvBN(in_dim * expansion, out_dim, 1, bn=True, bias=False)

    @classmethod
    def official_key_rules(cls) -> KeyRules:
        """Official ``IRMLP`` keys -> this module (see the module docstring's table)."""
        rules = [
            (r"conv1\.conv\.(.*)", r"spatial.\1"),
            (r"bn1\.(.*)", r"norm.\1"),
            (r"conv2\.conv\.(.*)", r"expand.\1"),
            (r"conv3\.(.*)", r"project.\1"),
        ]
        return rules, []

    def _body(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.act(self.spatial(x)) + x)
        return self.project(self.act(self.expand(y)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expect_nchw(type(self).__name__, "x", x, self.in_dim, like=self)
        return self._body(x)


class SIRMLP(IRMLP):
    """HEMF's squeezed inverted-residual MLP: a 1x1 ConvBN squeeze, then the IRMLP body at ``hidden_dim``.

    ``out = IRMLP_body(BN(conv1x1_{in -> hidden}(x)))`` — the squeeze conv has a bias, the body does not.

    Args:
        in_dim: input channels (``3 * dim`` in HEF).
        hidden_dim: channels after the squeeze (``dim`` in HEF); the expansion is ``4 * hidden_dim``.
        out_dim: output channels.
        depthwise: the paper's depthwise 3x3 convolution; default ``False`` is the official full 3x3 conv.
        expansion: hidden width multiple (4 officially).

    Shapes: ``(B, in_dim, H, W) -> (B, out_dim, H, W)``.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, *, depthwise: bool = False, expansion: int = 4):
        hidden_dim = expect_positive_int("SIRMLP", "hidden_dim", hidden_dim)
        in_dim = expect_positive_int("SIRMLP", "in_dim", in_dim)
        super().__init__(hidden_dim, out_dim, depthwise, expansion=expansion)
        self.in_dim = in_dim
        self.hidden_dim = hidden_dim
        self.squeeze = ConvBN(in_dim, hidden_dim, 1, bn=True)

    @classmethod
    def official_key_rules(cls) -> KeyRules:
        """Official ``SIRMLP`` keys -> this module: ``conv_s`` -> ``squeeze``, then the IRMLP renames."""
        rules, drop = super().official_key_rules()
        return [(r"conv_s\.(.*)", r"squeeze.\1")] + rules, drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expect_nchw(type(self).__name__, "x", x, self.in_dim, like=self)
        return self._body(self.squeeze(x))

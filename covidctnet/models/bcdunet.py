"""BCDU-Net (Azad et al., ICCVW 2019) in PyTorch, as CovidCTNet uses it to denoise CT slices.

The layer graph, widths, dropout placement and initialisers follow the Keras originals exactly
(``BCDU_net_D3`` / ``BCDU_net_D1`` in rezazad68/BCDU-Net ``models.py`` and in mohofar/CovidCtNet
``Codes/training and testing/Training-CovidCTNet.ipynb``), so that Keras weights load through
:func:`covidctnet.models.keras_import.bcdunet_state_dict_from_keras` and give the same outputs:

* encoder: three blocks of two 3×3 conv + ReLU (widths ``f, 2f, 4f``), each followed by 2×2 max pooling;
* bottleneck (width ``8f``) of 1 (D1) or 3 (D3) conv blocks, densely connected: block 3 reads
  ``concat(block 2, block 1)``;
* decoder: ``ConvTranspose2d(2, stride 2) → BatchNorm (eps 1e-3, Keras momentum 0.99) → ReLU``; the upsampled tensor
  and the encoder skip form a 2-step sequence ``[skip, up]`` for a ConvLSTM (half the level's width) that reads it
  backwards (Keras ``go_backwards=True``: the upsampled tensor first, the skip last), then two 3×3 conv + ReLU;
* head: 3×3 conv to 2 channels + ReLU, then 1×1 conv + sigmoid.

Parameter counts, counted as Keras does (weights + batch-norm moving mean and variance; see
:func:`keras_param_count`): the official CovidCTNet model (``features=32, dense_blocks=3``) 5,167,365;
the original BCDU-Net (``features=64``) D3 20,659,717 and D1 8,861,189.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from covidctnet.core.errors import ConfigError, ShapeError
from covidctnet.models.convlstm import RECURRENT_ACTIVATIONS, ConvLSTM2D

__all__ = ["DOWNSAMPLE_FACTOR", "BCDUNet", "keras_param_count"]

logger = logging.getLogger(__name__)

DOWNSAMPLE_FACTOR = 8
"""Height and width of a BCDU-Net input must be multiples of this (three 2×2 poolings)."""

KERAS_BN_EPS = 1e-3
KERAS_BN_MOMENTUM = 0.01  # torch's momentum is 1 - Keras' (0.99)


def _conv3x3(in_ch: int, out_ch: int) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1)


class _ConvBlock(nn.Sequential):
    """Two 3×3 'same' convolutions, each followed by ReLU (Keras ``Conv2D(..., activation='relu')`` twice)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            _conv3x3(in_ch, out_ch), nn.ReLU(inplace=True), _conv3x3(out_ch, out_ch), nn.ReLU(inplace=True)
        )


class _DenseBottleneck(nn.Module):
    """The densely connected bottleneck: D1 is one conv block; D3 is three, the third fed ``concat(block2, block1)``.

    Dropout follows the Keras originals: in D3 after every block (``drop4_1``, the dropout on ``conv4_2``,
    ``drop4_3``); in D1 none on the path (the original's ``drop4_1`` is not connected to anything).
    """

    def __init__(self, in_ch: int, out_ch: int, dense_blocks: int, dropout: float) -> None:
        super().__init__()
        self.dense_blocks = dense_blocks
        self.block_1 = _ConvBlock(in_ch, out_ch)
        if dense_blocks == 3:
            self.block_2 = _ConvBlock(out_ch, out_ch)
            self.block_3 = _ConvBlock(2 * out_ch, out_ch)
            self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d1 = self.block_1(x)
        if self.dense_blocks == 1:
            return d1
        d1 = self.drop(d1)
        d2 = self.drop(self.block_2(d1))
        return self.drop(self.block_3(torch.cat([d2, d1], dim=1)))


class _UpConvLSTM(nn.Module):
    """Decoder level: upsample, fuse with the skip through a ConvLSTM, then a conv block.

    Args:
        in_ch: channels coming from below.
        out_ch: channels of the skip, of the upsampled tensor and of this level's output.
        bidirectional: a two-way ConvLSTM (output ``out_ch``) instead of Keras' backwards one (output ``out_ch // 2``).
        recurrent_activation: gate activation of the ConvLSTM.
    """

    def __init__(self, in_ch: int, out_ch: int, bidirectional: bool, recurrent_activation: str) -> None:
        super().__init__()
        self.up = nn.Sequential(
            nn.ConvTranspose2d(in_ch, out_ch, kernel_size=2, stride=2),
            nn.BatchNorm2d(out_ch, eps=KERAS_BN_EPS, momentum=KERAS_BN_MOMENTUM),
            nn.ReLU(inplace=True),
        )
        self.lstm = ConvLSTM2D(
            out_ch,
            out_ch // 2,
            kernel_size=3,
            recurrent_activation=recurrent_activation,
            go_backwards=not bidirectional,
            bidirectional=bidirectional,
        )
        self.conv = _ConvBlock(self.lstm.output_channels, out_ch)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = self.up(x)
        # Keras: concatenate([skip, up], axis=1) along time, then ConvLSTM2D(go_backwards=True) reads up, then skip.
        return self.conv(self.lstm(torch.stack([skip, up], dim=1)))


class BCDUNet(nn.Module):
    """BCDU-Net: a U-Net with a densely connected bottleneck and ConvLSTM skip fusion.

    Azad R., Asadi-Aghbolaghi M., Fathy M., Escalera S., "Bi-Directional ConvLSTM U-Net with Densley Connected
    Convolutions", ICCV Workshops 2019, arXiv:1909.00166. CovidCTNet (Javaheri et al., npj Digit. Med. 4, 29, 2021)
    trains it on control CT slices to remove Perlin noise; what it cannot reproduce on a patient's slice (the
    residual ``input - output``) highlights infection.

    Args:
        in_channels: input channels. Default 1 (a CT slice in [0, 1]).
        out_channels: output channels. Default 1.
        features: base width ``f``; the levels have ``f, 2f, 4f`` channels and the bottleneck ``8f``. 32 in the
            official CovidCTNet model (the default), 64 in the BCDU-Net paper. Must be even.
        dense_blocks: conv blocks in the bottleneck, 3 (D3, default, as CovidCTNet) or 1 (D1).
        bidirectional: ``False`` (default) fuses skip and upsampled tensors with a ConvLSTM of ``f_level / 2``
            filters reading ``[skip, up]`` backwards, as the Keras models do (``go_backwards=True``) and as their
            weights need; ``True`` uses a true bidirectional ConvLSTM (both directions, outputs concatenated; more
            parameters, no Keras counterpart).
        recurrent_activation: ConvLSTM gate activation, ``'hard_sigmoid'`` (Keras 2's ``clip(0.2x + 0.5, 0, 1)``;
            default, needed for Keras weights) or ``'sigmoid'``.
        dropout: dropout probability, at the Keras places (on the deepest skip, and in the D3 bottleneck). 0.5.
        head_channels: channels of the 3×3 conv before the final 1×1 conv. 2, as in the Keras models.

    ``self.config`` holds these keyword arguments, so ``BCDUNet.from_config(model.config)`` rebuilds the model
    (e.g. from a model directory's ``config.yaml``).

    Examples:
        >>> net = BCDUNet()                       # official CovidCTNet denoiser (features=32, D3)
        >>> keras_param_count(net)
        5167365
        >>> net(torch.rand(2, 1, 128, 128)).shape
        torch.Size([2, 1, 128, 128])
        >>> BCDUNet(features=64, dense_blocks=1)  # original BCDU-Net D1 # doctest: +ELLIPSIS
        BCDUNet(...)
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        features: int = 32,
        dense_blocks: int = 3,
        bidirectional: bool = False,
        recurrent_activation: str = "hard_sigmoid",
        dropout: float = 0.5,
        head_channels: int = 2,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("head_channels", head_channels),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, not {value!r}")
        if not isinstance(features, int) or isinstance(features, bool) or features < 2 or features % 2:
            raise ValueError(f"features must be an even int >= 2, not {features!r}")
        if dense_blocks not in (1, 3):
            raise ValueError(f"dense_blocks must be 1 (BCDU-Net D1) or 3 (D3), not {dense_blocks!r}")
        if recurrent_activation not in RECURRENT_ACTIVATIONS:
            raise ValueError(
                f"recurrent_activation must be one of {sorted(RECURRENT_ACTIVATIONS)}, not {recurrent_activation!r}"
            )
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), not {dropout!r}")
        self.config: dict[str, Any] = {
            "in_channels": in_channels,
            "out_channels": out_channels,
            "features": features,
            "dense_blocks": dense_blocks,
            "bidirectional": bool(bidirectional),
            "recurrent_activation": recurrent_activation,
            "dropout": float(dropout),
            "head_channels": head_channels,
        }
        logger.debug("BCDUNet %s", self.config)
        f1, f2, f3, f4 = features, 2 * features, 4 * features, 8 * features

        self.conv_0 = _ConvBlock(in_channels, f1)
        self.conv_1 = _ConvBlock(f1, f2)
        self.conv_2 = _ConvBlock(f2, f3)
        self.pool = nn.MaxPool2d(2)
        self.skip_drop = nn.Dropout(dropout)  # Keras drop3: on the deepest skip only, not on the pooled path
        self.bottleneck = _DenseBottleneck(f3, f4, dense_blocks, dropout)
        self.upcat_2 = _UpConvLSTM(f4, f3, bidirectional, recurrent_activation)
        self.upcat_1 = _UpConvLSTM(f3, f2, bidirectional, recurrent_activation)
        self.upcat_0 = _UpConvLSTM(f2, f1, bidirectional, recurrent_activation)
        self.head = nn.Sequential(_conv3x3(f1, head_channels), nn.ReLU(inplace=True))
        self.final_conv = nn.Conv2d(head_channels, out_channels, kernel_size=1)
        self.reset_parameters()

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> BCDUNet:
        """Build a model from a ``self.config``-style dict (e.g. ``components.denoiser.kwargs`` of a model directory).

        Raises:
            ConfigError: an unknown key, or a value the model does not accept.
        """
        valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        unknown = sorted(set(config) - set(valid))
        if unknown:
            raise ConfigError(f"BCDUNet config: unknown keys {unknown}; valid keys: {valid}")
        try:
            return cls(**dict(config))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"BCDUNet config: {err}") from err

    def reset_parameters(self) -> None:
        """Keras initialisers: He-normal (truncated) conv kernels, zero biases, ConvLSTM He-normal kernel with
        orthogonal recurrent kernel and unit forget bias; the final 1×1 conv Glorot-uniform; BN gamma 1, beta 0."""
        in_lstm = {id(sub) for m in self.modules() if isinstance(m, ConvLSTM2D) for sub in m.modules()}
        for m in self.modules():
            if isinstance(m, ConvLSTM2D):
                for cell in (m.cell, m.cell_reverse):
                    if cell is not None:
                        _he_normal_(cell.input_conv.weight)
                        cell.orthogonal_recurrent_init_()
                        cell.reset_bias()
            elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and id(m) not in in_lstm:
                if m is self.final_conv:
                    nn.init.xavier_uniform_(m.weight)
                else:
                    _he_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Denoise a batch of slices.

        Args:
            x: ``(B, in_channels, H, W)``, intensities in [0, 1]; ``H`` and ``W`` must be multiples of 8.

        Returns:
            ``(B, out_channels, H, W)`` in [0, 1] (sigmoid): the denoised slice itself, not the residual (the
            residual is ``x - output``).

        Raises:
            ShapeError: ``x`` is not 4-D with ``in_channels`` channels, or ``H``/``W`` is not a multiple of 8.
        """
        _check_shape(x, self.config["in_channels"])
        c0 = self.conv_0(x)
        c1 = self.conv_1(self.pool(c0))
        c2 = self.conv_2(self.pool(c1))
        b = self.bottleneck(self.pool(c2))
        u2 = self.upcat_2(b, self.skip_drop(c2))
        u1 = self.upcat_1(u2, c1)
        u0 = self.upcat_0(u1, c0)
        return torch.sigmoid(self.final_conv(self.head(u0)))


def _check_shape(x: torch.Tensor, in_channels: int) -> None:
    if x.ndim != 4 or x.shape[1] != in_channels:
        raise ShapeError(f"BCDUNet expects a (B, {in_channels}, H, W) tensor, not shape {tuple(x.shape)}")
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if h % DOWNSAMPLE_FACTOR or w % DOWNSAMPLE_FACTOR or h == 0 or w == 0:
        raise ShapeError(
            f"BCDUNet needs height and width divisible by {DOWNSAMPLE_FACTOR}, got {h}x{w}; "
            f"resize, crop or pad the slice (e.g. to {_round_up(h)}x{_round_up(w)})"
        )


def _round_up(n: int) -> int:
    return max(DOWNSAMPLE_FACTOR, -(-n // DOWNSAMPLE_FACTOR) * DOWNSAMPLE_FACTOR)


def _he_normal_(w: torch.Tensor) -> None:
    """Keras 2 ``he_normal``: truncated normal (±2σ) with σ = sqrt(2 / fan_in) / 0.8796 (the truncation correction)."""
    fan_in, _ = nn.init._calculate_fan_in_and_fan_out(w)
    std = (2.0 / fan_in) ** 0.5 / 0.87962566103423978
    nn.init.trunc_normal_(w, mean=0.0, std=std, a=-2 * std, b=2 * std)


def keras_param_count(model: nn.Module) -> int:
    """Parameters as Keras' ``model.count_params()`` counts them: all weights plus batch-norm moving mean and variance.

    ``num_batches_tracked`` (a torch-only counter) is not counted.
    """
    n = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            assert m.running_mean is not None and m.running_var is not None
            n += m.running_mean.numel() + m.running_var.numel()
    return n

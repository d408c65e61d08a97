"""A 2-D convolutional LSTM with Keras ``ConvLSTM2D`` semantics, written by hand (MONAI and torch have none).

The cell follows Shi et al., "Convolutional LSTM Network" (NeurIPS 2015) as Keras 2 implements it, so that Keras
weights load unchanged (after a channels-last → channels-first transpose) and give the same numbers:

* one input convolution (``Cin → 4F``, with bias) and one recurrent convolution (``F → 4F``, no bias), both with
  padding ``'same'``; the ``4F`` axis holds the gates in Keras' order **i, f, c, o**;
* ``i = σ(x_i + h_i)``, ``f = σ(x_f + h_f)``, ``c = f·c + i·tanh(x_c + h_c)``, ``o = σ(x_o + h_o)``, ``h = o·tanh(c)``,
  where σ is the recurrent activation: ``'hard_sigmoid'`` (Keras 2's ``clip(0.2·x + 0.5, 0, 1)``, not torch's
  ``hardsigmoid``, which is ``clip(x/6 + 1/2, 0, 1)``) or the logistic ``'sigmoid'``;
* zero initial state, bias initialised to zero except the forget gate's ``F`` entries, set to 1 (Keras'
  ``unit_forget_bias=True``);
* parameters: ``4·(k²·Cin·F + k²·F² + F)``.

Keras layout (channels last): kernel ``(kh, kw, Cin, 4F)``, recurrent kernel ``(kh, kw, F, 4F)``, bias ``(4F,)``. Here
``input_conv.weight`` is ``(4F, Cin, kh, kw)`` and ``recurrent_conv.weight`` is ``(4F, F, kh, kw)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["RECURRENT_ACTIVATIONS", "ConvLSTM2D", "ConvLSTM2DCell", "keras_hard_sigmoid"]


def keras_hard_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """Keras 2's ``hard_sigmoid``: ``clip(0.2·x + 0.5, 0, 1)`` (torch's ``hardsigmoid`` uses slope 1/6 instead)."""
    return torch.clamp(0.2 * x + 0.5, 0.0, 1.0)


RECURRENT_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "hard_sigmoid": keras_hard_sigmoid,
    "sigmoid": torch.sigmoid,
}
"""Recurrent (gate) activations by name. ``'hard_sigmoid'`` is the Keras 2 default and what the Keras models used."""


def _pair(k: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(k, int):
        return (k, k)
    k = tuple(int(v) for v in k)
    if len(k) != 2:
        raise ValueError(f"kernel_size must be an int or a pair of ints, not {k}")
    return k  # type: ignore[return-value]


class ConvLSTM2DCell(nn.Module):
    """One ConvLSTM step (Keras ``ConvLSTM2DCell``), channels first.

    Args:
        in_channels: channels ``Cin`` of the input at each time step.
        out_channels: filters ``F`` (channels of the hidden and cell states).
        kernel_size: size of both convolutions (odd or even; padding is ``'same'``, stride 1). Default 3.
        recurrent_activation: ``'hard_sigmoid'`` (Keras 2 default, ``clip(0.2·x + 0.5, 0, 1)``) or ``'sigmoid'``.
        unit_forget_bias: start the forget-gate bias at 1 (Keras default ``True``).

    The state is a pair ``(h, c)`` of ``(B, F, H, W)`` tensors; ``None`` means zeros.
    """
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int] = 3,
        recurrent_activation: str = "hard_sigmoid",
        unit_forget_bias: bool = True,
    ) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be >= 1, not {in_channels} and {out_channels}")
        if recurrent_activation not in RECURRENT_ACTIVATIONS:
            raise ValueError(
                f"recurrent_activation must be one of {sorted(RECURRENT_ACTIVATIONS)}, not {recurrent_activation!r}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.recurrent_activation = recurrent_activation
        self.unit_forget_bias = unit_forget_bias
        self._rec_act = RECURRENT_ACTIVATIONS[recurrent_activation]
        self.input_conv = nn.Conv2d(in_channels, 4 * out_channels, self.kernel_size, padding="same", bias=True)
        self.recurrent_conv = nn.Conv2d(out_channels, 4 * out_channels, self.kernel_size, padding="same", bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Keras defaults: Glorot-uniform kernel, orthogonal recurrent kernel, zero bias with unit forget bias."""
        nn.init.xavier_uniform_(self.input_conv.weight)
        self.orthogonal_recurrent_init_()
        self.reset_bias()

    def orthogonal_recurrent_init_(self) -> None:
        """Orthogonal init of the recurrent kernel viewed as a ``(k²·F, 4F)`` matrix, as Keras does."""
        w = self.recurrent_conv.weight  # (4F, F, kh, kw)
        with torch.no_grad():
            mat = torch.empty(w.shape[0], w[0].numel())
            nn.init.orthogonal_(mat)
            w.copy_(mat.view_as(w))

    def reset_bias(self) -> None:
        bias = self.input_conv.bias
        assert bias is not None
        with torch.no_grad():
            bias.zero_()
            if self.unit_forget_bias:
                bias[self.out_channels : 2 * self.out_channels] = 1.0

    def forward(
        self,
        x: torch.Tensor,
        state: tuple[torch.Tensor, torch.Tensor] | None = None,
        x_conv: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step.

        Args:
            x: ``(B, Cin, H, W)`` input at this step (ignored when ``x_conv`` is given).
            state: ``(h, c)``, each ``(B, F, H, W)``; ``None`` starts from zeros.
            x_conv: the precomputed ``input_conv(x)``, ``(B, 4F, H, W)``; lets a sequence convolve all steps at once.

        Returns:
            The new ``(h, c)``, each ``(B, F, H, W)``.
        """
        gates_x = self.input_conv(x) if x_conv is None else x_conv
        if state is None:
            b, _, h, w = gates_x.shape
            zeros = gates_x.new_zeros(b, self.out_channels, h, w)
            h_prev, c_prev = zeros, zeros
            gates = gates_x  # the recurrent convolution of a zero state is zero (no bias)
        else:
            h_prev, c_prev = state
            gates = gates_x + self.recurrent_conv(h_prev)
        g_i, g_f, g_c, g_o = torch.chunk(gates, 4, dim=1)
        i = self._rec_act(g_i)
        f = self._rec_act(g_f)
        c = f * c_prev + i * torch.tanh(g_c)
        o = self._rec_act(g_o)
        h_new = o * torch.tanh(c)
        return h_new, c

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"recurrent_activation={self.recurrent_activation!r}"
        )


class ConvLSTM2D(nn.Module):
    """A ConvLSTM layer over a sequence of 2-D feature maps, like Keras ``ConvLSTM2D`` (channels first here).

    Args:
        in_channels: channels ``Cin`` per time step.
        out_channels: filters ``F``.
        kernel_size: convolution size, padding ``'same'``. Default 3.
        recurrent_activation: ``'hard_sigmoid'`` (default, Keras 2) or ``'sigmoid'``.
        go_backwards: read the sequence from the last step to the first (Keras ``go_backwards=True``). With
            ``return_sequences=False`` the output is then the state after reading the *first* step.
        bidirectional: run two independent cells, one forwards (``cell``) and one backwards (``cell_reverse``), and
            concatenate their outputs along channels (Keras ``Bidirectional(ConvLSTM2D(...), merge_mode='concat')``,
            forward first), giving ``2F`` output channels and twice the parameters. ``go_backwards`` must then be
            ``False``.
        return_sequences: return every step's ``h`` instead of the last one only. For ``go_backwards`` the steps come
            in processing order (reversed), as Keras returns them; the bidirectional layer aligns the backward outputs
            with the input steps, as Keras' ``Bidirectional`` does.
        unit_forget_bias: forget-gate bias starts at 1 (Keras default).

    Shapes:
        input ``(B, T, Cin, H, W)``; output ``(B, F·d, H, W)`` or, with ``return_sequences``, ``(B, T, F·d, H, W)``,
        where ``d`` is 2 for the bidirectional layer, else 1.

    Examples:
        >>> lstm = ConvLSTM2D(3, 4, go_backwards=True)
        >>> lstm(torch.zeros(2, 2, 3, 6, 5)).shape
        torch.Size([2, 4, 6, 5])
    """
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int] = 3,
        recurrent_activation: str = "hard_sigmoid",
        go_backwards: bool = False,
        bidirectional: bool = False,
        return_sequences: bool = False,
        unit_forget_bias: bool = True,
    ) -> None:
        super().__init__()
        if bidirectional and go_backwards:
            raise ValueError("go_backwards must be False when bidirectional=True (the layer already reads both ways)")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.go_backwards = go_backwards
        self.bidirectional = bidirectional
        self.return_sequences = return_sequences
        self.cell = ConvLSTM2DCell(in_channels, out_channels, kernel_size, recurrent_activation, unit_forget_bias)
        self.cell_reverse = (
            ConvLSTM2DCell(in_channels, out_channels, kernel_size, recurrent_activation, unit_forget_bias)
            if bidirectional
            else None
        )

    @property
    def output_channels(self) -> int:
        """Channels of the output: ``F``, or ``2F`` when bidirectional."""
        return self.out_channels * (2 if self.bidirectional else 1)

    @staticmethod
    def _run(cell: ConvLSTM2DCell, x: torch.Tensor, reverse: bool) -> list[torch.Tensor]:
        """Run ``cell`` over ``x`` (B, T, C, H, W); returns ``h`` of every step in processing order."""
        b, t, c, h, w = x.shape
        # The input convolution has no recurrence: do all T steps in one call.
        xc = cell.input_conv(x.reshape(b * t, c, h, w)).reshape(b, t, -1, h, w)
        steps = range(t - 1, -1, -1) if reverse else range(t)
        state: tuple[torch.Tensor, torch.Tensor] | None = None
        outs = []
        for s in steps:
            state = cell(x[:, s], state, x_conv=xc[:, s])
            outs.append(state[0])
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError(f"ConvLSTM2D expects (B, T, C, H, W), not a tensor of shape {tuple(x.shape)}")
        if x.shape[2] != self.in_channels:
            raise ValueError(f"ConvLSTM2D expects {self.in_channels} channels per step, not {x.shape[2]}")
        fwd = self._run(self.cell, x, reverse=self.go_backwards)
        if self.cell_reverse is None:
            return torch.stack(fwd, dim=1) if self.return_sequences else fwd[-1]
        bwd = self._run(self.cell_reverse, x, reverse=True)
        if self.return_sequences:
            return torch.cat([torch.stack(fwd, dim=1), torch.stack(bwd[::-1], dim=1)], dim=2)
        return torch.cat([fwd[-1], bwd[-1]], dim=1)

    def extra_repr(self) -> str:
        return (
            f"go_backwards={self.go_backwards}, bidirectional={self.bidirectional}, "
            f"return_sequences={self.return_sequences}"
        )

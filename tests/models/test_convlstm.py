"""ConvLSTM2D: Keras parity on the tiny reference case, parameter count, time order, bidirectional layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from covidctnet.models.convlstm import ConvLSTM2D, ConvLSTM2DCell, keras_hard_sigmoid


@pytest.fixture(scope="module")
def tiny(reference_dir):
    """Keras ConvLSTM2D(4 filters, go_backwards, hard_sigmoid) on x (2 steps, 6x5, 3 channels), channels last."""
    d = np.load(reference_dir / "bcdunet_keras_seeded_random_io.npz")
    return {
        k: d[k] for k in ("convlstm_x", "convlstm_kernel", "convlstm_recurrent_kernel", "convlstm_bias", "convlstm_y")
    }


def _load_keras(lstm: ConvLSTM2D, tiny: dict[str, np.ndarray]) -> None:
    with torch.no_grad():
        lstm.cell.input_conv.weight.copy_(torch.from_numpy(tiny["convlstm_kernel"]).permute(3, 2, 0, 1))
        lstm.cell.recurrent_conv.weight.copy_(torch.from_numpy(tiny["convlstm_recurrent_kernel"]).permute(3, 2, 0, 1))
        lstm.cell.input_conv.bias.copy_(torch.from_numpy(tiny["convlstm_bias"]))


def _run(lstm: ConvLSTM2D, tiny: dict[str, np.ndarray]) -> np.ndarray:
    x = torch.from_numpy(tiny["convlstm_x"]).permute(0, 1, 4, 2, 3)  # (B, T, H, W, C) -> (B, T, C, H, W)
    with torch.no_grad():
        return lstm(x).permute(0, 2, 3, 1).numpy()  # (B, F, H, W) -> (B, H, W, F)


def test_keras_parity(tiny):
    lstm = ConvLSTM2D(3, 4, go_backwards=True, recurrent_activation="hard_sigmoid")
    _load_keras(lstm, tiny)
    y = _run(lstm, tiny)
    assert y.shape == tiny["convlstm_y"].shape == (2, 6, 5, 4)
    np.testing.assert_allclose(y, tiny["convlstm_y"], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kwargs", [{"go_backwards": False}, {"go_backwards": True, "recurrent_activation": "sigmoid"}], ids=["fwd", "sigm"]
)
def test_keras_parity_needs_backwards_and_hard_sigmoid(tiny, kwargs):
    """The reference tells the variants apart: forward time order or the logistic gate do not reproduce it."""
    lstm = ConvLSTM2D(3, 4, **kwargs)
    _load_keras(lstm, tiny)
    assert np.abs(_run(lstm, tiny) - tiny["convlstm_y"]).max() > 1e-2


def test_keras_hard_sigmoid_is_not_torch_hardsigmoid():
    x = torch.tensor([-3.0, -2.5, -1.0, 0.0, 1.0, 2.5, 3.0])
    np.testing.assert_allclose(keras_hard_sigmoid(x).numpy(), [0.0, 0.0, 0.3, 0.5, 0.7, 1.0, 1.0], atol=1e-7)
    assert not torch.allclose(keras_hard_sigmoid(x), torch.nn.functional.hardsigmoid(x))


@pytest.mark.parametrize("cin, f, k", [(3, 4, 3), (128, 64, 3), (16, 8, 5)])
def test_param_count(cin, f, k):
    lstm = ConvLSTM2D(cin, f, kernel_size=k)
    assert sum(p.numel() for p in lstm.parameters()) == 4 * (k * k * cin * f + k * k * f * f + f)
    bi = ConvLSTM2D(cin, f, kernel_size=k, bidirectional=True)
    assert sum(p.numel() for p in bi.parameters()) == 8 * (k * k * cin * f + k * k * f * f + f)


def test_unit_forget_bias():
    cell = ConvLSTM2DCell(3, 4)
    b = cell.input_conv.bias.detach()
    assert torch.equal(b[4:8], torch.ones(4)) and not b[:4].any() and not b[8:].any()
    assert not ConvLSTM2DCell(3, 4, unit_forget_bias=False).input_conv.bias.detach().any()


def test_go_backwards_equals_reversed_sequence():
    torch.manual_seed(0)
    lstm = ConvLSTM2D(2, 3, go_backwards=True)
    x = torch.randn(2, 3, 2, 8, 8)
    fwd = ConvLSTM2D(2, 3)
    fwd.load_state_dict(lstm.state_dict())
    torch.testing.assert_close(lstm(x), fwd(x.flip(1)))


def test_bidirectional_concatenates_both_directions():
    torch.manual_seed(0)
    bi = ConvLSTM2D(2, 3, bidirectional=True)
    x = torch.randn(1, 2, 2, 8, 8)
    one = ConvLSTM2D(2, 3)
    back = ConvLSTM2D(2, 3, go_backwards=True)
    back.cell.load_state_dict(bi.cell_reverse.state_dict())
    one.cell.load_state_dict(bi.cell.state_dict())
    y = bi(x)
    assert y.shape == (1, 6, 8, 8) and bi.output_channels == 6
    torch.testing.assert_close(y, torch.cat([one(x), back(x)], dim=1))


def test_return_sequences_shapes_and_last_step():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3, 6, 6)
    seq = ConvLSTM2D(3, 5, return_sequences=True)
    last = ConvLSTM2D(3, 5)
    last.load_state_dict(seq.state_dict())
    ys = seq(x)
    assert ys.shape == (2, 4, 5, 6, 6)
    torch.testing.assert_close(ys[:, -1], last(x))
    bi = ConvLSTM2D(3, 5, bidirectional=True, return_sequences=True)
    assert bi(x).shape == (2, 4, 10, 6, 6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="recurrent_activation"):
        ConvLSTM2D(3, 4, recurrent_activation="relu")
    with pytest.raises(ValueError, match="go_backwards"):
        ConvLSTM2D(3, 4, go_backwards=True, bidirectional=True)
    with pytest.raises(ValueError, match=r"\(B, T, C, H, W\)"):
        ConvLSTM2D(3, 4)(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="3 channels"):
        ConvLSTM2D(3, 4)(torch.zeros(1, 2, 2, 8, 8))

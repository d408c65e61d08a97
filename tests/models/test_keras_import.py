"""Import of the official CovidCTNet Keras 3D CNN: numeric parity with a NumPy re-implementation of the Keras forward
pass, computed straight from the h5 file's arrays (not from our converted state dict), and refusal of other files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from covidctnet import CLASS_NAMES
from covidctnet.core.errors import CheckpointError
from covidctnet.models.cnn3d import CovidCTNet3D
from covidctnet.models.keras_import import CNN3D_KERAS_INPUT_SIZE, cnn3d_state_dict_from_keras, read_keras_h5

H5_NAME = "weight_cnn_CovidCtNet_v2_final.h5"


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread: on the shared 2-core machine, 2 OpenMP threads competing with other jobs made a conv3d
    training step 20x slower (5.7 s instead of 0.24 s)."""
    import contextlib

    try:  # the NumPy reference's matmuls suffer the same way (threadpoolctl comes with scikit-learn)
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        threadpool_limits = None
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1) if threadpool_limits else contextlib.nullcontext():
        yield
    torch.set_num_threads(n)


# --- an independent NumPy model of Keras' channels-last forward pass -----------------------------------------------


def _keras_conv3d_relu(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, padding: str) -> np.ndarray:
    """Keras Conv3D(stride 1, activation='relu') on one (D, H, W, C) volume; kernel (kd, kh, kw, in, out).

    A sum over the 27 kernel offsets of (voxels, in) @ (in, out) products: cross-correlation, as Keras computes it.
    """
    kd, kh, kw = kernel.shape[:3]
    if padding == "same":  # odd kernel, stride 1: Keras pads (k - 1) / 2 on both sides
        x = np.pad(x, ((kd // 2,) * 2, (kh // 2,) * 2, (kw // 2,) * 2, (0, 0)))
    d, h, w = x.shape[0] - kd + 1, x.shape[1] - kh + 1, x.shape[2] - kw + 1
    out = np.broadcast_to(bias, (d, h, w, kernel.shape[4])).copy()
    for i in range(kd):
        for j in range(kh):
            for k in range(kw):
                out += x[i : i + d, j : j + h, k : k + w] @ kernel[i, j, k]
    return np.maximum(out, 0.0)


def _keras_maxpool3d(x: np.ndarray) -> np.ndarray:
    """Keras MaxPooling3D(2) with padding='valid': odd trailing voxels are dropped (floor)."""
    d, h, w, c = (x.shape[0] // 2, x.shape[1] // 2, x.shape[2] // 2, x.shape[3])
    return x[: 2 * d, : 2 * h, : 2 * w].reshape(d, 2, h, 2, w, 2, c).max(axis=(1, 3, 5))


def keras_forward_numpy(weights: dict[str, list[np.ndarray]], volume: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The official Sequential model, layer by layer in the file's order, float64. Returns (logits, softmax)."""
    x = volume.astype(np.float64)[..., None]  # (D, H, W) -> channels-last (D, H, W, 1)
    names = list(weights)
    dense_names = [n for n in names if n.startswith("dense")]
    first_conv = True
    for name in names:
        arrays = [a.astype(np.float64) for a in weights[name]]
        if name.startswith("conv3d"):
            # the notebook's first Conv3D has no padding argument ('valid'); all others padding='same'
            x = _keras_conv3d_relu(x, arrays[0], arrays[1], "valid" if first_conv else "same")
            first_conv = False
        elif name.startswith("max_pooling3d"):
            x = _keras_maxpool3d(x)
        elif name.startswith("flatten"):
            x = x.reshape(-1)  # C order over (d, h, w, c): Keras' channels-last flatten
        elif name.startswith("dense"):
            x = x @ arrays[0] + arrays[1]
            if name != dense_names[-1]:
                x = np.maximum(x, 0.0)
        elif not name.startswith("dropout"):  # dropout is the identity at inference
            raise AssertionError(f"unexpected Keras layer {name}")
    logits = x
    e = np.exp(logits - logits.max())
    return logits, e / e.sum()


# --- tests -----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def official_h5(reference_dir):
    return reference_dir / H5_NAME


@pytest.fixture(scope="module")
def imported_model(official_h5):
    model = CovidCTNet3D(input_size=CNN3D_KERAS_INPUT_SIZE)
    model.load_state_dict(cnn3d_state_dict_from_keras(official_h5), strict=True)
    return model.eval()


def _inputs() -> list[np.ndarray]:
    """Two seeded random 50x128x128 volumes at residual-like scales, where the official CNN's softmax is not saturated
    (a normal(0, 0.5) input already drives it to p > 0.9999), so probabilities really are compared."""
    rng = np.random.default_rng(20210301)
    shape = CNN3D_KERAS_INPUT_SIZE
    return [
        rng.normal(0.0, 0.02, size=shape).astype(np.float32),
        rng.uniform(0.0, 0.1, size=shape).astype(np.float32),
    ]


def _real_ct_input(nifti_ct) -> np.ndarray:
    """A real CT (shared NIfTI) made residual-like: HU windowed to [0, 1], minus its Gaussian blur, resized to
    50x128x128 (slices, rows, columns). Not a BCDU-Net residual; it gives the parity check real anatomy and edges."""
    import nibabel as nib
    from scipy import ndimage

    hu = np.asarray(nib.load(nifti_ct).dataobj, dtype=np.float32)  # (x, y, z)
    vol = np.clip((hu + 1024.0) / 1424.0, 0.0, 1.0).transpose(2, 1, 0)  # (z, y, x) = (D, H, W)
    residual = vol - ndimage.gaussian_filter(vol, 1.5)
    zoom = [t / s for t, s in zip(CNN3D_KERAS_INPUT_SIZE, residual.shape)]
    return ndimage.zoom(residual, zoom, order=1).astype(np.float32)


def test_parity_with_numpy_keras_forward(official_h5, imported_model, nifti_ct):
    weights = read_keras_h5(official_h5)
    volumes = _inputs() + [_real_ct_input(nifti_ct)]
    assert all(v.shape == CNN3D_KERAS_INPUT_SIZE for v in volumes)
    with torch.no_grad():
        logits_t = imported_model(torch.from_numpy(np.stack(volumes)[:, None])).double().numpy()
    probs_t = torch.softmax(torch.from_numpy(logits_t), dim=1).numpy()
    for i, volume in enumerate(volumes):
        logits_k, probs_k = keras_forward_numpy(weights, volume)
        np.testing.assert_allclose(probs_t[i], probs_k, atol=1e-4, err_msg=f"probabilities, input {i}")
        # logits too, relative to their scale, so that a saturated softmax cannot hide a difference
        np.testing.assert_allclose(logits_t[i], logits_k, atol=1e-4 * max(1.0, np.abs(logits_k).max()))
    # the comparison means something only if the inputs do not all saturate the softmax
    assert min(probs_t.max(axis=1)) < 0.99


def test_flatten_order_matters(official_h5, imported_model):
    """Without the (d, h, w, c) -> (c, d, h, w) row permutation the logits differ: the permutation is needed."""
    weights = read_keras_h5(official_h5)
    naive = CovidCTNet3D(input_size=CNN3D_KERAS_INPUT_SIZE).eval()
    state = cnn3d_state_dict_from_keras(official_h5)
    state["head.fc.weight"] = torch.from_numpy(np.ascontiguousarray(weights["dense"][0].T))
    naive.load_state_dict(state)
    x = torch.from_numpy(_inputs()[0][None, None])
    with torch.no_grad():
        assert not torch.allclose(naive(x), imported_model(x), atol=1e-3)


def test_class_order_kept(official_h5):
    """Output k of our model is Keras output k: 0 control, 1 covid, 2 cap (the notebook's Label list)."""
    assert CLASS_NAMES == ("control", "covid", "cap")
    weights = read_keras_h5(official_h5)
    state = cnn3d_state_dict_from_keras(official_h5)
    kernel, bias = weights["dense_1"]
    assert kernel.shape == (32, len(CLASS_NAMES))
    for k in range(len(CLASS_NAMES)):
        np.testing.assert_array_equal(state["head.out.weight"][k].numpy(), kernel[:, k])
        assert state["head.out.bias"][k].item() == bias[k]


def test_conv_kernel_layout(official_h5):
    """Conv3D (kd, kh, kw, in, out) -> Conv3d (out, in, kd, kh, kw): spot-check one element of every layer."""
    weights = read_keras_h5(official_h5)
    state = cnn3d_state_dict_from_keras(official_h5)
    convs = [n for n in weights if n.startswith("conv3d")]
    keys = [f"features.{i}.conv{j}.weight" for i in range(5) for j in (1, 2)]
    for name, key in zip(convs, keys):
        k = weights[name][0]
        d, h, w, ci, co = (s - 1 for s in k.shape)
        assert state[key][co, ci, d, h, w].item() == k[d, h, w, ci, co]
        assert state[key][0, ci, 0, 1, 2].item() == k[0, 1, 2, ci, 0]


def test_other_architecture_refused(reference_dir):
    """The BCDU-Net Keras file is a valid Keras h5 of another model: refused with a one-line CheckpointError."""
    other = reference_dir / "bcdunet_keras_seeded_random.h5"
    with pytest.raises(CheckpointError, match="not the CovidCTNet 3D CNN") as info:
        cnn3d_state_dict_from_keras(other)
    assert str(other) in str(info.value) and "\n" not in str(info.value)


def test_wrong_shapes_refused(official_h5):
    """Right layer count, wrong shapes (a model built for another input size): the differing layer is named."""
    weights = read_keras_h5(official_h5)
    weights["dense"] = [np.zeros((6272, 32), np.float32), weights["dense"][1]]  # 50x240x240 flatten size
    with pytest.raises(CheckpointError, match="'dense' has kernel \\(6272, 32\\)"):
        cnn3d_state_dict_from_keras(weights)


def test_not_hdf5_refused(tmp_path):
    bad = tmp_path / "weights.h5"
    bad.write_bytes(b"not an hdf5 file")
    with pytest.raises(CheckpointError, match="weights.h5"):
        cnn3d_state_dict_from_keras(bad)

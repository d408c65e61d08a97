"""CovidCTNet 3D CNN: parameter count and shapes of the official architecture, the classifier factory (MONAI 3D
DenseNet / ResNet), model-directory loading with architecture checks, and a fit of the three real CT series."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from covidctnet.core.errors import ConfigError, ModelDirError, ShapeError
from covidctnet.core.model_dir import load_model_dir, save_model_dir
from covidctnet.models.cnn3d import (
    CLASSIFIER_ARCHS,
    CovidCTNet3D,
    build_classifier,
    predict_proba,
    residual_to_network_input,
)
from covidctnet.models.registry import DEMO_MODEL, load_classifier
from covidctnet.preprocessing.preprocess import ras_to_official_layout

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _seeded(fn, seed: int = 0):
    """Run ``fn`` with torch's global RNG seeded, without leaking the seed into other tests."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return fn()


def test_param_count_official_size():
    """920,715 parameters at 50x128x128, as the official Keras model.summary() and the h5 file's weights."""
    assert _n_params(CovidCTNet3D(input_size=(50, 128, 128))) == 920_715


SHAPE_CASES = [
    # input_size, batch, flattened features (channels x pooled d x h x w; Keras notes: (1, 3, 3, 128) at 50x128x128)
    ((50, 128, 128), 2, 128 * 1 * 3 * 3),
    ((50, 240, 240), 1, 128 * 1 * 7 * 7),  # our default grid: 240 -> 238 -> 119 -> 59 -> 29 -> 14 -> 7
]


@pytest.mark.parametrize("input_size, batch, n_flat", SHAPE_CASES, ids=["official-50x128x128", "default-50x240x240"])
def test_output_shape(input_size, batch, n_flat):
    model = CovidCTNet3D(input_size=input_size).eval()
    assert model.head.fc.in_features == n_flat
    with torch.no_grad():
        out = model(torch.rand(batch, 1, *input_size, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (batch, 3)
    assert torch.isfinite(out).all()


def test_default_input_size_is_project_grid():
    assert CovidCTNet3D().input_size == (50, 240, 240)


def test_wrong_input_shape_is_shape_error():
    model = CovidCTNet3D(input_size=(34, 40, 40))
    with pytest.raises(ShapeError, match=r"\(34, 40, 40\).*got \(1, 1, 34, 40, 41\)"):
        model(torch.zeros(1, 1, 34, 40, 41))
    with pytest.raises(ShapeError):
        model(torch.zeros(1, 34, 40, 40))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"input_size": (33, 128, 128)}, "≥ 34 voxels"),
        ({"input_size": (50, 128)}, "depth, height, width"),
        ({"filters": ()}, "filters"),
        ({"dropout": 1.0}, "dropout"),
    ],
    ids=["too-small", "2d-size", "no-filters", "dropout-1"],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        CovidCTNet3D(**kwargs)


def test_predict_proba_rows_sum_to_one():
    model = _seeded(lambda: CovidCTNet3D(input_size=(34, 40, 40))).eval()
    p = predict_proba(model, torch.rand(3, 1, 34, 40, 40, generator=torch.Generator().manual_seed(1)))
    assert p.shape == (3, 3) and p.dtype == torch.float32
    torch.testing.assert_close(p.sum(dim=1), torch.ones(3))


class _Parameterless(torch.nn.Module):
    """A classifier compiled elsewhere, as the onnxruntime and OpenVINO modules: same logits, no parameters."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self._run = model.forward  # not registered as a submodule: parameters() stays empty

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x)


def test_predict_proba_of_a_module_without_parameters():
    """predict and the int8 gate call predict_proba on every backend: a parameterless module runs on the CPU and
    gets exactly the probabilities of the module it stands for."""
    model = _seeded(lambda: CovidCTNet3D(input_size=(34, 40, 40))).eval()
    bare = _Parameterless(model)
    assert next(bare.parameters(), None) is None
    x = torch.rand(2, 1, 34, 40, 40, generator=torch.Generator().manual_seed(2))
    assert torch.equal(predict_proba(bare, x), predict_proba(model, x))


def test_network_input_layout():
    x, y, z = 5, 4, 3
    array = np.arange(x * y * z, dtype=np.float32).reshape(x, y, z)
    t = residual_to_network_input(array)
    assert t.shape == (1, z, y, x) and t.dtype == torch.float32 and t.is_contiguous()
    # RAS voxel (i, j, k) lands at slice k, row Y-1-j (anterior at the top), column X-1-i (patient right on the left)
    for i, j, k in [(0, 0, 0), (4, 1, 2), (2, 3, 1)]:
        assert t[0, k, y - 1 - j, x - 1 - i] == array[i, j, k]
    assert torch.equal(t[0], torch.from_numpy(ras_to_official_layout(array)))
    with pytest.raises(ShapeError, match="must be 3-D"):
        residual_to_network_input(np.zeros((2, 2)))


def test_recorded_converters_name_the_one_conversion():
    """Model directories record the converter by name; the name written before it moved to the classifier's module
    still imports it, so older directories stay truthful."""
    for name in (load_model_dir(DEMO_MODEL).config["input"]["converter"],
                 "covidctnet.models.cnn3d.residual_to_network_input"):
        module, attr = name.rsplit(".", 1)
        assert getattr(importlib.import_module(module), attr) is residual_to_network_input


# --- factory ---------------------------------------------------------------------------------------------------------

FACTORY_CASES = [
    ("covidctnet3d", {"filters": (2, 2, 4, 4, 8)}, (34, 36, 36)),
    ("densenet121", {}, (32, 32, 32)),  # MONAI's 3D DenseNet downsamples by 32: 32 is its smallest cube
    ("resnet18", {}, (16, 32, 32)),
    ("resnet10", {"widen_factor": 0.5}, (16, 32, 32)),
]


@pytest.mark.parametrize("arch, kwargs, input_size", FACTORY_CASES, ids=[c[0] for c in FACTORY_CASES])
def test_factory_builds_and_rebuilds(arch, kwargs, input_size):
    model = build_classifier(arch, in_channels=1, num_classes=3, input_size=input_size, **kwargs).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 1, *input_size, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (2, 3)
    assert model.spec["arch"] == arch and model.spec["kwargs"]["input_size"] == list(input_size)
    rebuilt = build_classifier(model.spec["arch"], **model.spec["kwargs"])
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_factory_official_spec_is_complete():
    spec = build_classifier("covidctnet3d", input_size=(50, 128, 128)).spec
    assert spec == {
        "arch": "covidctnet3d",
        "kwargs": {
            "in_channels": 1,
            "num_classes": 3,
            "input_size": [50, 128, 128],
            "filters": [8, 16, 32, 64, 128],
            "hidden_features": 32,
            "dropout": 0.3,
        },
    }


def test_factory_unknown_arch_lists_valid():
    with pytest.raises(ConfigError, match="unknown classifier arch 'vgg16'") as info:
        build_classifier("vgg16")
    for name in ("covidctnet3d", "densenet121", "resnet18"):
        assert name in str(info.value)
    assert set(CLASSIFIER_ARCHS) >= {"covidctnet3d", "densenet121", "resnet18"}


def test_factory_densenet_too_small():
    with pytest.raises(ConfigError, match="densenet121 cannot take input_size \\(16, 32, 32\\).*≥ 29"):
        build_classifier("densenet121", input_size=(16, 32, 32))


def test_factory_unknown_kwarg():
    with pytest.raises(ConfigError, match="covidctnet3d.*widen_factor"):
        build_classifier("covidctnet3d", input_size=(34, 34, 34), widen_factor=2)


# --- model directories -----------------------------------------------------------------------------------------------


def _save(tmp_path, spec, state, name="md"):
    config = {"name": name, "class_names": ["control", "covid", "cap"], "components": {"classifier": dict(spec)}}
    return save_model_dir(tmp_path / name, config, {"classifier": state}, "# test model\n")


def test_load_classifier_roundtrip(tmp_path):
    model = _seeded(lambda: build_classifier("covidctnet3d", input_size=(34, 36, 36), filters=(2, 2, 4, 4, 8))).eval()
    _save(tmp_path, model.spec, model.state_dict())
    loaded = load_classifier(tmp_path / "md")
    assert not loaded.training
    x = torch.rand(2, 1, 34, 36, 36, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_load_classifier_shape_mismatch(tmp_path):
    """Weights of a narrower CNN under a config of the official widths: refused, naming the first key and shapes."""
    small = build_classifier("covidctnet3d", input_size=(34, 36, 36), filters=(2, 2, 4, 4, 8))
    spec = build_classifier("covidctnet3d", input_size=(34, 36, 36)).spec
    _save(tmp_path, spec, small.state_dict())
    with pytest.raises(ModelDirError, match=r"shape mismatch: features\.0\.conv1\.weight: file \(2, 1, 3, 3, 3\) vs "
                       r"model \(8, 1, 3, 3, 3\)") as info:
        load_classifier(tmp_path / "md")
    assert "\n" not in str(info.value)


def test_load_classifier_other_architecture(tmp_path):
    """CovidCTNet3D weights under a resnet18 config: missing and unexpected keys are named."""
    cnn = build_classifier("covidctnet3d", input_size=(34, 36, 36), filters=(2, 2, 4, 4, 8))
    _save(tmp_path, build_classifier("resnet18").spec, cnn.state_dict())
    with pytest.raises(ModelDirError, match=r"missing: conv1\.weight.*unexpected: features\.0\.conv1\."):
        load_classifier(tmp_path / "md")


def test_load_classifier_unknown_arch(tmp_path):
    cnn = build_classifier("covidctnet3d", input_size=(34, 36, 36), filters=(2, 2, 4, 4, 8))
    _save(tmp_path, {"arch": "unet9000", "kwargs": {}}, cnn.state_dict())
    with pytest.raises(ModelDirError, match="unknown classifier arch 'unet9000'"):
        load_classifier(tmp_path / "md")


# --- learning on real data -------------------------------------------------------------------------------------------


def _real_volumes(dicom_dirs, size):
    """The three shared DICOM series (32 slices of 512x512), HU windowed to [0, 1], resized to ``size`` (D, H, W)."""
    import SimpleITK as sitk

    vols, labels = [], []
    for label, index in (("control", 0), ("covid", 1), ("cap", 2)):
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(dicom_dirs[label])))
        hu = torch.from_numpy(sitk.GetArrayFromImage(reader.Execute()).astype("float32"))  # (z, y, x)
        vol = ((hu + 1024.0) / 1424.0).clamp(0, 1)
        vols.append(torch.nn.functional.interpolate(vol[None, None], size=size, mode="trilinear")[0])
        labels.append(index)
    return torch.stack(vols), torch.tensor(labels)


def test_overfits_three_real_volumes(dicom_dirs):
    """The network learns: 40 Adam steps on the three real series (control, covid, cap) drive the loss near 0.

    Official widths at the smallest input the architecture takes (34 voxels a side) to stay fast on a CPU."""
    size = (34, 34, 34)
    x, y = _real_volumes(dicom_dirs, size)
    assert x.shape == (3, 1, *size) and torch.isfinite(x).all()
    loss_fn = torch.nn.CrossEntropyLoss()

    def train():
        model = CovidCTNet3D(input_size=size).eval()
        with torch.no_grad():
            initial = loss_fn(model(x), y).item()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        model.train()  # dropout on, as in real training
        for _ in range(40):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            return model, initial, loss_fn(model(x), y).item()

    model, initial, final = _seeded(train)
    assert final < 0.05 < initial
    assert predict_proba(model, x).argmax(dim=1).tolist() == [0, 1, 2]

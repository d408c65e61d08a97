"""Pretrained starts (covidctnet.models.pretrained), without network: weights files in torchvision's format are built
here from torchvision's own key names and shapes (``torchvision_keys.json``, dumped from torchvision 0.29.1's
``densenet121()`` and ``resnet18()``, DenseNet keys in the ``norm.1`` style of its ImageNet checkpoint files) and
loaded through the real code path: torchvision's cache under ``$TORCH_HOME``, or a file given to ``--init``."""

from __future__ import annotations

import json
import urllib.error
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from covidctnet.cli import cli
from covidctnet.core.config import load_config
from covidctnet.core.errors import CheckpointError, ConfigError, InputError
from covidctnet.models.pretrained import (
    IMAGENET_URLS,
    init_slice_model,
    load_medicalnet_weights,
    medicalnet_resnet_kwargs,
)
from covidctnet.models.slice import build_slice_model
from covidctnet.training.slice import SliceTrainConfig, init_slice_weights, slice_model_kwargs

KEYS = json.loads(Path(__file__).with_name("torchvision_keys.json").read_text())


def torchvision_state(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under torchvision's key names and shapes for ``arch`` (1000 ImageNet classes, RGB stem)."""
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.tensor(7) if k.endswith("num_batches_tracked") else torch.randn(shape, generator=g)
             for k, shape in KEYS[arch]}
    return {k: v.abs() + 0.5 if k.endswith("running_var") else v for k, v in state.items()}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """torchvision's cache in a fresh $TORCH_HOME, with downloads failing as they do offline."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return tmp_path / "torch" / "hub" / "checkpoints"


def _save_in_cache(cache: Path, arch: str, state: dict[str, torch.Tensor]) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(state, cache / IMAGENET_URLS[arch].rsplit("/", 1)[1])


def test_imagenet_densenet_from_torchvision_cache(cache):
    state = torchvision_state("densenet121")
    _save_in_cache(cache, "densenet121", state)
    model = build_slice_model("densenet121", in_channels=2)  # slice + lung mask
    head_before = model.class_layers.out.weight.clone()
    info = init_slice_model(model, "densenet121", "imagenet")
    got = model.state_dict()
    assert info["source"] == "imagenet" and info["file"] == "densenet121-a639ec97.pth"
    assert info["tensors"] == len(state) - 2  # everything but classifier.weight / .bias
    # the old-style dense-layer names, the transitions and the last norm land where they belong
    pairs = {"features.denseblock1.denselayer1.layers.norm1.weight": "features.denseblock1.denselayer1.norm.1.weight",
             "features.denseblock4.denselayer16.layers.conv2.weight": "features.denseblock4.denselayer16.conv.2.weight",
             "features.transition3.conv.weight": "features.transition3.conv.weight",
             "features.norm5.running_var": "features.norm5.running_var"}
    for ours, theirs in pairs.items():
        assert torch.equal(got[ours], state[theirs]), ours
    # the grey channel gets the RGB kernels' sum (= the RGB stem on grey repeated 3 times); the mask channel zero
    assert torch.allclose(got["features.conv0.weight"][:, 0], state["features.conv0.weight"].sum(dim=1))
    assert not got["features.conv0.weight"][:, 1].any()
    assert torch.equal(model.class_layers.out.weight, head_before)  # the 2-class head keeps its fresh weights


def test_imagenet_resnet_needs_torchvision_layout(cache):
    state = torchvision_state("resnet18", seed=1)
    _save_in_cache(cache, "resnet18", state)
    model = build_slice_model("resnet18", layout="torchvision")
    init_slice_model(model, "resnet18", "imagenet")
    got = model.state_dict()
    for key, value in state.items():
        if key == "conv1.weight":
            assert torch.allclose(got[key], value.sum(dim=1, keepdim=True))
        elif not key.startswith("fc."):
            assert torch.equal(got[key], value), key
    assert model.conv1.stride == (2, 2)
    # MONAI's default layout has biased shortcut convs: named in one line, nothing loaded half-way
    with pytest.raises(CheckpointError, match=r"missing: layer2\.0\.downsample\.0\.bias") as err:
        init_slice_model(build_slice_model("resnet18"), "resnet18", "imagenet")
    assert "\n" not in str(err.value)


def test_mismatched_weights_file_is_one_line(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision_state("resnet18"), path)
    with pytest.raises(CheckpointError) as err:
        init_slice_model(build_slice_model("densenet121"), "densenet121", path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "missing" in msg and "unexpected" in msg
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read weights"):
        init_slice_model(build_slice_model("densenet121"), "densenet121", tmp_path / "junk.pth")


def test_offline_without_the_file_says_what_to_download(cache):
    with pytest.raises(InputError) as err:
        init_slice_model(build_slice_model("densenet169"), "densenet169", "imagenet")
    assert str(err.value).startswith("ImageNet weights for densenet169 not found: download "
                                     f"https://download.pytorch.org/models/densenet169-b2777c0a.pth to {cache}/")
    with pytest.raises(ConfigError, match="full width"):
        load_config(SliceTrainConfig, None, {"arch": "resnet18", "width": 0.5, "init": "imagenet"})


def test_train_slice_cli_offline_error(cache, mini_ucsd, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train-slice", str(mini_ucsd), "-o", str(out), "--arch", "densenet169",
                                      "--init", "imagenet"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "densenet169-b2777c0a.pth" in errors[0] and str(cache) in errors[0]
    assert "Traceback" not in result.output and not out.exists()


def test_timm_style_file_through_train_slice_init(tmp_path):
    # timm / training-checkpoint style: DataParallel's 'module.' prefix, safetensors
    state = torchvision_state("resnet18", seed=2)
    path = tmp_path / "resnet18_timm.safetensors"
    save_file({f"module.{k}": v for k, v in state.items()}, str(path))
    cfg = load_config(SliceTrainConfig, None, {"arch": "resnet18", "width": 1.0, "init": str(path)})
    kwargs = slice_model_kwargs(cfg)
    assert kwargs["layout"] == "torchvision"  # what the model directory records, so predict-slice rebuilds it
    model = build_slice_model("resnet18", **kwargs)
    info = init_slice_weights(model, cfg.init, cfg)
    assert info["source"] == "file" and info["file"] == path.name and len(info["sha256"]) == 64
    assert torch.equal(model.state_dict()["layer3.1.conv2.weight"], state["layer3.1.conv2.weight"])
    with pytest.raises(ConfigError, match="full width"):
        load_config(SliceTrainConfig, None, {"arch": "resnet18", "width": 0.5, "init": str(path)})


def _medicalnet_file(path: Path, arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A checkpoint as MedicalNet ships it: {'state_dict': {'module.<key>': …}} with its segmentation head."""
    g = torch.Generator().manual_seed(seed)
    from monai.networks import nets

    net = getattr(nets, arch)(spatial_dims=3, n_input_channels=1, feed_forward=False, **medicalnet_resnet_kwargs(arch))
    state = {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in net.state_dict().items()}
    state["conv_seg.0.weight"] = torch.randn(512, 32, 2, 2, 2, generator=g)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    return state


def test_medicalnet_weights_into_a_3d_resnet_classifier(tmp_path):
    from covidctnet.models.cnn3d import build_classifier

    path = tmp_path / "resnet_10_23dataset.pth"
    state = _medicalnet_file(path, "resnet10")
    model = build_classifier("resnet10", input_size=(32, 32, 32), **medicalnet_resnet_kwargs("resnet10"))
    info = load_medicalnet_weights(model, path)
    assert info["tensors"] == len(state) - 1  # all but conv_seg
    assert torch.equal(model.state_dict()["layer4.0.downsample.0.weight"], state["layer4.0.downsample.0.weight"])
    assert model.eval()(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 3)
    with pytest.raises(CheckpointError, match="do not fit"):  # ResNet-10 weights into a ResNet-18
        load_medicalnet_weights(build_classifier("resnet18", **medicalnet_resnet_kwargs("resnet18")), path)
    with pytest.raises(ConfigError, match="MedicalNet"):
        medicalnet_resnet_kwargs("covidctnet3d")

"""``covidctnet train-denoiser``: train the BCDU-Net denoiser on control slices, as CovidCTNet does.

The official notebook trains a BCDU-Net (width 32, D3) with BCE loss and Adam (lr 1e-3), batch 5, on the slices
of control patients, half of them with Perlin noise added and the clean slice as the target. Here the data come from
a ``covidctnet preprocess`` folder (see :mod:`covidctnet.data.control_slices`), the loop is the shared
:class:`~covidctnet.training.trainer.Trainer` (checkpoints, exact resume, AMP on CUDA, ``torchrun`` DDP), and each
epoch is validated on held-out control slices with fixed noise:

* ``val_loss``: the training loss between denoised and clean slices;
* ``val_psnr`` / ``val_ssim``: denoised vs clean (the monitored metric is ``val_psnr``), and the baseline
  ``val_psnr_noisy`` / ``val_ssim_noisy``: noisy input vs clean (the denoiser is useful only if it beats this);
* ``val_psnr_clean``: the clean held-out slice passed through the denoiser vs itself (on a control slice the
  residual should be near zero: this is how faithfully the model reproduces healthy anatomy);
* ``train_samples_per_s``: training throughput of the epoch (optimiser steps and batch noising, all processes).

PSNR and SSIM are MONAI's (``data_range`` 1, Gaussian 11×11 SSIM window, σ 1.5), averaged over slices.

Outputs in ``RUN_DIR``: ``config.yaml`` (the resolved :class:`DenoiserConfig`), ``data.yaml`` (which studies and
slices trained and validated), ``checkpoints/``, ``metrics.csv``, ``loss_curve.png``, ``samples/epoch_NNN.png``
and, at the end, the model directory ``RUN_DIR/model`` (component ``denoiser``, the best epoch's weights) with
``MODEL_CARD.md``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from monai.metrics import PSNRMetric, SSIMMetric
from torch import nn

from covidctnet.core.errors import ConfigError, InputError, ShapeError
from covidctnet.core.files import atomic_write_text
from covidctnet.core.seeding import seed_everything
from covidctnet.data.control_slices import (
    ControlSliceDataset,
    load_slices,
    noise_transform_kwargs,
    NoisedSlices,
    select_control_studies,
    split_control_slices,
)
from covidctnet.evaluation.plots import new_figure, save_figure
from covidctnet.models.registry import DENOISER_COMPONENT, build_denoiser
from covidctnet.training.trainer import FitResult, LoopConfig, ModelExport, RunResult, Trainer, distributed_context

__all__ = [
    "DenoiserConfig",
    "train_denoiser",
    "denoiser_loss",
    "read_preprocess_settings",
]

logger = logging.getLogger(__name__)


_MONITOR = "val_psnr"


@dataclass(frozen=True)
class DenoiserConfig:
    """Settings of ``covidctnet train-denoiser`` (defaults = ``configs/denoiser.yaml``).

    Official CovidCTNet (Training-CovidCTNet.ipynb): BCE loss, Adam lr 1e-3, batch 5, base width 32, D3, half of the
    slices noised with Perlin noise (octaves 10, scale randint(10, 30) at 128x128, persistence 0.01*randint(-50, 50)),
    3 epochs over the slices of 2 control patients.

    Attributes:
        features, dense_blocks, bidirectional, recurrent_activation, dropout: BCDU-Net arguments
            (:class:`~covidctnet.models.bcdunet.BCDUNet`; official 32, D3, Keras ConvLSTM).
        size_xy: in-plane size in pixels; ``None`` takes the preprocessed folder's (a different value is an error).
        loss: ``bce`` (official), ``mse`` or ``l1`` between denoised and clean slice.
        lr, weight_decay: Adam settings (official lr 1e-3).
        batch_size: slices per optimiser step and process (official 5).
        epochs: total epochs (a resumed run continues up to this number).
        patience: early stopping on ``val_psnr`` (``None``: never).
        steps_per_epoch: cap on steps per epoch (``None``: one pass over the training slices).
        max_steps: stop after this many optimiser steps in all, even within an epoch (``None``: run ``epochs``); the
            last, partial epoch is validated and exported like the others. One MosMed epoch is ~15,000 steps.
        checkpoint_every: also write ``checkpoints/last.pt`` every this many optimiser steps (``None``: only after
            each epoch); ``--resume`` continues inside the epoch, exactly as if never stopped (on CPU).
        grad_clip: max gradient norm (``None``: none).
        amp: mixed precision on CUDA.
        num_workers: DataLoader worker processes reading and noising slices (0: in the training process).
        cache_dir: folder of the slice caches (``None``: ``<data>/cache``): each preprocessed volume is decoded once
            into an uncompressed ``.npy`` there and slices are read from it as needed (4 bytes per voxel on disk).
        seed: run seed (weights, data order, noise).
        device: ``auto`` / ``cpu`` / ``cuda`` / ``cuda:N``.
        val_fraction: held-out share of studies (of slices with a single study), in (0, 0.9].
        val_gap_slices: single study: slices dropped between training and held-out block.
        slices_per_study: at most this many slices per study, evenly spread across z (``None``: all).
        val_max_slices: at most this many validation slices, evenly spread over the held-out ones (``None``: all);
            they are denoised after every epoch, so this bounds validation time on large sets.
        noise_fraction: share of each batch noised (official 0.5).
        noise_amplitude: factor on the Perlin noise (official 1).
        noise_scale_range: (low, high) Perlin scale in pixels at ``noise_reference_size`` (official 10..29 at 128).
        noise_reference_size: the scale range is multiplied by ``size_xy / noise_reference_size`` (``None``: not).
        noise_persistence_range: (low, high) persistence (official -0.5..0.49).
        noise_octaves: Perlin octaves (official 10).
        val_batch_size: slices per forward pass during validation.
        sample_png: write ``samples/epoch_NNN.png`` every epoch.
    """

    features: int = 32
    dense_blocks: int = 3
    bidirectional: bool = False
    recurrent_activation: Literal["hard_sigmoid", "sigmoid"] = "hard_sigmoid"
    dropout: float = 0.5
    size_xy: int | None = None
    loss: Literal["bce", "mse", "l1"] = "bce"
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 5
    epochs: int = 20
    patience: int | None = None
    steps_per_epoch: int | None = None
    max_steps: int | None = None
    checkpoint_every: int | None = None
    grad_clip: float | None = None
    amp: bool = True
    num_workers: int = 0
    cache_dir: str | None = None
    seed: int = 0
    device: str = "auto"
    val_fraction: float = 0.2
    val_gap_slices: int = 2
    slices_per_study: int | None = None
    val_max_slices: int | None = 1000
    noise_fraction: float = 0.5
    noise_amplitude: float = 1.0
    noise_scale_range: tuple[int, int] = (10, 30)
    noise_reference_size: int | None = 128
    noise_persistence_range: tuple[float, float] = (-0.5, 0.5)
    noise_octaves: int = 10
    val_batch_size: int = 8
    sample_png: bool = True

    def __post_init__(self) -> None:
        if self.features < 2 or self.features % 2:
            raise ConfigError(f"'features' must be an even integer >= 2, not {self.features}")
        if self.dense_blocks not in (1, 3):
            raise ConfigError(f"'dense_blocks' must be 1 (D1) or 3 (D3), not {self.dense_blocks}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"'dropout' must be in [0, 1), not {self.dropout}")
        if self.size_xy is not None and (self.size_xy < 8 or self.size_xy % 8):
            raise ConfigError(f"'size_xy' must be a multiple of 8 (three 2x2 poolings), not {self.size_xy}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError(f"'lr' must be > 0 and 'weight_decay' >= 0, not {self.lr} and {self.weight_decay}")
        for key in ("batch_size", "epochs", "val_batch_size", "noise_octaves"):
            if getattr(self, key) < 1:
                raise ConfigError(f"'{key}' must be >= 1, not {getattr(self, key)}")
        for key in ("patience", "steps_per_epoch", "slices_per_study", "val_max_slices", "max_steps",
                    "checkpoint_every"):
            value = getattr(self, key)
            if value is not None and value < (0 if key == "patience" else 1):
                raise ConfigError(f"'{key}' must be >= {0 if key == 'patience' else 1} or null, not {value}")
        if self.num_workers < 0 or self.val_gap_slices < 0:
            raise ConfigError(f"'num_workers' and 'val_gap_slices' must be >= 0, not {self.num_workers}, "
                              f"{self.val_gap_slices}")
        if not 0.0 < self.val_fraction <= 0.9:
            raise ConfigError(f"'val_fraction' must be in (0, 0.9], not {self.val_fraction}")
        if not 0.0 <= self.noise_fraction <= 1.0:
            raise ConfigError(f"'noise_fraction' must be in [0, 1], not {self.noise_fraction}")
        lo, hi = self.noise_scale_range
        if not 1 <= lo < hi:
            raise ConfigError(f"'noise_scale_range' must be two integers 1 <= low < high, not "
                              f"{list(self.noise_scale_range)}")
        plo, phi = self.noise_persistence_range
        if not plo < phi:
            raise ConfigError(f"'noise_persistence_range' must be (low, high) with low < high, not "
                              f"{list(self.noise_persistence_range)}")
        if self.noise_reference_size is not None and self.noise_reference_size < 8:
            raise ConfigError(f"'noise_reference_size' must be >= 8 or null, not {self.noise_reference_size}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"'grad_clip' must be > 0 or null, not {self.grad_clip}")

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~covidctnet.models.bcdunet.BCDUNet` (stored in the model directory)."""
        return {
            "in_channels": 1,
            "out_channels": 1,
            "features": self.features,
            "dense_blocks": self.dense_blocks,
            "bidirectional": self.bidirectional,
            "recurrent_activation": self.recurrent_activation,
            "dropout": self.dropout,
        }


# --------------------------------------------------------------------------------------------------------------------
# helpers


def read_preprocess_settings(data_dir: str | os.PathLike) -> dict[str, Any]:
    """The resolved preprocessing config of a preprocessed folder (``preprocess.yaml``) as a dict.

    Raises:
        InputError: the file is missing or not a YAML mapping with ``size_xy``.
    """
    path = Path(data_dir) / "preprocess.yaml"
    try:
        settings = yaml.safe_load(path.read_text())
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror or err}); DATA must be an output folder of "
                         "`covidctnet preprocess`") from err
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from err
    if not isinstance(settings, dict) or not isinstance(settings.get("size_xy"), int):
        raise InputError(f"{path}: expected the preprocess config with an integer 'size_xy'")
    return settings


def denoiser_loss(name: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Loss between denoised ``output`` and clean ``target`` (both ``(B, 1, H, W)`` in [0, 1]), in float32.

    BCE is computed outside autocast: torch refuses ``binary_cross_entropy`` on float16 (it is unstable there).
    """
    with torch.autocast(device_type=output.device.type, enabled=False):
        out, tgt = output.float(), target.float()
        if name == "bce":
            return nn.functional.binary_cross_entropy(out, tgt)
        if name == "mse":
            return nn.functional.mse_loss(out, tgt)
        if name == "l1":
            return nn.functional.l1_loss(out, tgt)
    raise ConfigError(f"'loss' must be one of ['bce', 'mse', 'l1'], not {name!r}")


def _metric_means(pred: torch.Tensor, clean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-slice PSNR (dB) and SSIM of ``pred`` against ``clean`` (``(B, 1, H, W)``, data range 1), shape (B,)."""
    psnr = PSNRMetric(max_val=1.0, reduction="none")(pred.float(), clean.float()).flatten()
    ssim = SSIMMetric(spatial_dims=2, data_range=1.0, reduction="none")(pred.float(), clean.float()).flatten()
    return psnr, ssim


def _save_sample_png(path: Path, rows: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]], title: str) -> None:
    """One row per case: input, denoised, clean target, residual (input - denoised)."""
    fig = new_figure((12, 3.2 * len(rows)))
    axes = fig.subplots(len(rows), 4, squeeze=False)
    for r, (name, inp, den, clean) in enumerate(rows):
        residual = inp - den
        lim = max(float(np.abs(residual).max()), 1e-6)
        panels = [(f"{name} input", inp, "gray", 0.0, 1.0), ("denoised", den, "gray", 0.0, 1.0),
                  ("clean target", clean, "gray", 0.0, 1.0), ("residual = input - denoised", residual, "coolwarm",
                                                              -lim, lim)]
        for c, (label, img, cmap, vmin, vmax) in enumerate(panels):
            ax = axes[r, c]
            # RAS (X, Y) array -> anterior up, patient right on the display's left (radiological view)
            im = ax.imshow(np.rot90(img)[:, ::-1], cmap=cmap, vmin=vmin, vmax=vmax)
            ax.set_title(label, fontsize=9)
            ax.axis("off")
            if c == 3:
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path, dpi=80)


def _model_card(cfg: DenoiserConfig, data_dir: Path, split: dict[str, Any], val: Mapping[str, float],
                best_epoch: int, epochs_run: int, size_xy: int, preprocess: Mapping[str, Any], command: str) -> str:
    def val_text(key: str, digits: int = 2) -> str:
        value = val.get(key)
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"

    val_kind = ("held-out control **studies** (never seen in training)" if split["mode"] == "studies" else
                "a held-out block of the most superior slices of the **same** study (only one control study was "
                f"available; {cfg.val_gap_slices} slices left out between the blocks); slices of a training patient "
                "make this estimate optimistic")
    return f"""# CovidCTNet BCDU-Net denoiser ({size_xy}x{size_xy})

A BCDU-Net (Azad et al., ICCVW 2019) trained, as in CovidCTNet (Javaheri et al., npj Digit. Med. 4, 29, 2021), to
remove Perlin noise from axial slices of **control** chest CT scans. On a patient's scan, the residual
`input - denoised` is what the model cannot reproduce from healthy anatomy; the CovidCTNet 3D CNN classifies
stacks of these residuals.

**Not a medical device.** Research software; not for diagnosis or any clinical use.

## Architecture
`BCDUNet({', '.join(f'{k}={v!r}' for k, v in cfg.model_kwargs().items())})`, input `(B, 1, {size_xy}, {size_xy})` in
[0, 1], output the denoised slice (sigmoid).

## Training data
- Preprocessed folder: `{data_dir}` (profile `{preprocess.get('profile', '?')}`, {size_xy}x{size_xy} in-plane,
  1 mm between slices, HU window [{preprocess.get('hu_min', '?')}, {preprocess.get('hu_max', '?')}] → [0, 1]).
- Training studies ({len(split['train_ids'])}): {', '.join(split['train_ids'])}; {split['n_train_slices']} slices.
- Validation: {val_kind}: {', '.join(split['val_ids'])}; {split['n_val_slices']} slices.
- Noise: Perlin, octaves {cfg.noise_octaves}, scale {list(cfg.noise_scale_range)} px at {cfg.noise_reference_size}
  px (scaled to this size), persistence {list(cfg.noise_persistence_range)}, amplitude {cfg.noise_amplitude}, on
  {cfg.noise_fraction:.0%} of each batch; the target is always the clean slice.
- Where the scans come from and under which terms is stated by the data source, not here; check it before
  redistributing these weights (the shared COVID-CT-MD sample states no licence).

## Training
Loss {cfg.loss}, Adam lr {cfg.lr}, batch {cfg.batch_size}, {epochs_run} epochs run; the weights are those of epoch
{best_epoch} (best validation PSNR). Seed {cfg.seed}. Command: `{command}`.

## Validation (held-out control slices, each with one fixed Perlin noise draw)
| metric | denoised vs clean | noisy input vs clean (baseline) |
|---|---|---|
| PSNR (dB) | {val_text('val_psnr')} | {val_text('val_psnr_noisy')} |
| SSIM | {val_text('val_ssim', 4)} | {val_text('val_ssim_noisy', 4)} |

Clean held-out slice through the denoiser vs itself: PSNR {val_text('val_psnr_clean')} dB (how faithfully healthy
anatomy is reproduced). Validation loss ({cfg.loss}): {val_text('val_loss', 4)}.

These figures come from {split['n_val_slices']} slices of {len(split['val_ids'])} study(ies); they describe this
small validation set only, not performance on other scanners or populations.

## Intended use
Producing residual maps (`covidctnet residuals`, `covidctnet predict`) for research on CovidCTNet. The input must be
preprocessed with the settings in `config.yaml` (`preprocess`), in particular size_xy = {size_xy}.
"""


# --------------------------------------------------------------------------------------------------------------------
# main entry


@dataclass
class _DenoiserData:
    """The control slices of one run: training set, fixed noisy/clean validation pairs and the split."""

    train: ControlSliceDataset
    val: NoisedSlices
    split: Any
    split_info: dict[str, Any]
    size: int
    preprocess: dict[str, Any]


def _prepare_data(data_dir: Path, run_dir: Path, cfg: DenoiserConfig, labels: str | os.PathLike | None,
                  studies: Sequence[str] | None, resume: bool) -> _DenoiserData:
    """Select the control studies, split their slices and build the datasets; write ``run_dir/data.yaml``.

    A resumed run reuses the studies recorded in ``data.yaml`` and refuses data that now splits differently.
    """
    ctx = distributed_context()
    preprocess = read_preprocess_settings(data_dir)
    size = int(preprocess["size_xy"])
    if cfg.size_xy is not None and cfg.size_xy != size:
        raise ConfigError(f"{data_dir / 'preprocess.yaml'}: size_xy is {size}, but the config asks for "
                          f"{cfg.size_xy}; preprocess with --size {cfg.size_xy} or set size_xy: null")
    if size % 8:
        raise ShapeError(f"{data_dir / 'preprocess.yaml'}: size_xy {size} is not a multiple of 8, which the BCDU-Net "
                         "needs; preprocess again with e.g. --size 240")

    data_file = run_dir / "data.yaml"
    previous = None
    if resume and data_file.is_file():
        previous = yaml.safe_load(data_file.read_text()) or {}
        if not studies and labels is None:
            studies = sorted(set(previous.get("train_ids", [])) | set(previous.get("val_ids", [])))
    ids = select_control_studies(data_dir, labels=labels, studies=studies)
    stacks = load_slices(data_dir, ids, size, cfg.cache_dir)
    split = split_control_slices({s: a.shape[0] for s, a in stacks.items()}, cfg.val_fraction, cfg.seed,
                                 cfg.slices_per_study, cfg.val_gap_slices, cfg.val_max_slices)
    split_info = {"data_dir": str(data_dir), **split.to_dict()}
    if previous is not None:
        keys = ("mode", "train_ids", "val_ids", "train_slices", "val_slices")
        if any(previous.get(k) != split_info.get(k) for k in keys):
            raise ConfigError(f"{data_file}: the run was trained on other studies or slices than {data_dir} now gives "
                              f"(train {previous.get('train_ids')}, val {previous.get('val_ids')}); resume with the "
                              "same data and config, or start a new run directory")
    noise_kwargs = noise_transform_kwargs(size, cfg.noise_scale_range, cfg.noise_reference_size,
                                          cfg.noise_persistence_range, cfg.noise_octaves, cfg.noise_amplitude)
    train_ds = ControlSliceDataset(stacks, split.train, cfg.seed, cfg.noise_fraction, noise_kwargs)
    val = NoisedSlices(stacks, split.val, cfg.seed, noise_kwargs)
    logger.info("denoiser data: %d training slices from %s, %d validation slices from %s (%s split), %dx%d, "
                "noise %s", len(train_ds), list(split.train_ids), len(val), list(split.val_ids), split.mode,
                size, size, noise_kwargs)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(data_file, yaml.safe_dump(split_info, sort_keys=False))
    return _DenoiserData(train_ds, val, split, split_info, size, preprocess)


def _validation(cfg: DenoiserConfig, data: _DenoiserData) -> Callable[[nn.Module, torch.device], dict[str, float]]:
    """The per-epoch validation: loss, PSNR and SSIM of denoised vs clean, beside the noisy-input baseline.

    Batches are read and noised as they are needed (the same draws every epoch), so memory does not grow with the
    number of held-out slices; the noisy-input baseline is computed in the first pass and kept.
    """
    val, step = data.val, cfg.val_batch_size
    baseline: dict[str, float] = {}

    def validate(net: nn.Module, device: torch.device) -> dict[str, float]:
        losses, psnrs, ssims, psnrs_clean, base_psnrs, base_ssims = [], [], [], [], [], []
        for i in range(0, len(val), step):
            noisy, clean = val.batch(i, i + step)
            if not baseline:
                p, s = _metric_means(noisy, clean)
                base_psnrs.append(p)
                base_ssims.append(s)
            noisy, clean = noisy.to(device), clean.to(device)
            out = net(noisy)
            losses.append(float(denoiser_loss(cfg.loss, out, clean)) * len(clean))
            p, s = _metric_means(out, clean)
            psnrs.append(p.cpu())
            ssims.append(s.cpu())
            pc, _ = _metric_means(net(clean), clean)
            psnrs_clean.append(pc.cpu())
        if not baseline:  # noisy input vs clean target: the same every epoch
            baseline.update(val_psnr_noisy=float(torch.cat(base_psnrs).mean()),
                            val_ssim_noisy=float(torch.cat(base_ssims).mean()))
        return {
            "val_loss": sum(losses) / len(val),
            "val_psnr": float(torch.cat(psnrs).mean()),
            "val_ssim": float(torch.cat(ssims).mean()),
            **baseline,
            "val_psnr_clean": float(torch.cat(psnrs_clean).mean()),
        }

    return validate


def _sample_writer(cfg: DenoiserConfig, data: _DenoiserData) -> Callable[[int, nn.Module, Path], None] | None:
    """The epoch callback writing ``samples/epoch_NNN.png``: one held-out slice, noisy and clean, through the net
    (``None`` when ``cfg.sample_png`` is off). The Trainer runs it in eval mode, without gradients, never failing."""
    if not cfg.sample_png:
        return None
    sample_index = len(data.val) // 2

    def write_sample(epoch: int, net: nn.Module, out_dir: Path) -> None:
        noisy, clean_t = data.val[sample_index]
        x = torch.stack([noisy, clean_t])
        den = net(x.to(next(net.parameters()).device)).float().cpu().numpy()[:, 0]
        inp, clean = x.numpy()[:, 0], clean_t[0].numpy()
        sid, k = data.split.val[sample_index]
        _save_sample_png(out_dir / "samples" / f"epoch_{epoch:03d}.png",
                         [("noisy", inp[0], den[0], clean), ("clean", inp[1], den[1], clean)],
                         f"epoch {epoch}: held-out slice {sid}[:, :, {k}]")

    return write_sample


def train_denoiser(
    data_dir: str | os.PathLike,
    run_dir: str | os.PathLike,
    cfg: DenoiserConfig = DenoiserConfig(),
    *,
    labels: str | os.PathLike | None = None,
    studies: Sequence[str] | None = None,
    resume: bool = False,
    command: str | None = None,
    show_progress: bool | None = None,
) -> RunResult:
    """Train the BCDU-Net denoiser on the control slices of a preprocessed folder.

    Args:
        data_dir: output folder of ``covidctnet preprocess`` (``manifest.csv``, ``preprocess.yaml``, volumes).
        run_dir: output folder (see the module docstring). Must not hold a run unless ``resume``.
        cfg: the resolved config.
        labels: labels CSV choosing the control studies (when the manifest has no labels).
        studies: explicit control study ids (overrides ``labels``). On ``resume`` without ``labels``/``studies``,
            the studies recorded in ``run_dir/data.yaml`` are used.
        resume: continue from ``run_dir/checkpoints/last.pt`` (exact on CPU with a fixed seed).
        command: the command line, recorded in the model card.
        show_progress: progress bar (``None``: on an interactive terminal).

    Returns:
        :class:`~covidctnet.training.trainer.RunResult`; ``details["data"]`` is the split (``data.yaml``).

    Raises:
        InputError: not a preprocessed folder, unreadable volume, or no control study.
        ConfigError: ``cfg.size_xy`` differs from the preprocessed size, or it is not a multiple of 8.
        CheckpointError: ``resume`` without a checkpoint, or an existing run without ``resume``.
    """
    data_dir, run_dir = Path(data_dir), Path(run_dir)
    data = _prepare_data(data_dir, run_dir, cfg, labels, studies, resume)
    seed_everything(cfg.seed)
    model = build_denoiser(cfg.model_kwargs())

    def training_step(net: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return denoiser_loss(cfg.loss, net(batch["image"]), batch["target"])

    trainer = Trainer(
        model,
        run_dir,
        train_data=data.train,
        training_step=training_step,
        loop=LoopConfig.of(cfg),
        validate=_validation(cfg, data),
        optimizer_factory=lambda p: torch.optim.Adam(p, lr=cfg.lr, weight_decay=cfg.weight_decay),
        monitor=_MONITOR,
        mode="max",
        collate_fn=data.train.collate,
        amp=cfg.amp,
        grad_clip=cfg.grad_clip,
        config=cfg,
        epoch_callback=_sample_writer(cfg, data),
        show_progress=show_progress,
    )
    fit, md = trainer.run(lambda fit: _describe(cfg, data, fit, data_dir, run_dir, command), DENOISER_COMPONENT,
                          resume=resume)
    val = fit.best_validation()
    if md is not None:
        logger.info("denoiser: best epoch %d, validation PSNR %.2f dB (noisy input %.2f dB), SSIM %.4f "
                    "(noisy %.4f); model directory %s", fit.best_epoch, val.get("val_psnr", float("nan")),
                    val.get("val_psnr_noisy", float("nan")), val.get("val_ssim", float("nan")),
                    val.get("val_ssim_noisy", float("nan")), md.path)
    return RunResult(run_dir, md.path if md is not None else None, fit.best_epoch, fit.epochs_run, _MONITOR,
                     val if md is not None else {}, fit.history, {"data": data.split_info})


def _describe(cfg: DenoiserConfig, data: _DenoiserData, fit: FitResult, data_dir: Path, run_dir: Path,
              command: str | None) -> ModelExport:
    """The model directory of a finished run: config, model card and the run's files."""
    split, size, preprocess = data.split, data.size, data.preprocess
    val = fit.best_validation()
    config = {
        "name": f"covidctnet-denoiser-bcdunet{cfg.features}-d{cfg.dense_blocks}-{size}",
        "task": "denoise",
        "components": {DENOISER_COMPONENT: {"arch": "bcdunet", "kwargs": cfg.model_kwargs()}},
        "preprocess": dict(preprocess),
        "input": {"size_xy": size, "channels": 1, "range": [0.0, 1.0]},
        "training": {"data_dir": str(data_dir), "command": command or "(library call)", "seed": cfg.seed,
                     "best_epoch": int(fit.best_epoch), "epochs_run": int(fit.epochs_run),
                     "split": split.mode, "train_ids": list(split.train_ids), "val_ids": list(split.val_ids),
                     "n_train_slices": len(split.train), "n_val_slices": len(split.val)},
        "validation": val,
    }
    card = _model_card(cfg, data_dir, data.split_info, val, fit.best_epoch, fit.epochs_run, size, preprocess,
                       command or "(library call)")
    extra = {name: run_dir / name for name in ("metrics.csv", "loss_curve.png", "data.yaml")
             if (run_dir / name).is_file()}
    return ModelExport(config, card, {**extra, "training_config.yaml": run_dir / "config.yaml"})

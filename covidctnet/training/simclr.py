"""``covidctnet pretrain-slice``: SimCLR-style self-supervised pretraining of the slice model's encoder (two augmented
views per training image, NT-Xent loss), as a starting point for ``train-slice --init``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from covidctnet.core.checkpoint import load_checkpoint
from covidctnet.core.errors import ConfigError
from covidctnet.core.seeding import derive_seed, seed_everything
from covidctnet.data.ct_render import render_ct_folder
from covidctnet.data.ucsd import SliceDataset, prepare_slice
from covidctnet.models.slice import (
    build_slice_model,
    feature_dim,
    replace_head,
)
from covidctnet.training.slice import (
    Arch,
    check_common_settings,
    slice_datasets,
    slice_model_kwargs,
    slice_preprocessing,
)
from covidctnet.training.trainer import FitResult, LoopConfig, ModelExport, RunResult, Trainer

__all__ = ["PretrainSliceConfig", "pretrain_slice", "nt_xent_loss"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainSliceConfig:
    """Options of ``covidctnet pretrain-slice`` (defaults = ``configs/pretrain_slice.yaml``).

    Attributes:
        arch, width, size, lung_mask: the network and input, as in ``train-slice`` (they must match there).
        epochs, batch_size, lr, weight_decay: Adam with cosine annealing; each batch holds ``batch_size`` images,
            i.e. ``2 * batch_size`` views, and every other view of the batch is a negative.
        temperature: NT-Xent temperature.
        proj_dim: output width of the projection MLP (dropped after pretraining).
        crop_scale, rotate_degrees, intensity, flip: augmentation of each view (stronger than for supervised
            training: contrastive learning needs views that differ).
        seed, device, workers, steps_per_epoch, max_train_images: as in ``train-slice``.
        extra_ct: a folder of CT volumes (NIfTI/NRRD/MetaImage files, DICOM series folders; links followed) whose
            lung slices are rendered as paper figures (:func:`~covidctnet.data.ct_render.render_ct_slices`) and added
            to the unlabelled images (null: none).
        extra_ct_slices: at most this many lung slices per volume (evenly spread).
        extra_ct_renders: renderings per slice (each with its own window, crop and JPEG quality).
        data_images: also use DATA's training images; false pretrains on the ``extra_ct`` renderings alone (e.g.
            before a cross-validation of DATA, so that no held-out image is seen, even unlabelled).
    """
    arch: Arch = "resnet18"
    width: float = 0.5
    size: int = 160
    lung_mask: bool = False
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-6
    temperature: float = 0.2
    proj_dim: int = 64
    crop_scale: float = 0.35
    rotate_degrees: float = 15.0
    flip: bool = True
    intensity: float = 0.2
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    steps_per_epoch: int | None = None
    max_train_images: int | None = None
    extra_ct: str | None = None
    extra_ct_slices: int = 60
    extra_ct_renders: int = 2
    data_images: bool = True

    def __post_init__(self) -> None:
        check_common_settings(self)
        if self.extra_ct_slices < 1 or self.extra_ct_renders < 1:
            raise ConfigError(f"extra_ct_slices and extra_ct_renders must be >= 1, not {self.extra_ct_slices} and "
                              f"{self.extra_ct_renders}")
        if not self.data_images and not self.extra_ct:
            raise ConfigError("data_images is false and no extra_ct folder is given: nothing to pretrain on")
        if not 0.01 <= self.temperature <= 10:
            raise ConfigError(f"temperature must be in [0.01, 10], not {self.temperature}")
        if self.proj_dim < 2:
            raise ConfigError(f"proj_dim must be >= 2, not {self.proj_dim}")


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalised-temperature cross-entropy (Chen et al., ICML 2020).

    Args:
        z1, z2: (B, D) projections of two views of the same B images (row i of each is a positive pair).
        temperature: softmax temperature.

    Returns:
        scalar loss: for each of the 2B views, cross-entropy of finding its partner among the other 2B-1 views.
    """
    z = nn.functional.normalize(torch.cat([z1, z2]).float(), dim=1)
    n = z1.shape[0]
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return nn.functional.cross_entropy(sim, target)


class _SimCLR(nn.Module):
    def __init__(self, cfg: PretrainSliceConfig) -> None:
        super().__init__()
        net = build_slice_model(cfg.arch, **slice_model_kwargs(cfg))
        dim = feature_dim(net)
        self.encoder = replace_head(net, nn.Identity())
        self.projector = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, cfg.proj_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(x))


class _TwoViews(torch.utils.data.Dataset):
    """Two independently augmented views of each image (labels unused); view v of item i draws from (seed, e, i, v)."""

    def __init__(self, base: Any) -> None:
        self.base = base

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        views = []
        for v in range(2):
            arr = self.base.cache[index]
            item = {"image": arr[:1]}
            if self.base.lung_mask:
                item["mask"] = arr[1:2]
            self.base.transform.set_random_state(seed=derive_seed(self.base.seed, self.base.epoch, index, v) % 2**32)
            views.append(self.base.transform(item)["image"].float())
        return {"view1": views[0], "view2": views[1]}


def _with_extra_ct(train: SliceDataset, cfg: PretrainSliceConfig) -> SliceDataset:
    """``train`` plus (or, without ``data_images``, replaced by) the rendered slices of ``cfg.extra_ct``."""
    records, images = render_ct_folder(cfg.extra_ct, cfg.size, cfg.extra_ct_slices, cfg.extra_ct_renders, cfg.seed)
    cache = [prepare_slice(img, cfg.size, cfg.lung_mask) for img in images]
    if cfg.data_images:
        records, cache = train.records + records, train.cache + cache
    logger.info("pretraining on %d images (%d rendered from %s)", len(records), len(images), cfg.extra_ct)
    return SliceDataset(records, cfg.size, cfg.lung_mask, train.transform, seed=cfg.seed, cache=cache)


def pretrain_slice(
    data: str | os.PathLike,
    run_dir: str | os.PathLike,
    cfg: PretrainSliceConfig,
    resume: bool = False,
    command: str | None = None,
) -> RunResult:
    """Contrastive (SimCLR) pretraining of the slice encoder on the training images, without their labels.

    Writes ``run_dir/checkpoints``, ``metrics.csv``, ``loss_curve.png`` and ``run_dir/encoder`` (a model directory
    with component ``encoder`` that ``train-slice --init`` reads). Selection is on the training NT-Xent loss (the
    validation images are not used at all).

    Returns:
        :class:`~covidctnet.training.trainer.RunResult` whose ``model_dir`` is ``run_dir/encoder`` (the last epoch's
        encoder) and ``details["final_loss"]`` the last epoch's NT-Xent loss.
    """
    run_dir = Path(run_dir)
    seed_everything(cfg.seed)
    train, _ = slice_datasets(data, cfg, train_aug=True, with_val=False)
    if cfg.extra_ct:
        train = _with_extra_ct(train, cfg)
    model = _SimCLR(cfg)

    def training_step(net: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        n = batch["view1"].shape[0]
        z = net(torch.cat([batch["view1"], batch["view2"]]))  # one pass: BatchNorm sees both views
        return nt_xent_loss(z[:n], z[n:], cfg.temperature)

    trainer = Trainer(
        model,
        run_dir,
        train_data=_TwoViews(train),
        training_step=training_step,
        loop=LoopConfig.of(cfg),
        optimizer_factory=lambda p: torch.optim.Adam(p, lr=cfg.lr, weight_decay=cfg.weight_decay),
        scheduler_factory=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=cfg.epochs),
        monitor="train_loss",
        mode="min",
        config=cfg,
    )

    def describe(result: FitResult) -> ModelExport:
        final_loss = float(result.history[-1]["train_loss"])
        # the last epoch, not the lowest loss: a contrastive loss keeps falling and its minimum says little
        state = load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]
        encoder = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
        config = {
            "name": f"covidctnet-slice-encoder-{cfg.arch}-{cfg.size}",
            "task": "slice-encoder",
            "components": {"encoder": {"arch": cfg.arch, "kwargs": slice_model_kwargs(cfg)}},
            "preprocess": slice_preprocessing(cfg),
            "training": {"data": Path(data).name if cfg.data_images else None,
                         "extra_ct": Path(cfg.extra_ct).name if cfg.extra_ct else None,
                         "command": command or "", "method": "SimCLR (NT-Xent)",
                         "epochs_run": int(result.epochs_run), "final_loss": final_loss},
        }
        source = (f"the training images of `{Path(data).name}`" if cfg.data_images else "") + (
            " and " if cfg.data_images and cfg.extra_ct else "") + (
            f"CT slices rendered from the volumes in `{Path(cfg.extra_ct).name}`" if cfg.extra_ct else "")
        card = (f"# SimCLR slice encoder ({cfg.arch}, {cfg.size} px)\n\nContrastive pretraining on {source} "
                "without labels.\n\n```\n{command or '(library call)'}\n```\n\nUse with "
                "`covidctnet train-slice --init THIS_DIR` (same arch, width and lung_mask). Not a classifier.\n")
        extra = {"training_config.yaml": run_dir / "config.yaml", "metrics.csv": run_dir / "metrics.csv"}
        return ModelExport(config, card, extra, {"encoder": encoder})

    result, md = trainer.run(describe, resume=resume, out_dir=run_dir / "encoder")
    last = int(result.history[-1]["epoch"])
    return RunResult(run_dir, md.path if md is not None else None, last, result.epochs_run, "train_loss",
                     {}, list(result.history), {"final_loss": float(result.history[-1]["train_loss"])})

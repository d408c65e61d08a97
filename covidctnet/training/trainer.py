"""One training loop for every covidctnet model (BCDU-Net denoiser, 3D classifier, 2D slice model).

The caller owns everything model-specific: the network, a ``training_step(model, batch) -> loss`` and a
``validate(model, device) -> {metric: value}``. :class:`Trainer` owns the rest, identically for every model:

* device choice (``auto|cpu|cuda``), mixed precision on CUDA only (``torch.autocast`` + ``GradScaler``);
* data order as a pure function of ``(seed, epoch)`` (optionally class-balanced by per-sample weights), and
  ``dataset.set_epoch(epoch)`` when the dataset has it, so augmentation can be seeded per ``(seed, epoch, index)``;
* an atomic checkpoint every epoch, ``checkpoints/last.pt`` and ``checkpoints/best.pt``, holding the model, optimiser,
  scheduler, AMP scaler, epoch, best metric, early-stopping counter, metric history and every RNG state (python,
  numpy, torch CPU/CUDA, data-order generator) as tensors and plain types, so it is read back with
  ``torch.load(weights_only=True)`` and never runs code; ``resume=True`` continues from ``last.pt`` and, on CPU with
  a fixed seed, ends with exactly the weights of an uninterrupted run;
* ``metrics.csv`` (``epoch, train_loss, train_samples_per_s, <val metrics>, lr, seconds``; the throughput is over all
  processes), rewritten atomically from the checkpointed history, and ``loss_curve.png``;
* early stopping with patience on the monitored metric;
* DistributedDataParallel when launched by ``torchrun`` (``WORLD_SIZE``/``RANK``/``LOCAL_RANK``): ``gloo`` on CPU,
  ``nccl`` on CUDA, a distributed sampler with ``set_epoch``, validation, logging, metrics and checkpoints on
  rank 0 only, barriers around checkpoint writes;
* the resolved config in ``RUN_DIR/config.yaml`` and, at the end, the best weights as a model directory
  (:meth:`Trainer.export`).

Every training command's config carries the loop's settings as fields of the same names (so that existing YAML files
keep loading); :meth:`LoopConfig.of` reads them into the one :class:`LoopConfig` that :class:`Trainer` takes.

Example:
    >>> seed_everything(0)
    >>> model = torch.nn.Linear(4, 2)
    >>> trainer = Trainer(model, run_dir, train_data=ds, loop=LoopConfig(epochs=10, batch_size=8),
    ...                   training_step=step, validate=val, monitor="val_auc", mode="max")
    >>> fit, model_dir = trainer.run(lambda fit: ModelExport(config={...}, card="# My model"), "model")
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, Sampler

from covidctnet.core.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from covidctnet.core.config import config_to_dict
from covidctnet.core.device import resolve_device
from covidctnet.core.errors import CheckpointError, ConfigError, CovidCTNetError
from covidctnet.core.files import atomic_write_text, remove_stale_temps, write_csv
from covidctnet.core.model_dir import ModelDir, ModelDirConfig, save_model_dir
from covidctnet.core.progress import progress_task
from covidctnet.core.seeding import derive_seed
from covidctnet.evaluation.plots import new_figure, save_figure

__all__ = [
    "LoopConfig",
    "Trainer",
    "TIMING_COLUMNS",
    "FitResult",
    "ModelExport",
    "RunResult",
    "DistributedContext",
    "EpochSampler",
    "distributed_context",
    "move_to_device",
    "plot_loss_curve",
    "predict_dataset",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------------
# seeding and RNG state (stored as tensors and plain types so that ``weights_only=True`` can read them back)


def _get_rng_state() -> dict[str, Any]:
    py = random.getstate()  # (version, tuple of 625 ints, gauss_next)
    np_state = np.random.get_state()  # ('MT19937', uint32[624], pos, has_gauss, cached_gaussian)
    state: dict[str, Any] = {
        "python_version": int(py[0]),
        "python_state": torch.tensor(py[1], dtype=torch.int64),
        "python_gauss": py[2],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_gauss": float(np_state[4]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    py_state = tuple(int(x) for x in state["python_state"].tolist())
    random.setstate((state["python_version"], py_state, state["python_gauss"]))
    np.random.set_state(
        (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            state["numpy_pos"],
            state["numpy_has_gauss"],
            state["numpy_gauss"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = list(state["cuda"])
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            logger.warning("checkpoint has %d CUDA RNG states, this machine %d GPUs; CUDA RNG not restored",
                           len(cuda_states), torch.cuda.device_count())


# --------------------------------------------------------------------------------------------------------------------
# distributed


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in a ``torchrun`` job. ``world_size == 1`` means a plain single-process run."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def distributed_context() -> DistributedContext:
    """Read ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` as set by ``torchrun`` (defaults: one process)."""
    try:
        return DistributedContext(
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
            rank=int(os.environ.get("RANK", "0")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        )
    except ValueError as err:
        raise ConfigError(f"WORLD_SIZE/RANK/LOCAL_RANK must be integers: {err}") from err


def _barrier(ctx: DistributedContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.barrier()


class EpochSampler(Sampler[int]):
    """Shuffled (or weighted, with replacement) indices drawn afresh each epoch from ``derive_seed(seed, epoch)``.

    The order depends only on ``(seed, epoch)``, so a resumed run sees the same batches as an uninterrupted one. Under
    DDP each rank takes every ``world_size``-th index of the same permutation (padded by wrapping so that all ranks get
    the same count), as ``DistributedSampler`` does; with ``weights`` the draw is class-balanced sampling with
    replacement, which ``DistributedSampler`` cannot do.

    Args:
        n: dataset length.
        seed: run seed.
        weights: optional per-sample weights (length ``n``), e.g. ``1 / class frequency``.
        num_samples: samples drawn per epoch over all ranks (default ``n``).
        world_size, rank: DDP position.
    """

    def __init__(
        self,
        n: int,
        seed: int,
        weights: Sequence[float] | None = None,
        num_samples: int | None = None,
        world_size: int = 1,
        rank: int = 0,
    ) -> None:
        if n <= 0:
            raise ConfigError("the training set is empty")
        self.n = n
        self.seed = seed
        self.weights = None if weights is None else torch.as_tensor(list(weights), dtype=torch.float64)
        if self.weights is not None and (len(self.weights) != n or bool((self.weights < 0).any())):
            raise ConfigError(f"sampler weights must be {n} non-negative numbers, got {len(self.weights)}")
        self.num_samples = num_samples or n
        self.world_size = world_size
        self.rank = rank
        self.epoch = 0
        self.skip = 0
        self.generator = torch.Generator()

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Draw the order of ``epoch``; ``skip`` leaves out this rank's first indices (resuming inside an epoch)."""
        self.epoch = epoch
        self.skip = skip

    @property
    def per_rank(self) -> int:
        """Samples each rank draws in a whole epoch (the epoch's indices padded to a multiple of the world size)."""
        return math.ceil(self.num_samples / self.world_size)

    def __len__(self) -> int:
        return self.per_rank - self.skip

    def __iter__(self) -> Iterator[int]:
        self.generator.manual_seed(derive_seed(self.seed, self.epoch))
        if self.weights is None:
            idx = torch.cat([torch.randperm(self.n, generator=self.generator)
                             for _ in range(math.ceil(self.num_samples / self.n))])[: self.num_samples]
        else:
            idx = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=self.generator)
        total = self.per_rank * self.world_size
        if total > len(idx):  # pad by wrapping so every rank gets the same number of samples (DDP needs that)
            idx = torch.cat([idx, idx[: total - len(idx)]])
        return iter(idx[self.rank : total : self.world_size].tolist()[self.skip :])


@dataclass(frozen=True)
class LoopConfig:
    """The settings of the training loop that every training command shares.

    Attributes:
        epochs: total epochs (a resumed run continues up to this number).
        patience: stop after this many epochs without improvement of the monitored metric (``None``: never).
        batch_size: samples per optimiser step and process.
        steps_per_epoch: cap on optimiser steps per epoch (``None``: one pass over the epoch's samples).
        max_steps: stop after this many optimiser steps in all, even inside an epoch; that last, partial epoch is
            validated and checkpointed as finished (``None``: run ``epochs``). A resumed run with a larger
            ``max_steps`` goes on with the next epoch.
        checkpoint_every: also write ``checkpoints/last.pt`` every this many optimiser steps inside an epoch (not
            validated); resuming from it continues that epoch at the next batch, as if never stopped (exact on CPU).
        num_workers: ``DataLoader`` worker processes (0: in the training process).
        device: ``auto`` / ``cpu`` / ``cuda`` / ``cuda:N``; under DDP on CUDA each rank uses ``cuda:LOCAL_RANK``.
        seed: run seed (data order, sampler, per-rank RNG).

    Raises:
        ConfigError: ``epochs`` or ``batch_size`` below 1, ``max_steps`` or ``checkpoint_every`` below 1.
    """

    epochs: int = 10
    patience: int | None = None
    batch_size: int = 16
    steps_per_epoch: int | None = None
    max_steps: int | None = None
    checkpoint_every: int | None = None
    num_workers: int = 0
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"epochs and batch_size must be >= 1, not {self.epochs} and {self.batch_size}")
        for name in ("max_steps", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1 or None, not {value}")

    @classmethod
    def of(cls, cfg: Any) -> LoopConfig:
        """The loop settings of a training config: its fields named as :class:`LoopConfig`'s (a config without one
        keeps the default here; the slice and classifier configs call ``num_workers`` ``workers``)."""
        values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls) if hasattr(cfg, f.name)}
        if "num_workers" not in values and hasattr(cfg, "workers"):
            values["num_workers"] = cfg.workers
        return cls(**values)


@torch.no_grad()
def predict_dataset(model: nn.Module, dataset: Any, device: torch.device | str, batch_size: int = 32) -> np.ndarray:
    """Softmax probabilities of every item of a (non-augmented) dataset, in order.

    Args:
        model: a classifier returning (B, C) logits of ``item["image"]`` stacked in batches; its train/eval mode is
            restored afterwards.
        dataset: items ``{"image": tensor, ...}``.
        device: where the model is.
        batch_size: items per forward pass.

    Returns:
        (N, C) float32 probabilities; (0, 0) for an empty dataset.
    """
    was_training = model.training
    model.eval()
    device = torch.device(device)
    out = []
    for start in range(0, len(dataset), batch_size):
        x = torch.stack([dataset[i]["image"] for i in range(start, min(start + batch_size, len(dataset)))])
        out.append(torch.softmax(model(x.to(device)).float(), dim=1).cpu())
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Move tensors in a (nested) batch of dicts / lists / tuples to ``device``; other values are left alone."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


# --------------------------------------------------------------------------------------------------------------------
# checkpoints


# --------------------------------------------------------------------------------------------------------------------
# metrics and plots


TIMING_COLUMNS: tuple[str, ...] = ("seconds", "train_samples_per_s", "data_wait_frac")
"""Columns of ``metrics.csv`` measured by the clock: they differ between two runs that are otherwise identical."""


def _write_metrics_csv(path: Path, history: Sequence[Mapping[str, Any]]) -> None:
    keys: list[str] = []
    for row in history:
        keys.extend(k for k in row if k not in keys)
    ordered = ["epoch", "train_loss"] + sorted(k for k in keys if k not in ("epoch", "train_loss", "lr", "seconds"))
    ordered += ["lr", "seconds"]
    write_csv(path, ordered, [{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
                              for row in history])


def plot_loss_curve(history: Sequence[Mapping[str, Any]], path: str | os.PathLike, monitor: str | None = None) -> None:
    """Plot ``train_loss`` (and ``val_loss`` when present) per epoch, plus the monitored metric, to a PNG.

    Args:
        history: one mapping per epoch with ``epoch`` and ``train_loss`` keys (the rows of ``metrics.csv``).
        path: output PNG, written atomically.
        monitor: a metric to draw in a second panel (skipped when it is a loss or absent).
    """
    epochs = [row["epoch"] for row in history]
    show_monitor = bool(monitor) and "loss" not in str(monitor) and all(monitor in row for row in history)
    fig = new_figure((10.0, 4.0) if show_monitor else (5.5, 4.0))
    axes = fig.subplots(1, 2 if show_monitor else 1, squeeze=False)
    ax = axes[0, 0]
    ax.plot(epochs, [row["train_loss"] for row in history], "o-", label="train loss")
    if all("val_loss" in row for row in history):
        ax.plot(epochs, [row["val_loss"] for row in history], "s-", label="validation loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    if show_monitor:
        ax2 = axes[0, 1]
        ax2.plot(epochs, [row[monitor] for row in history], "o-", color="tab:green")
        ax2.set_xlabel("epoch")
        ax2.set_ylabel(str(monitor))
        ax2.grid(alpha=0.3)
    save_figure(fig, path, dpi=100)


# --------------------------------------------------------------------------------------------------------------------
# trainer


def _batch_len(batch: Any) -> float:
    """Samples in a batch: the first dimension of its first tensor; NaN when it has none (throughput unknown, never an
    error that stops training)."""
    if isinstance(batch, torch.Tensor):
        return float(batch.shape[0]) if batch.ndim else math.nan
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        n = _batch_len(value)
        if not math.isnan(n):
            return n
    return math.nan


@dataclass
class FitResult:
    """What :meth:`Trainer.fit` returns (the same on every rank)."""

    best_metric: float
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    history: list[dict[str, Any]] = field(default_factory=list)
    run_dir: Path | None = None

    @property
    def best_checkpoint(self) -> Path | None:
        return None if self.run_dir is None else self.run_dir / "checkpoints" / "best.pt"

    def best_validation(self) -> dict[str, float]:
        """The ``val_*`` metrics of the best epoch's history row (the last row's when no row is the best epoch; empty
        without history)."""
        last_row = self.history[-1] if self.history else {}
        best_row = next((r for r in self.history if r["epoch"] == self.best_epoch), last_row)
        return {k: float(v) for k, v in best_row.items() if k.startswith("val_")}


@dataclass
class ModelExport:
    """A model directory to write from a finished run: what :meth:`Trainer.export`'s ``describe`` returns on rank 0.

    Attributes:
        config: its ``config.yaml`` (:class:`~covidctnet.core.model_dir.ModelDirConfig` or the mapping of one).
        card: ``MODEL_CARD.md`` text.
        extra_files: files copied in, e.g. ``{"metrics.csv": run_dir / "metrics.csv"}``.
        state_dicts: the weights by component; ``None`` = the best epoch's weights as the export's ``component``.
    """

    config: ModelDirConfig | Mapping[str, Any]
    card: str
    extra_files: dict[str, str | os.PathLike] = field(default_factory=dict)
    state_dicts: dict[str, dict[str, torch.Tensor]] | None = None


@dataclass
class RunResult:
    """What every training command returns (``train_denoiser``, ``train_classifier``, ``train_slice``,
    ``pretrain_slice``). On ranks other than 0 of a distributed run, ``model_dir`` is ``None`` and ``val`` empty.

    Attributes:
        run_dir: the run folder.
        model_dir: the model directory written at the end.
        best_epoch, epochs_run: from the Trainer (``best_epoch`` is the exported epoch).
        monitor: the metric that chose the epoch.
        val: the exported model's validation metrics.
        history: per-epoch metrics rows (as in ``metrics.csv``).
        details: what the model kind adds (the denoiser's split, the classifier's split sizes …).
    """

    run_dir: Path
    model_dir: Path | None
    best_epoch: int
    epochs_run: int
    monitor: str
    val: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


OptimizerFactory = Callable[[Sequence[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


class Trainer:
    """Train one model with checkpoints, resume, early stopping, metrics and optional DDP.

    Args:
        model: the network (on CPU; moved to the device here). Seed before building it (:func:`seed_everything`).
        run_dir: output folder (``checkpoints/``, ``metrics.csv``, ``loss_curve.png``, ``config.yaml``).
        train_data: a map-style dataset; batches are made by a ``DataLoader`` with :class:`EpochSampler`.
        training_step: ``(model, batch) -> scalar loss``; ``batch`` is already on the device, ``model`` is the
            (possibly DDP-wrapped) network in train mode and under autocast on CUDA.
        validate: ``(model, device) -> {name: float}``, run on rank 0 in eval mode under ``torch.no_grad`` after each
            epoch with the unwrapped model and the device it is on. ``None``: the monitored metric is ``train_loss``.
            The Trainer adds ``train_samples_per_s`` (training throughput over all processes) to every row itself.
        optimizer_factory: ``params -> optimiser`` (default Adam, lr 1e-3).
        scheduler_factory: ``optimiser -> LR scheduler`` or ``None``; stepped once per epoch (``scheduler_interval``
            ``"epoch"``) or once per optimiser step (``"step"``).
        loop: epochs, patience, batch size, step caps, checkpoint cadence, loader workers, device and seed
            (:class:`LoopConfig`; a training command passes ``LoopConfig.of(cfg)``).
        monitor: metric for model selection and early stopping (a key of ``validate``'s dict, or ``train_loss``).
        mode: ``"max"`` (AUC, PSNR) or ``"min"`` (a loss).
        sample_weights: per-sample weights for class-balanced sampling with replacement (``None``: shuffle).
        samples_per_epoch: samples per epoch over all ranks (default: the dataset length).
        collate_fn: passed to the ``DataLoader``.
        amp: mixed precision (float16 autocast + GradScaler), used only on CUDA.
        grad_clip: max gradient norm (``None``: no clipping).
        ema_decay: keep an exponential moving average of the weights and buffers (decay per optimiser step, e.g.
            0.99 = a window of about 100 steps) and validate, select and export it instead of the raw weights.
            Small datasets make the raw weights jump from epoch to epoch; the average is steadier. ``None``: off.
        config: the resolved config (a dataclass or a mapping) written to ``run_dir/config.yaml`` on rank 0.
        epoch_callback: ``(epoch, model, run_dir)`` run on rank 0 after validation to draw sample pictures, with the
            model in eval mode and without gradients; an exception in it is logged as a warning, never raised.
        show_progress: ``None`` shows a progress bar on an interactive terminal.
    """

    def __init__(
        self,
        model: nn.Module,
        run_dir: str | os.PathLike,
        *,
        train_data: Dataset,
        training_step: Callable[[nn.Module, Any], torch.Tensor],
        loop: LoopConfig = LoopConfig(),
        validate: Callable[[nn.Module, torch.device], Mapping[str, float]] | None = None,
        optimizer_factory: OptimizerFactory | None = None,
        scheduler_factory: SchedulerFactory | None = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        monitor: str = "train_loss",
        mode: Literal["max", "min"] = "min",
        sample_weights: Sequence[float] | None = None,
        samples_per_epoch: int | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        amp: bool = True,
        grad_clip: float | None = None,
        ema_decay: float | None = None,
        config: Any = None,
        epoch_callback: Callable[[int, nn.Module, Path], None] | None = None,
        show_progress: bool | None = None,
    ) -> None:
        if mode not in ("max", "min"):
            raise ConfigError(f"mode must be 'max' or 'min', not {mode!r}")
        if scheduler_interval not in ("epoch", "step"):
            raise ConfigError(f"scheduler_interval must be 'epoch' or 'step', not {scheduler_interval!r}")
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in (0, 1) or None, not {ema_decay}")
        if validate is None and monitor != "train_loss":
            raise ConfigError(f"monitor {monitor!r} needs a validate function; without one use 'train_loss'")
        self.run_dir = Path(run_dir)
        self.ctx = distributed_context()
        self._owns_process_group = False
        self.device = self._setup_device(loop.device)
        self.model = model.to(self.device)
        self.train_data = train_data
        self.training_step = training_step
        self.validate = validate
        self.optimizer = (optimizer_factory or (lambda p: torch.optim.Adam(p, lr=1e-3)))(
            [p for p in self.model.parameters() if p.requires_grad]
        )
        self.scheduler = scheduler_factory(self.optimizer) if scheduler_factory else None
        self.scheduler_interval = scheduler_interval
        self.monitor = monitor
        self.mode = mode
        self.max_epochs, self.patience, self.batch_size = loop.epochs, loop.patience, loop.batch_size
        self.sampler = EpochSampler(
            len(train_data),  # type: ignore[arg-type]
            loop.seed,
            weights=sample_weights,
            num_samples=samples_per_epoch,
            world_size=self.ctx.world_size,
            rank=self.ctx.rank,
        )
        self.steps_per_epoch, self.max_steps, self.checkpoint_every = (loop.steps_per_epoch, loop.max_steps,
                                                                       loop.checkpoint_every)
        self.global_step = 0  # optimiser steps of the whole run, this process
        self.num_workers = loop.num_workers
        self.collate_fn = collate_fn
        self.use_amp = bool(amp) and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.grad_clip = grad_clip
        self.ema: torch.optim.swa_utils.AveragedModel | None = None
        if ema_decay is not None:

            # buffers too, so BatchNorm statistics match the averaged weights without an extra pass over the data
            self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
        self.seed = loop.seed
        self.config = config
        self.epoch_callback = epoch_callback
        self.show_progress = show_progress
        self.ddp_model: nn.Module = self.model
        if self.ctx.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = DistributedDataParallel(self.model, device_ids=ids)

    # -- setup ---------------------------------------------------------------------------------------------------------
    def _setup_device(self, device: str) -> torch.device:
        dev = resolve_device(device)
        if not self.ctx.enabled:
            return dev
        if dev.type == "cuda":
            dev = torch.device("cuda", self.ctx.local_rank)
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend)
            self._owns_process_group = True
            logger.info("DDP: rank %d/%d, backend %s, device %s", self.ctx.rank, self.ctx.world_size, backend, dev)
        return dev

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def _better(self, value: float, best: float) -> bool:
        if math.isnan(value):
            return False
        return value > best if self.mode == "max" else value < best

    # -- checkpoint ----------------------------------------------------------------------------------------------------
    def _state(self, epoch: int, best_metric: float, best_epoch: int, bad_epochs: int,
               history: list[dict[str, Any]], partial: dict[str, Any] | None = None) -> dict[str, Any]:
        """The checkpoint after epoch ``epoch``; ``partial`` = where the next epoch stands (a step checkpoint)."""
        rng = _get_rng_state()
        rng["data_generator"] = self.sampler.generator.get_state()
        rng_all = [rng]
        if self.ctx.enabled:  # every rank's RNG, so dropout/augmentation on each rank resumes exactly
            gathered: list[Any] = [None] * self.ctx.world_size
            dist.all_gather_object(gathered, rng)
            rng_all = gathered
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": epoch,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.use_amp else None,
            "best_metric": best_metric,
            "best_epoch": best_epoch,
            "bad_epochs": bad_epochs,
            "monitor": self.monitor,
            "mode": self.mode,
            "seed": self.seed,
            "world_size": self.ctx.world_size,
            "history": history,
            "global_step": self.global_step,
            "partial_epoch": partial,
            "rng": rng_all,
        }

    def _restore(self, ckpt: dict[str, Any], path: Path) -> None:
        if (self.ema is None) != (ckpt.get("ema") is None):
            raise CheckpointError(f"{path}: written {'with' if ckpt.get('ema') is not None else 'without'} a weight "
                                  f"average (ema_decay), this run {'with' if self.ema is not None else 'without'}; "
                                  "start a new run directory")
        try:
            self.model.load_state_dict(ckpt["model"])
            if self.ema is not None:
                self.ema.load_state_dict(ckpt["ema"])
        except RuntimeError as err:
            raise CheckpointError(
                f"{path}: weights do not fit this model (another architecture?): {str(err).splitlines()[0][:300]}"
            ) from err
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if self.scheduler is not None and ckpt.get("scheduler") is not None:
                self.scheduler.load_state_dict(ckpt["scheduler"])
            if self.use_amp and ckpt.get("scaler"):
                self.scaler.load_state_dict(ckpt["scaler"])
        except (ValueError, KeyError, RuntimeError) as err:
            raise CheckpointError(f"{path}: optimiser/scheduler state does not fit this run: {err}") from err
        if ckpt.get("monitor") != self.monitor or ckpt.get("mode") != self.mode:
            raise CheckpointError(
                f"{path}: checkpoint selects on {ckpt.get('monitor')} ({ckpt.get('mode')}), this run on "
                f"{self.monitor} ({self.mode}); start a new run directory"
            )
        if ckpt.get("seed") != self.seed:
            logger.warning("%s: resuming with seed %s, checkpoint had %s; data order will differ",
                           path, self.seed, ckpt.get("seed"))
        rngs = ckpt["rng"]
        if ckpt.get("world_size", 1) != self.ctx.world_size:
            logger.warning("%s: written by %s process(es), resumed by %d; RNG streams are not exact",
                           path, ckpt.get("world_size"), self.ctx.world_size)
        rng = rngs[self.ctx.rank % len(rngs)]
        _set_rng_state(rng)
        self.sampler.generator.set_state(rng["data_generator"])

    def _run_epoch_callback(self, epoch: int) -> None:
        """``epoch_callback`` on the model validation used, in eval mode and without gradients; the mode is restored
        and a failure only logged."""
        net = self.eval_model
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad():
                self.epoch_callback(epoch, net, self.run_dir)
        except Exception as err:  # a plotting problem must never stop training
            logger.warning("sample PNG for epoch %d not written: %s", epoch, err)
        finally:
            net.train(was_training)

    def _write_outputs(self, ckpt: dict[str, Any], improved: bool) -> None:
        """Rank 0: checkpoints, metrics.csv, loss curve. Barriers keep other ranks from racing ahead."""
        _barrier(self.ctx)
        if self.ctx.is_main:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            save_checkpoint(ckpt, self.checkpoint_dir / "last.pt")
            if improved:
                save_checkpoint(ckpt, self.checkpoint_dir / "best.pt")
            _write_metrics_csv(self.run_dir / "metrics.csv", ckpt["history"])
            try:
                plot_loss_curve(ckpt["history"], self.run_dir / "loss_curve.png", self.monitor)
            except Exception as err:  # a plotting problem must never kill a long training run
                logger.warning("loss curve not written: %s", err)
        _barrier(self.ctx)

    # -- loop ----------------------------------------------------------------------------------------------------------
    def _loader(self, epoch: int, skip_steps: int = 0) -> DataLoader:
        self.sampler.set_epoch(epoch, skip_steps * self.batch_size)
        set_epoch = getattr(self.train_data, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, self.ctx.rank, 1))  # worker base seeds
        return DataLoader(
            self.train_data,
            batch_size=self.batch_size,
            sampler=self.sampler,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            pin_memory=self.device.type == "cuda",
            drop_last=False,
            generator=g,
        )

    def _train_epoch(self, epoch: int, partial: Mapping[str, Any] | None,
                     save_partial: Callable[[dict[str, Any]], None]) -> dict[str, float]:
        """One epoch of optimiser steps (from ``partial["step"]`` when resuming inside it).

        Returns:
            ``train_loss`` (mean over the epoch's steps), ``train_samples_per_s`` over all processes, and
            ``data_wait_frac``, the share of this process's epoch time spent waiting for the next batch.
        """
        start = time.perf_counter()
        first = int(partial["step"]) if partial else 0
        # (sum of losses, steps, samples, seconds, seconds waiting for data), carried over a step checkpoint
        total = torch.tensor(partial["totals"] if partial else [0.0] * 5, dtype=torch.float64)
        self.ddp_model.train()
        full = math.ceil(self.sampler.per_rank / self.batch_size)
        n_steps = full if self.steps_per_epoch is None else min(full, self.steps_per_epoch)
        last = n_steps if self.max_steps is None else min(n_steps, first + self.max_steps - self.global_step)
        enabled = self.show_progress if self.ctx.is_main else False
        batches = iter(self._loader(epoch, first))
        with progress_task(n_steps, f"epoch {epoch}", "steps", enabled) as bar:
            bar.advance(first)
            for step in range(first, last):
                t0 = time.perf_counter()
                batch = move_to_device(next(batches), self.device)
                waited = time.perf_counter() - t0
                loss = self._step(batch, epoch, step)
                self.global_step += 1
                elapsed = time.perf_counter() - start
                total += torch.tensor([float(loss), 1.0, _batch_len(batch), 0.0, waited], dtype=torch.float64)
                bar.advance()
                if self.checkpoint_every and self.global_step % self.checkpoint_every == 0 and step + 1 < n_steps:
                    save_partial({"step": step + 1, "totals": (total + torch.tensor([0, 0, 0, elapsed, 0],
                                                                                     dtype=torch.float64)).tolist()})
        del batches  # shut the workers down before validation
        total[3] += time.perf_counter() - start
        seconds, wait = float(total[3]), float(total[4])
        if self.ctx.enabled:
            dist.all_reduce(total)
        return {"train_loss": float(total[0] / max(total[1], 1.0)),
                "train_samples_per_s": float(total[2]) / max(seconds, 1e-9),
                "data_wait_frac": wait / max(seconds, 1e-9)}

    def _step(self, batch: Any, epoch: int, step: int) -> torch.Tensor:
        """One optimiser step on ``batch`` (on the device); returns the detached loss."""
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.use_amp):
            loss = self.training_step(self.ddp_model, batch)
        if not torch.isfinite(loss.detach()).all():
            raise CovidCTNetError(
                f"{self.run_dir}: loss is {loss.item()} at epoch {epoch} step {step}; lower the learning rate "
                "or check the data (resume from checkpoints/last.pt once fixed)"
            )
        self.scaler.scale(loss).backward()
        if self.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scheduler is not None and self.scheduler_interval == "step":
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        return loss.detach()

    @property
    def eval_model(self) -> nn.Module:
        """The network that is validated and exported: the weight average if ``ema_decay`` is set, else the model."""
        return self.ema.module if self.ema is not None else self.model

    def _validate(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.ctx.is_main and self.validate is not None:
            net = self.eval_model
            net.eval()
            with torch.no_grad():
                metrics = {k: float(v) for k, v in self.validate(net, self.device).items()}
            net.train()
        if self.ctx.enabled:  # every rank needs the monitored value to stop at the same epoch
            box: list[Any] = [metrics]
            dist.broadcast_object_list(box, src=0)
            metrics = box[0]
        return metrics

    def fit(self, resume: bool = False) -> FitResult:
        """Train up to ``max_epochs`` or ``max_steps`` (or early stop), checkpointing every epoch (and every
        ``checkpoint_every`` steps).

        Args:
            resume: continue from ``run_dir/checkpoints/last.pt`` (inside its epoch if it is a step checkpoint).
                Without it an existing ``last.pt`` is an error, so a finished run is never overwritten by accident.

        Returns:
            FitResult with the best metric and epoch and the per-epoch history.

        Raises:
            CheckpointError: ``resume`` without a readable checkpoint, or an existing run without ``resume``.
        """
        last = self.checkpoint_dir / "last.pt"
        start_epoch, best_metric, best_epoch, bad_epochs = 0, (-math.inf if self.mode == "max" else math.inf), -1, 0
        history: list[dict[str, Any]] = []
        partial: dict[str, Any] | None = None
        if resume:
            ckpt = load_checkpoint(last)
            self._restore(ckpt, last)
            start_epoch = int(ckpt["epoch"]) + 1
            best_metric, best_epoch = float(ckpt["best_metric"]), int(ckpt.get("best_epoch", -1))
            bad_epochs, history = int(ckpt.get("bad_epochs", 0)), list(ckpt["history"])
            self.global_step, partial = int(ckpt.get("global_step", 0)), ckpt.get("partial_epoch")
            if self.ctx.is_main:
                logger.info("resuming %s at epoch %d%s (best %s = %.4g at epoch %d)", self.run_dir, start_epoch,
                            f" step {partial['step']}" if partial else "", self.monitor, best_metric, best_epoch)
        else:
            if last.exists():
                raise CheckpointError(f"{last}: a run already exists here; pass --resume to continue it or use a new "
                                      "run directory")
            random.seed(derive_seed(self.seed, self.ctx.rank, 2))
            np.random.seed(derive_seed(self.seed, self.ctx.rank, 3) % 2**32)
            torch.manual_seed(derive_seed(self.seed, self.ctx.rank, 4))
        if self.ctx.is_main:
            self._prepare_run_dir()
        stopped_early = False
        if self.patience is not None and bad_epochs > self.patience:
            stopped_early = True
        epoch = start_epoch
        while epoch < self.max_epochs and not stopped_early and not self._steps_done():
            t0 = time.perf_counter()
            lr = float(self.optimizer.param_groups[0]["lr"]) if partial is None else float(partial["lr"])

            def save_partial(position: dict[str, Any], e: int = epoch, lr: float = lr,
                             best: tuple[float, int, int] = (best_metric, best_epoch, bad_epochs)) -> None:
                position.update(epoch=e, lr=lr)  # the state after epoch e - 1, plus where epoch e stands
                self._write_outputs(self._state(e - 1, *best, history, position), False)

            train = self._train_epoch(epoch, partial, save_partial)
            partial, train_loss = None, train["train_loss"]
            val = self._validate()
            if self.scheduler is not None and self.scheduler_interval == "epoch":
                self.scheduler.step()
            row: dict[str, Any] = {"epoch": epoch, **train, **val, "lr": lr, "step": self.global_step}
            value = train_loss if self.monitor == "train_loss" else val.get(self.monitor)
            if value is None:
                raise ConfigError(f"monitor {self.monitor!r} is not among the validation metrics {sorted(val)}")
            improved = self._better(float(value), best_metric)
            if improved:
                best_metric, best_epoch, bad_epochs = float(value), epoch, 0
            else:
                bad_epochs += 1
            row["seconds"] = round(time.perf_counter() - t0, 3)
            history.append(row)
            if self.ctx.is_main:
                extra = "".join(f" {k}={v:.4g}" for k, v in val.items())
                logger.info("epoch %d: train_loss=%.4g%s lr=%.3g (%.1f s)%s", epoch, train_loss, extra, lr,
                            row["seconds"], " *best*" if improved else "")
                if self.epoch_callback is not None:
                    self._run_epoch_callback(epoch)
            self._write_outputs(self._state(epoch, best_metric, best_epoch, bad_epochs, history), improved)
            if self.patience is not None and bad_epochs > self.patience:
                stopped_early = True
                if self.ctx.is_main:
                    logger.info("early stop at epoch %d: no %s improvement for %d epochs", epoch, self.monitor,
                                bad_epochs)
            epoch += 1
        return FitResult(best_metric, best_epoch, len(history), stopped_early, history, self.run_dir)

    def _prepare_run_dir(self) -> None:
        """Rank 0 before the first epoch: create the run folder, clear what interrupted writes left, save the config."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # a run killed during a checkpoint, metrics, sample or model write left a hidden temp file or folder;
        # the real files are whole (atomic renames), so the leftovers are only clutter: remove them
        folders = [self.run_dir, *(d for d in self.run_dir.iterdir() if d.is_dir() and not d.name.startswith("."))]
        for stale in (p for folder in folders for p in remove_stale_temps(folder)):
            logger.info("removed %s, left by an interrupted write", stale)
        self._save_config()

    def _steps_done(self) -> bool:
        return self.max_steps is not None and self.global_step >= self.max_steps

    def _save_config(self) -> None:
        if self.config is None:
            return

        cfg = config_to_dict(self.config) if dataclasses.is_dataclass(self.config) else dict(self.config)
        atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))

    # -- export --------------------------------------------------------------------------------------------------------
    def best_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights of ``checkpoints/best.pt`` (``last.pt`` if no epoch improved); the average if kept."""
        path = self.checkpoint_dir / "best.pt"
        if not path.exists():
            path = self.checkpoint_dir / "last.pt"
        ckpt = load_checkpoint(path)
        if ckpt.get("ema") is None:
            return ckpt["model"]
        prefix = "module."  # AveragedModel wraps the network; its own n_averaged counter is not a model weight
        return {k[len(prefix):]: v for k, v in ckpt["ema"].items() if k.startswith(prefix)}

    def export(self, out_dir: str | os.PathLike, describe: Callable[[], ModelExport],
               component: str = "model") -> ModelDir | None:
        """Write the run's model directory. Call it on every rank: rank 0 calls ``describe`` and writes, then every
        rank waits at one barrier, so no rank goes on before the directory exists.

        Args:
            out_dir: model directory to (re)write.
            describe: builds the config, card and extra files on rank 0 (it may read the run's outputs).
            component: component name of the best weights when ``describe`` gives no ``state_dicts``.

        Returns:
            The written :class:`~covidctnet.core.model_dir.ModelDir` on rank 0, ``None`` elsewhere.
        """
        result, failure = None, None
        if self.ctx.is_main:
            try:
                spec = describe()
                states = spec.state_dicts if spec.state_dicts is not None else {component: self.best_state_dict()}
                result = save_model_dir(out_dir, spec.config, states, spec.card, spec.extra_files or None)
            except Exception as err:
                failure = err
        if self.ctx.enabled:  # every rank learns whether rank 0 failed, so none waits at a barrier until a timeout
            box: list[Any] = [None if failure is None else f"{type(failure).__name__}: {failure}"]
            dist.broadcast_object_list(box, src=0)
            if failure is None and box[0] is not None:
                raise CovidCTNetError(f"{out_dir}: rank 0 could not write the model directory ({box[0]})")
        if failure is not None:
            raise failure
        return result

    def run(self, describe: Callable[[FitResult], ModelExport], component: str = "model", *, resume: bool = False,
            out_dir: str | os.PathLike | None = None) -> tuple[FitResult, ModelDir | None]:
        """Fit, export the model directory and close, on every rank: what a training command does with its Trainer.

        Args:
            describe: ``fit -> ModelExport`` on rank 0 (see :meth:`export`); it may still use the trainer's device
                and best weights.
            component: component name of the best weights when ``describe`` gives no ``state_dicts``.
            resume: continue from ``checkpoints/last.pt`` (see :meth:`fit`).
            out_dir: the model directory (default ``run_dir/model``).

        Returns:
            ``(fit result, the written model directory on rank 0 or None elsewhere)``.
        """
        try:
            fit = self.fit(resume=resume)
            md = self.export(out_dir if out_dir is not None else self.run_dir / "model", lambda: describe(fit),
                             component)
            return fit, md
        finally:
            self.close()

    def close(self) -> None:
        """Tear down the process group if this trainer created it."""
        if self._owns_process_group and dist.is_initialized():
            # wait until every rank is done with its last collective: a rank that tears the group down while
            # another still receives a broadcast aborts the other (gloo: "terminate called without an active
            # exception")
            dist.barrier()
            dist.destroy_process_group()
            self._owns_process_group = False

"""Fine-tuning a pruned graph with PyTorch Lightning: distillation, early stopping, TensorBoard.

``fxopt.finetune`` is a plain loop for one device. This module hands the same job to Lightning,
so it runs on any accelerator and scales with Lightning's own strategies (``devices=``,
``strategy="ddp"``, ``num_nodes=``): fxopt adds no distribution code of its own.

- ``DistillationModule``: a ``LightningModule`` around the student (the pruned graph). The loss
  is ``fxopt.finetune.distillation_loss`` (Hinton: ``kd_alpha * T^2 * KL + (1 - kd_alpha) * CE``)
  against a frozen teacher (the unpruned model; no teacher: plain cross-entropy). It logs
  ``train_loss``, ``val_loss`` and ``val_acc``.
- ``finetune_lightning``: builds the ``Trainer`` with ``EarlyStopping`` (on ``val_loss``), a
  ``TensorBoardLogger`` under ``log_dir`` and a best-checkpoint callback, fits, and restores the
  best epoch's weights into the student.

    >>> pruned = fxopt.optimize(model, x, prune=0.5, pipeline=["cleanup"]).graph_module
    >>> result = finetune_lightning(pruned, train_loader, val_loader, teacher=model, epochs=10,
    ...                             log_dir="runs", patience=3)
    >>> result.history[-1]       # {'epoch': 10, 'train_loss': ..., 'val_loss': ..., ...}
    $ tensorboard --logdir runs

Needs ``lightning`` (``pip install 'fxopt[lightning]'``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxopt.errors import InputError, NotAvailableError
from fxopt.train.finetune import (DEFAULT_BATCH_SIZE, as_batches, check_models, check_settings,
                                  check_trainable, cosine_schedule, distillation_loss,
                                  frozen_teacher, make_optimizer, split_batch)

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger
except ImportError:  # optional: fxopt[lightning]
    pl = None

__all__ = ["DistillationModule", "finetune_lightning", "LightningResult", "lightning_available"]

_HINT = "pip install 'fxopt[lightning]' (or lightning>=2.2)"


def lightning_available() -> bool:
    return pl is not None


def _require() -> None:
    if pl is None:
        raise NotAvailableError("the Lightning integration needs the lightning package",
                                hint=_HINT)


@dataclass
class LightningResult:
    model: nn.Module  # the student passed in, trained (best epoch's weights), in eval mode
    trainer: Any
    history: list[dict[str, float]] = field(default_factory=list)
    best_val_loss: float | None = None
    best_checkpoint: str | None = None
    stopped_early: bool = False
    log_dir: str | None = None  # where the TensorBoard event files are


if pl is not None:
    class DistillationModule(pl.LightningModule):
        """A student trained against a frozen teacher (or alone: cross-entropy)."""

        def __init__(self, student: nn.Module, teacher: nn.Module | None = None, *,
                     kd_alpha: float = 0.5, kd_temperature: float = 4.0, lr: float = 1e-3,
                     weight_decay: float = 0.0, optimizer: str | Callable = "adamw",
                     schedule: str = "cosine"):
            super().__init__()
            check_settings(1, kd_alpha, kd_temperature, lr, weight_decay, None, schedule)
            self.student = student
            # a frozen copy: Lightning moves and flags it, never the caller's model
            self.teacher = frozen_teacher(teacher) if teacher is not None else None
            self.kd_alpha, self.kd_temperature = kd_alpha, kd_temperature
            self.lr, self.weight_decay = lr, weight_decay
            self.optimizer_name, self.schedule = optimizer, schedule
            self.save_hyperparameters(ignore=["student", "teacher", "optimizer"])

        def forward(self, *xs):
            return self.student(*xs)

        def on_train_epoch_start(self):
            # Lightning keeps each submodule's mode: the student trains (BatchNorm statistics,
            # dropout), the teacher stays in eval mode.
            self.student.train()
            if self.teacher is not None:
                self.teacher.eval()

        def training_step(self, batch, batch_idx):
            xs, y = split_batch(batch, self.device)
            logits = self.student(*xs)
            teacher_logits = None
            if self.teacher is not None and self.kd_alpha > 0:
                with torch.no_grad():
                    teacher_logits = self.teacher(*xs)
            loss = distillation_loss(logits, teacher_logits, y, alpha=self.kd_alpha,
                                     temperature=self.kd_temperature)
            self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True,
                     batch_size=len(xs[0]))
            return loss

        def validation_step(self, batch, batch_idx):
            xs, y = split_batch(batch, self.device)
            logits = self.student(*xs)
            n = len(xs[0])
            self.log("val_loss", F.cross_entropy(logits, y), on_epoch=True, prog_bar=True,
                     batch_size=n)
            self.log("val_acc", (logits.argmax(-1) == y).float().mean(), on_epoch=True,
                     batch_size=n)

        def configure_optimizers(self):
            params = [p for p in self.student.parameters() if p.requires_grad]
            if not params:
                raise InputError("the student has no trainable parameters")
            opt = make_optimizer(self.optimizer_name, params, self.lr, self.weight_decay)
            if self.schedule != "cosine":
                return opt
            sched = cosine_schedule(opt, max(1, int(self.trainer.estimated_stepping_batches)))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    class _History(Callback):
        """One row of logged metrics per epoch (after validation)."""

        def __init__(self):
            self.rows: list[dict[str, float]] = []

        def on_train_epoch_end(self, trainer, module):
            row = {"epoch": trainer.current_epoch + 1}
            for k, v in trainer.callback_metrics.items():
                if k.endswith("_step"):
                    continue
                row[k.removesuffix("_epoch")] = float(v)
            self.rows.append(row)
else:
    def DistillationModule(*args, **kwargs):  # noqa: N802 - same name as the class
        _require()


def finetune_lightning(student: nn.Module, train: Iterable, val: Iterable | None = None, *,
                       teacher: nn.Module | None = None, epochs: int = 5,
                       log_dir: str | Path = "lightning_logs", name: str = "fxopt",
                       kd_alpha: float = 0.5, kd_temperature: float = 4.0, lr: float = 1e-3,
                       weight_decay: float = 0.0, optimizer: str | Callable = "adamw",
                       schedule: str = "cosine", patience: int | None = 3,
                       accelerator: str = "auto", devices: Any = "auto", strategy: Any = "auto",
                       seed: int | None = 0, progress: bool = False,
                       batch_size: int = DEFAULT_BATCH_SIZE,
                       **trainer_kwargs) -> LightningResult:
    """Fine-tune ``student`` in place with Lightning; returns it in eval mode with the history.

    ``train``/``val``: DataLoaders of ``(x, y)``, or the tensors ``(inputs, targets)`` (batched
    by ``batch_size``, the training set shuffled with ``seed``). ``patience``: early stopping
    on ``val_loss`` (needs ``val``; ``None``: off). The best epoch (lowest ``val_loss``) is
    restored at the end.
    ``accelerator``/``devices``/``strategy`` and ``trainer_kwargs`` (``limit_train_batches=``,
    ``precision=``, ``num_nodes=``, ...) go to ``lightning.pytorch.Trainer``.
    """
    _require()
    check_settings(epochs, kd_alpha, kd_temperature, lr, weight_decay, patience, schedule)
    check_models(student, teacher, "student")
    train = as_batches(train, name="train", batch_size=batch_size, shuffle=True, seed=seed)
    val = as_batches(val, name="val", batch_size=batch_size)
    check_trainable(student)
    if patience is not None and val is None:
        raise InputError("patience= needs val: early stopping watches the validation loss",
                         hint="pass val=... or patience=None")
    if seed is not None:
        pl.seed_everything(seed, workers=True, verbose=False)
    module = DistillationModule(student, teacher, kd_alpha=kd_alpha,
                                kd_temperature=kd_temperature, lr=lr, weight_decay=weight_decay,
                                optimizer=optimizer, schedule=schedule)
    logger = TensorBoardLogger(save_dir=str(log_dir), name=name)
    history = _History()
    callbacks: list = [history]
    checkpoint = None
    if val is not None:
        checkpoint = ModelCheckpoint(monitor="val_loss", mode="min", save_top_k=1)
        callbacks.append(checkpoint)
    early = None
    if patience is not None:
        early = EarlyStopping(monitor="val_loss", mode="min", patience=patience)
        callbacks.append(early)
    trainer = pl.Trainer(max_epochs=epochs, accelerator=accelerator, devices=devices,
                         strategy=strategy, logger=logger, callbacks=callbacks,
                         enable_progress_bar=progress, enable_model_summary=progress,
                         log_every_n_steps=1, **trainer_kwargs)
    student.train()
    trainer.fit(module, train_dataloaders=train, val_dataloaders=val)
    result = LightningResult(student, trainer, history.rows, log_dir=logger.log_dir)
    if checkpoint is not None and checkpoint.best_model_path:
        state = torch.load(checkpoint.best_model_path, map_location="cpu",
                           weights_only=False)["state_dict"]
        module.load_state_dict(state)
        result.best_checkpoint = checkpoint.best_model_path
        score = checkpoint.best_model_score
        result.best_val_loss = float(score) if score is not None else None
    result.stopped_early = early is not None and early.stopped_epoch > 0
    student.eval()
    return result

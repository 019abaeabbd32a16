"""Lightning integration: [`TriQDefCallback`][triqdef.integrations.lightning.TriQDefCallback].

Needs the ``[lightning]`` extra (``pip install "triqdef[lightning]"``). The
LightningModule holds a [`TriQDefWrapper`][triqdef.TriQDefWrapper] and its
``training_step`` returns ``self.model.loss(x, y)``; the callback does the rest.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch

from .._checks import logits_of
from ..errors import ConfigError
from ..schedule import BACTSchedule
from ..wrapper import TriQDefWrapper

__all__ = ["TriQDefCallback"]

_UNITS = ("epoch", "step")


def _first_loader(loaders: Any) -> Any:
    """The first dataloader of what ``trainer.val_dataloaders`` (or train) holds."""
    if isinstance(loaders, Mapping):
        loaders = next(iter(loaders.values()), None)
    elif isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    return loaders


class _CalibrationBatches:
    """Inputs for calibration, read when a stage joins, moved to the wrapper's device.

    From ``loader`` when given, else the trainer's first validation dataloader, else
    its training dataloader.
    """

    def __init__(self, callback: TriQDefCallback, loader: Iterable | None) -> None:
        self.callback = callback
        self.loader = loader

    def __iter__(self) -> Iterator[torch.Tensor]:
        trainer = self.callback._trainer
        loader = self.loader
        if loader is None and trainer is not None:
            loader = _first_loader(trainer.val_dataloaders)
            if loader is None:
                loader = _first_loader(trainer.train_dataloader)
        if loader is None:
            raise ConfigError(
                "TriQDefCallback: no calibration batches: pass calib_loader=, or give the "
                "Trainer a validation or training dataloader"
            )
        wrapper = self.callback.wrapper
        param = next(iter(wrapper.parameters()), None) if wrapper is not None else None
        device = param.device if param is not None else None
        for batch in loader:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            yield x.to(device) if isinstance(x, torch.Tensor) and device is not None else x


class TriQDefCallback(pl.Callback):
    """Train a [`TriQDefWrapper`][triqdef.TriQDefWrapper] inside a LightningModule.

    The callback finds the one ``TriQDefWrapper`` among ``pl_module.modules()``, steps
    a [`BACTSchedule`][triqdef.BACTSchedule] once per epoch or once per optimizer
    step, logs the loss's terms and per-bit clean accuracy through
    ``pl_module.log_dict``, and keeps the schedule's progress in Lightning
    checkpoints. The LightningModule's ``training_step`` returns
    ``self.model.loss(x, y)`` (or ``self.model(x, y)``).

    Stepping: with ``step_every="epoch"`` the schedule steps at the end of each
    training epoch; with ``"step"``, once per increment of ``trainer.global_step``
    (an optimizer step, so gradient accumulation counts one step per update). The
    callback counts the steps it took and catches up to the trainer's epoch or
    step counter, so a run resumed from any checkpoint (including one written at
    validation end, before the epoch-end step) reaches the stage an uninterrupted
    run reaches.

    Calibration: when a stage joins, its bit-widths are calibrated on the first
    ``calib_batches`` batches of ``calib_loader``, else of the trainer's (first)
    validation dataloader, else of its training dataloader; the inputs (first item
    of each batch) are moved to the wrapper's device. This applies to a schedule the
    callback creates; a given ``schedule`` keeps its own ``calib_loader``.

    Logged keys (``prefix`` defaults to ``"triqdef/"``):

    * on each training batch end (``on_step=True``, subject to the trainer's
      ``log_every_n_steps``): ``{prefix}<term>`` for every key of
      [`loss_terms`][triqdef.TriQDefWrapper.loss_terms] (``total``, ``clean``,
      ``adv``, ``clean/<b>``, ``fdp``, ``gpdp/<b_i>-<b_j>``, ...) and
      ``{prefix}stage`` (the schedule's stage);
    * at validation epoch end (``on_epoch=True``): ``{prefix}val_acc/<b>``, the
      top-1 accuracy on the validation batches at each bit-width ``b``.

    Per-bit accuracy is counted in ``on_validation_batch_end``: one extra forward per
    bit-width and batch (eval mode, no gradient, ``wrapper.at_bits(b)``), counts kept
    on the device and summed across processes once per validation epoch (one host
    synchronisation per epoch). This costs the same forwards as running
    ``triqdef.evaluate.clean_accuracy`` afterwards but keeps no batches and does not
    synchronise per batch. Validation batches must be ``(x, y, ...)`` tuples or
    lists. Bit-widths not calibrated yet (not joined) are skipped.

    Checkpoints: the callback's ``state_dict`` holds the schedule's
    [`state_dict`][triqdef.BACTSchedule.state_dict] and the callback's step count;
    the wrapper's per-bit statistics are in the LightningModule's own state dict.
    Resuming with ``Trainer.fit(..., ckpt_path=...)`` restores both.

    Args:
        schedule: a [`BACTSchedule`][triqdef.BACTSchedule] of the module's wrapper
            (default: one is created with ``stages``, ``milestones``, ``total``,
            ``calib_batches`` and the calibration loader above).
        step_every: ``"epoch"`` (default) or ``"step"``.
        total: length of training in ``step_every`` units, for the default milestones
            (default: ``trainer.max_epochs`` or ``trainer.estimated_stepping_batches``).
        stages: passed to the created schedule.
        milestones: passed to the created schedule.
        calib_loader: iterable of batches for calibration (see above).
        calib_batches: batches per calibration pass of the created schedule.
        log_terms: log ``loss_terms()`` on each training batch end (one host
            synchronisation per batch).
        log_accuracy: log per-bit clean accuracy at validation end.
        accuracy_bits: bit-widths whose accuracy is logged (default: every bit-width
            of the wrapper; those not calibrated yet are skipped).
        prefix: prefix of every logged key.

    Raises:
        ConfigError: an argument is invalid; or, at fit time, the LightningModule holds
            no ``TriQDefWrapper`` or more than one, the given schedule belongs to
            another wrapper, or ``total`` is needed but the trainer has no finite
            length.

    Example:
        >>> cb = TriQDefCallback(step_every="step", total=100)
        >>> cb.step_every
        'step'
    """

    def __init__(
        self,
        schedule: BACTSchedule | None = None,
        *,
        step_every: str = "epoch",
        total: int | None = None,
        stages: Sequence[Sequence[int]] | None = None,
        milestones: Sequence[int] | None = None,
        calib_loader: Iterable | None = None,
        calib_batches: int = 8,
        log_terms: bool = True,
        log_accuracy: bool = True,
        accuracy_bits: Sequence[int] | None = None,
        prefix: str = "triqdef/",
    ) -> None:
        if schedule is not None and not isinstance(schedule, BACTSchedule):
            raise ConfigError(
                f"schedule must be a BACTSchedule or None, got {type(schedule).__name__}"
            )
        if step_every not in _UNITS:
            raise ConfigError(f"step_every must be 'epoch' or 'step', got {step_every!r}")
        if total is not None and (
            isinstance(total, bool) or not isinstance(total, int) or total < 1
        ):
            raise ConfigError(f"total must be a positive int or None, got {total!r}")
        if schedule is not None and (
            stages is not None
            or milestones is not None
            or total is not None
            or calib_loader is not None
        ):
            raise ConfigError(
                "stages, milestones, total and calib_loader configure the schedule the "
                "callback creates; with schedule= given, set them on that schedule"
            )
        if (
            isinstance(calib_batches, bool)
            or not isinstance(calib_batches, int)
            or calib_batches < 1
        ):
            raise ConfigError(f"calib_batches must be a positive int, got {calib_batches!r}")
        for name, flag in (("log_terms", log_terms), ("log_accuracy", log_accuracy)):
            if not isinstance(flag, bool):
                raise ConfigError(f"{name} must be True or False, got {flag!r}")
        if not isinstance(prefix, str):
            raise ConfigError(f"prefix must be a str, got {prefix!r}")
        if accuracy_bits is not None:
            try:
                accuracy_bits = tuple(accuracy_bits)
            except TypeError:
                raise ConfigError(
                    f"accuracy_bits must be a sequence of bit-widths, got {accuracy_bits!r}"
                ) from None
        self.schedule = schedule
        self.step_every = step_every
        self.total = total
        self.stages = stages
        self.milestones = milestones
        self.calib_loader = calib_loader
        self.calib_batches = calib_batches
        self.log_terms = log_terms
        self.log_accuracy = log_accuracy
        self.accuracy_bits = accuracy_bits
        self.prefix = prefix
        self.wrapper: TriQDefWrapper | None = None
        self._trainer: pl.Trainer | None = None
        self._done = 0  # schedule steps this callback took (units of step_every)
        self._pending: dict | None = None  # a checkpoint's state, before the schedule exists
        self._correct: dict[int, torch.Tensor] = {}
        self._seen: torch.Tensor | None = None

    # --- finding the wrapper, building the schedule ----------------------------------------
    @staticmethod
    def find_wrapper(pl_module: torch.nn.Module) -> TriQDefWrapper:
        """The one [`TriQDefWrapper`][triqdef.TriQDefWrapper] among ``pl_module.modules()``.

        Raises:
            ConfigError: there is none, or more than one.
        """
        found = [m for m in pl_module.modules() if isinstance(m, TriQDefWrapper)]
        if len(found) != 1:
            raise ConfigError(
                f"TriQDefCallback needs exactly one TriQDefWrapper in the LightningModule "
                f"{type(pl_module).__name__}, found {len(found)}; assign it as an attribute "
                "(e.g. self.model = TriQDefWrapper(...))"
            )
        return found[0]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer
        self.wrapper = self.find_wrapper(pl_module)
        bits = self.wrapper.bits
        unknown = [b for b in self.accuracy_bits or () if b not in bits]
        if unknown:
            raise ConfigError(f"accuracy_bits {unknown} are not bit-widths of the wrapper {bits}")
        if self.schedule is not None and self.schedule.wrapper is not self.wrapper:
            raise ConfigError(
                "the given schedule belongs to another TriQDefWrapper than the LightningModule's"
            )

    def _default_total(self, trainer: pl.Trainer) -> int:
        if self.total is not None:
            return self.total
        if self.step_every == "epoch":
            n = trainer.max_epochs
        else:
            steps = trainer.estimated_stepping_batches
            n = int(steps) if steps != float("inf") else None
        if n is None or n < 1:
            raise ConfigError(
                f"TriQDefCallback: pass total= (the training length in {self.step_every}s); "
                "the trainer's is not finite"
            )
        return n

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer = trainer
        if self.schedule is None:
            assert self.wrapper is not None
            self.schedule = BACTSchedule(
                self.wrapper,
                stages=self.stages,
                milestones=self.milestones,
                total=self._default_total(trainer),
                calib_loader=_CalibrationBatches(self, self.calib_loader),
                calib_batches=self.calib_batches,
            )
        if self._pending is not None:
            self._apply(self._pending)

    # --- stepping ------------------------------------------------------------------------
    def _catch_up(self, target: int) -> None:
        """Step the schedule until this callback has taken ``target`` steps."""
        assert self.schedule is not None
        while self._done < target:
            self.schedule.step()
            self._done += 1

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.step_every == "epoch":
            self._catch_up(trainer.current_epoch)  # a checkpoint from before an epoch-end step

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.step_every == "epoch":
            self._catch_up(trainer.current_epoch + 1)  # current_epoch counts up after this hook

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        assert self.wrapper is not None and self.schedule is not None
        if self.log_terms:
            terms = self.wrapper.loss_terms()
            if terms:
                values = {f"{self.prefix}{k}": v for k, v in terms.items()}
                values[f"{self.prefix}stage"] = float(self.schedule.stage)
                pl_module.log_dict(values, on_step=True, on_epoch=False)
        if self.step_every == "step":
            self._catch_up(trainer.global_step)

    # --- per-bit validation accuracy -------------------------------------------------------
    def _bits_to_evaluate(self) -> tuple[int, ...]:
        assert self.wrapper is not None
        ready = set(self.wrapper.calibrated_bits())
        wanted = self.wrapper.bits if self.accuracy_bits is None else self.accuracy_bits
        return tuple(b for b in wanted if b in ready)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.wrapper is None:  # trainer.validate(): setup found it; be safe
            self.wrapper = self.find_wrapper(pl_module)
        self._correct = {}
        self._seen = None
        if self.log_accuracy:
            device = pl_module.device
            self._correct = {
                b: torch.zeros((), dtype=torch.long, device=device)
                for b in self._bits_to_evaluate()
            }
            self._seen = torch.zeros((), dtype=torch.long, device=device)

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._correct or self._seen is None:
            return
        assert self.wrapper is not None
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ConfigError(
                "TriQDefCallback: per-bit accuracy needs (x, y, ...) validation batches, got "
                f"{type(batch).__name__}; pass log_accuracy=False otherwise"
            )
        x, y = batch[0], batch[1]
        with torch.no_grad():
            for b, correct in self._correct.items():
                with self.wrapper.at_bits(b):
                    logits = logits_of(self.wrapper(x), "TriQDefCallback")
                correct += (logits.argmax(dim=1) == y).sum()
        self._seen += y.shape[0]

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._correct or self._seen is None:
            return
        bits = list(self._correct)
        counts = torch.stack([self._seen, *(self._correct[b] for b in bits)])
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        seen = int(counts[0])
        if seen:
            acc = {
                f"{self.prefix}val_acc/{b}": float(counts[i + 1]) / seen for i, b in enumerate(bits)
            }
            pl_module.log_dict(acc, on_step=False, on_epoch=True)
        self._correct, self._seen = {}, None

    # --- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The schedule's progress and the callback's step count, for checkpoints."""
        return {
            "schedule": None if self.schedule is None else self.schedule.state_dict(),
            "steps_taken": self._done,
            "step_every": self.step_every,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from [`state_dict`][triqdef.integrations.lightning.TriQDefCallback.state_dict].

        Applied at once when the schedule exists, else when the fit starts.

        Raises:
            ConfigError: the state is not such a dict, or was saved with another
                ``step_every`` (see also
                [`BACTSchedule.load_state_dict`][triqdef.BACTSchedule.load_state_dict]).
        """
        if not isinstance(state_dict, Mapping) or set(state_dict) != {
            "schedule",
            "steps_taken",
            "step_every",
        }:
            raise ConfigError("TriQDefCallback: not a state dict saved by TriQDefCallback")
        if state_dict["step_every"] != self.step_every:
            raise ConfigError(
                f"TriQDefCallback: the checkpoint stepped every {state_dict['step_every']!r}, "
                f"this callback every {self.step_every!r}"
            )
        if self.schedule is not None:
            self._apply(dict(state_dict))
        else:
            self._pending = dict(state_dict)

    def _apply(self, state: dict[str, Any]) -> None:
        assert self.schedule is not None
        if state["schedule"] is not None:
            self.schedule.load_state_dict(state["schedule"])
        self._done = int(state["steps_taken"])
        self._pending = None

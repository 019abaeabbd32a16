"""`BACTSchedule`: the bit-width-aware curriculum (paper section 3.4)."""

from __future__ import annotations

import itertools
import numbers
import warnings
from collections.abc import Iterable, Mapping, Sequence

from .errors import ConfigError
from .wrapper import TriQDefWrapper

__all__ = ["BACTSchedule"]


def _default_stages(bits: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """High precision (>= 8 bits, or the highest bit-width) first, then one bit-width at a time."""
    first = tuple(b for b in bits if b >= 8) or bits[:1]
    return (first, *((b,) for b in bits if b not in first))


class BACTSchedule:
    """Stage the active bit-widths from high to low precision; step it yourself.

    Training starts with the first stage active (by default every bit-width of 8
    bits or more: 32 and 8 for the default bits) and each later stage joins at
    its milestone. When a stage joins, its bit-widths' observers and BatchNorm
    statistics are re-estimated on a short calibration pass
    ([`TriQDefWrapper.calibrate`][triqdef.TriQDefWrapper.calibrate]: no gradient, no
    weight copy) before they are trained.

    Call [`step`][triqdef.BACTSchedule.step] once per epoch or once per iteration;
    ``milestones`` and ``total`` are counted in the same unit. By default the stages join
    evenly over the first half of ``total`` steps: with the default bits and
    ``total=200`` (the paper's CIFAR-10 epochs), 5 bits joins at step 33, 4 bits at 67
    and 2 bits at 100.

    Args:
        wrapper: the [`TriQDefWrapper`][triqdef.TriQDefWrapper] to schedule.
        stages: groups of bit-widths in joining order; together they must be
            exactly ``wrapper.bits``.
        milestones: step count at which each stage after the first joins
            (non-decreasing); default spread over the first half of ``total``.
        total: length of training in steps (epochs or iterations), used only for
            the default milestones.
        calib_loader: iterable of batches (tensors, or tuples whose first item is
            the input) for calibration; the first ``calib_batches`` are used. Without
            it, the most recent ``calib_batches`` inputs seen by ``wrapper.loss`` are
            used (see
            [`keep_recent_inputs`][triqdef.TriQDefWrapper.keep_recent_inputs]).
        calib_batches: how many batches a calibration pass uses.

    Example:
        >>> import torch
        >>> from triqdef import TriQDefWrapper
        >>> w = TriQDefWrapper(torch.nn.Linear(4, 3))
        >>> s = BACTSchedule(w, total=8)
        >>> s.active_bits, s.milestones
        ((32, 8), (1, 3, 4))
    """

    def __init__(
        self,
        wrapper: TriQDefWrapper,
        stages: Sequence[Sequence[int]] | None = None,
        milestones: Sequence[int] | None = None,
        total: int = 200,
        calib_loader: Iterable | None = None,
        calib_batches: int = 8,
    ) -> None:
        if not isinstance(wrapper, TriQDefWrapper):
            raise ConfigError(f"BACTSchedule needs a TriQDefWrapper, got {type(wrapper).__name__}")
        stages = _default_stages(wrapper.bits) if stages is None else stages
        try:
            stages = tuple(tuple(sorted(s, reverse=True)) for s in stages)
        except TypeError:
            raise ConfigError(f"stages must be groups of bit-widths, got {stages!r}") from None
        flat = [b for s in stages for b in s]
        if not stages or any(not s for s in stages) or sorted(flat) != sorted(wrapper.bits):
            raise ConfigError(
                f"stages {stages} must be non-empty groups covering the wrapper's bits "
                f"{wrapper.bits} exactly once"
            )
        if isinstance(total, bool) or not isinstance(total, int) or total < 1:
            raise ConfigError(f"total must be a positive int, got {total!r}")
        n_joins = len(stages) - 1
        if milestones is None:
            milestones = tuple(
                max(1, round(total * i / (2 * n_joins))) for i in range(1, n_joins + 1)
            )
        try:
            milestones = tuple(milestones)
        except TypeError:
            raise ConfigError(
                f"milestones must be a sequence of ints, got {milestones!r}"
            ) from None
        if len(milestones) != n_joins or any(
            isinstance(m, bool) or not isinstance(m, int) or m < 0 for m in milestones
        ):
            raise ConfigError(
                f"milestones must be {n_joins} non-negative ints (one per stage after the "
                f"first), got {milestones}"
            )
        if list(milestones) != sorted(milestones):
            raise ConfigError(f"milestones must be non-decreasing, got {milestones}")
        if (
            isinstance(calib_batches, bool)
            or not isinstance(calib_batches, int)
            or calib_batches < 1
        ):
            raise ConfigError(f"calib_batches must be a positive int, got {calib_batches!r}")

        self.wrapper = wrapper
        self.stages = stages
        self.milestones = milestones
        self.calib_loader = calib_loader
        self.calib_batches = calib_batches
        self.steps = 0
        self.stage = 0
        if calib_loader is None:
            wrapper.keep_recent_inputs(calib_batches)
        self._apply_stage()

    def __repr__(self) -> str:
        return (
            f"BACTSchedule(stages={self.stages}, milestones={self.milestones}, steps={self.steps}, "
            f"stage={self.stage}, active_bits={self.active_bits})"
        )

    @property
    def active_bits(self) -> tuple[int, ...]:
        """Bit-widths trained at the current stage."""
        return tuple(sorted((b for s in self.stages[: self.stage + 1] for b in s), reverse=True))

    def _apply_stage(self) -> None:
        self.wrapper.set_active_bits(self.active_bits)

    def _calibration_batches(self) -> list:
        if self.calib_loader is not None:
            return list(itertools.islice(iter(self.calib_loader), self.calib_batches))
        return self.wrapper.recent_inputs()

    def step(self) -> tuple[int, ...]:
        """Advance one step; stages whose milestone is reached join (and are calibrated).

        The step counts, and the stage advances, only once the joining bit-widths are
        calibrated: if the calibration batches cannot be read or
        [`calibrate`][triqdef.TriQDefWrapper.calibrate] fails, the error propagates and
        the schedule and the wrapper are left as they were, so calling ``step()`` again
        (after fixing the loader) retries the join.

        Returns:
            The bit-widths that joined at this step (empty most of the time).

        Raises:
            InputError: a calibration batch is not a valid input (from
                [`calibrate`][triqdef.TriQDefWrapper.calibrate]); nothing advanced.
            Exception: whatever ``calib_loader`` raises while it is read; nothing advanced.
        """
        steps, stage = self.steps + 1, self.stage
        joined: list[int] = []
        while stage < len(self.milestones) and steps >= self.milestones[stage]:
            stage += 1
            joined.extend(self.stages[stage])
        if joined:
            batches = self._calibration_batches()
            quantized = [b for b in joined if b < 32]
            if batches and quantized:
                self.wrapper.calibrate(batches, bits=quantized)
            elif quantized:
                warnings.warn(
                    f"BACTSchedule: no calibration batches for {quantized} bits (no calib_loader "
                    "and no loss computed yet); their observers start at the first step",
                    stacklevel=2,
                )
        self.steps, self.stage = steps, stage  # calibrated: only now the stage advances
        if joined:
            self._apply_stage()
        return tuple(joined)

    def state_dict(self) -> dict:
        """Progress of the schedule (steps and stage), for checkpoints."""
        return {
            "steps": self.steps,
            "stage": self.stage,
            "stages": [list(s) for s in self.stages],
            "milestones": list(self.milestones),
        }

    def _stage_at(self, steps: int) -> int:
        """The stage `step` reaches after ``steps`` steps."""
        return 0 if steps == 0 else sum(m <= steps for m in self.milestones)

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved stage; the wrapper's per-bit state comes from its own checkpoint.

        Every field is checked before anything changes: ``state`` must be what
        [`state_dict`][triqdef.BACTSchedule.state_dict] returned for a schedule with
        the same ``stages`` and ``milestones``, with ``steps`` a non-negative int and
        ``stage`` the stage those steps reach.

        Args:
            state: a dict from [`state_dict`][triqdef.BACTSchedule.state_dict].

        Raises:
            ConfigError: ``state`` is not such a dict (wrong type, missing or unknown
                keys, a field of the wrong type or out of range, or another schedule's
                stages, milestones or progress); the schedule and the wrapper are
                unchanged.
        """
        fields = ("steps", "stage", "stages", "milestones")
        if not isinstance(state, Mapping):
            raise ConfigError(
                f"schedule state must be a dict from BACTSchedule.state_dict(), got "
                f"{type(state).__name__}"
            )
        missing = [k for k in fields if k not in state]
        unknown = [k for k in state if k not in fields]
        if missing or unknown:
            raise ConfigError(
                f"schedule state must hold exactly the keys {list(fields)} (from "
                f"BACTSchedule.state_dict()); missing {missing}, unknown {unknown}"
            )

        def ints(value, name: str) -> tuple[int, ...]:
            if not isinstance(value, (list, tuple)) or not all(_is_int(v) for v in value):
                raise ConfigError(f"schedule state: {name} must be a list of ints, got {value!r}")
            return tuple(int(v) for v in value)

        stages = state["stages"]
        if not isinstance(stages, (list, tuple)):
            raise ConfigError(f"schedule state: stages must be a list of lists, got {stages!r}")
        stages = tuple(ints(s, "each stage") for s in stages)
        milestones = ints(state["milestones"], "milestones")
        if stages != self.stages or milestones != self.milestones:
            raise ConfigError(
                f"schedule state is for stages {stages} / milestones {milestones}, "
                f"this schedule has {self.stages} / {self.milestones}; build the schedule "
                "with the saved stages and milestones"
            )
        steps, stage = state["steps"], state["stage"]
        if not _is_int(steps) or steps < 0:
            raise ConfigError(f"schedule state: steps must be an int >= 0, got {steps!r}")
        if not _is_int(stage) or not 0 <= stage < len(self.stages):
            raise ConfigError(
                f"schedule state: stage must be an int in [0, {len(self.stages) - 1}], "
                f"got {stage!r}"
            )
        expected = self._stage_at(int(steps))
        if stage != expected:
            raise ConfigError(
                f"schedule state: stage {stage} does not follow from steps={steps} with "
                f"milestones {self.milestones} (that is stage {expected}); the state was "
                "edited or belongs to another schedule"
            )
        self.steps, self.stage = int(steps), int(stage)
        self._apply_stage()


def _is_int(value) -> bool:
    """An integer that is not a bool (numpy integers count)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)

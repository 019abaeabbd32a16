"""On-the-fly patches: one persistent patch updated across bit-widths during training."""

from __future__ import annotations

import collections
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_int, progress_bar
from ..errors import ConfigError, NotCalibratedError
from .base import UniversalPatchAttack, _is_wrapper
from .gap import _check_eot, eot_batch

__all__ = ["OnTheFlyPatch"]


def _ready(wrapper, bits: int) -> bool:
    """Whether the wrapper's observers at ``bits`` have seen data (32 bits always has)."""
    if bits == 32:
        return True
    index = tuple(b for b in wrapper.bits if b < 32).index(bits)
    return any(q.calibrated(index) for q in wrapper.quantizers.values())


class OnTheFlyPatch(UniversalPatchAttack):
    """The paper's on-the-fly patch source (section 4.1): EOT over locations, jitter and bits.

    One patch ``P`` persists across calls. Each call makes ``steps`` updates
    (default 1), each

    ``P <- clip_[0,1](P + step_size * sign(grad_P (1/K) sum_k CE(f_{b_k}(x_adv^(k)), y)))``

    over ``K = inner_steps`` inner samples: each samples a bit-width ``b_k``
    from the wrapper's ``active_bits`` (or ``bits``), a random location and a
    small random rotation/scale (the batched warp of
    [`AdversarialPatch`][triqdef.attacks.AdversarialPatch]), and backpropagates through the
    shared backbone at ``b_k``. Inner samples that drew the same bit-width run
    as one batched forward. It then pastes ``P`` (untransformed) at random
    locations and returns the images, so it is a patch source:
    ``wrapper.loss(x, y, patch=OnTheFlyPatch(wrapper, patch_size=6))``.

    Bit-widths whose observers have not seen data yet (before BACT calibrates
    them) are skipped; when no sampled bit-width is ready the patch is pasted
    without an update.

    Args:
        model: the [`TriQDefWrapper`][triqdef.TriQDefWrapper] (a plain ``nn.Module`` runs at
            its own precision), or ``None`` to attack the wrapper passed at call
            time (``TriQDefWrapper(net, patch_source=OnTheFlyPatch(None, 6))``).
        patch_size: side or ``(h, w)``; see [`BasePatchAttack`][triqdef.attacks.BasePatchAttack].
        bits: bit-widths to sample from (default: the wrapper's ``active_bits`` at
            each call).
        steps: sign updates per call.
        step_size: ``eta``, the sign-step size.
        inner_steps: ``K``, the inner samples averaged by one update.
        max_rotation: largest jitter rotation in degrees.
        scale_range: ``(low, high)`` jitter scale factors.
        **kwargs: ``targeted``, ``target``, ``mean``, ``std``, ``generator``,
            ``seed``, ``region``, ``init_patch``, ``progress`` (see
            [`BasePatchAttack`][triqdef.attacks.BasePatchAttack]).

    Attributes:
        patch: ``(C, h, w)`` the current patch.
        locations: ``(B, 2)`` corners of the last call's pasted patches.
        last_loss: mean cross-entropy over the last update's inner samples.
        last_bits: the bit-widths of the last update's inner samples (skipped
            ones excluded).

    Shape:
        - x: (B, C, H, W) in [0, 1]; y: (B,)
        - output: (B, C, H, W)

    Example:
        >>> from triqdef import TriQDefWrapper
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(),
        ...                     nn.Linear(4 * 6 * 6, 3))
        >>> w = TriQDefWrapper(net, bits=(32, 4))
        >>> source = OnTheFlyPatch(w, patch_size=3, inner_steps=2, seed=0)
        >>> x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
        >>> loss = w.loss(x, y, patch=source)
        >>> source.patch.shape
        torch.Size([1, 3, 3])
    """

    name = "onthefly"

    def __init__(
        self,
        model: nn.Module | None = None,
        patch_size: int | tuple[int, int] | None = None,
        *,
        bits: Sequence[int] | None = None,
        steps: int = 1,
        step_size: float = 0.03,
        inner_steps: int = 4,
        max_rotation: float = 10.0,
        scale_range: tuple[float, float] = (0.9, 1.1),
        **kwargs: Any,
    ) -> None:
        super().__init__(model, patch_size, steps=steps, step_size=step_size, **kwargs)
        self.bit_choices = self._check_choices(bits)
        self.inner_steps = check_int("inner_steps", inner_steps)
        self.max_rotation, self.scale_range, _ = _check_eot(max_rotation, scale_range, 1)
        self.last_bits: list[int] = []

    def _check_choices(self, bits) -> tuple[int, ...] | None:
        if bits is None:
            return None
        if isinstance(bits, numbers.Integral) and not isinstance(bits, bool):
            bits = (bits,)
        try:
            bits = tuple(bits)
        except TypeError:
            raise ConfigError(f"bits must be a sequence of bit-widths, got {bits!r}") from None
        bad = [b for b in bits if isinstance(b, bool) or not isinstance(b, numbers.Integral)]
        if not bits or bad:
            raise ConfigError(f"bits must be a non-empty sequence of ints, got {bits!r}")
        if self.model is not None:
            known = self.model.bits if _is_wrapper(self.model) else (32,)
            unknown = [b for b in bits if b not in known]
            if unknown:
                raise ConfigError(f"bits {unknown} are not among the model's bits {known}")
        return tuple(int(b) for b in bits)

    def __repr__(self) -> str:
        return (
            f"OnTheFlyPatch(patch_size={self.patch_size}, bits={self.bit_choices}, "
            f"steps={self.steps}, step_size={self.step_size}, inner_steps={self.inner_steps})"
        )

    def _candidates(self, model: nn.Module) -> tuple:
        if not _is_wrapper(model):
            return (None,)
        choices = self.bit_choices if self.bit_choices is not None else model.active_bits
        unknown = [b for b in choices if b not in model.bits]
        if unknown:
            raise ConfigError(f"bits {unknown} are not among the wrapper's bits {model.bits}")
        return tuple(b for b in choices if _ready(model, b))

    def _check_bits_for(self, model: nn.Module):
        if not _is_wrapper(model):
            return None
        return next((b for b in model.bits if _ready(model, b)), False)

    def _update(self, model: nn.Module, x: Tensor, y: Tensor) -> None:
        p = self._current_param()  # `_ensure_patch` ran before every update
        candidates = self._candidates(model)
        self.last_bits = []
        if not candidates:
            return
        picks = torch.floor(self._rand((self.inner_steps,), x.device) * len(candidates))
        counts = collections.Counter(
            candidates[min(int(i), len(candidates) - 1)] for i in picks.tolist()
        )
        grad, total, used = torch.zeros_like(p), torch.zeros((), device=x.device), 0
        for bits, k in sorted(counts.items(), key=lambda kv: -(kv[0] or 0)):
            x_adv, y_rep = eot_batch(self, p, x, y, k, self.max_rotation, self.scale_range)
            try:
                obj = self._objective(self._logits(model, x_adv, bits), y_rep)
            except NotCalibratedError:
                continue
            (g,) = torch.autograd.grad(obj.sum(), p)
            grad += g
            total = total + obj.detach().float().sum()
            used += k
            self.last_bits += [bits if bits is not None else 32] * k
        if used == 0:
            return
        with torch.no_grad():
            p.add_(self.step_size * grad.sign()).clamp_(0, 1)
        self.last_loss = self._loss_value(total / (used * x.shape[0]))

    def _attack(self, model: nn.Module, x: Tensor, y: Tensor, locations: Tensor | None) -> Tensor:
        self._ensure_patch(x)
        for _ in progress_bar(range(self.steps), self.progress, self.steps, "on-the-fly"):
            self._update(model, x, y)
        return self.apply(x, locations)

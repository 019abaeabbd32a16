"""GAP: one universal adversarial patch trained with EOT (Brown et al., 2017)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_device, check_float, check_int, progress_bar, spatial_size
from ..errors import ConfigError, InputError
from .base import BasePatchAttack, UniversalPatchAttack, _frozen_model, _is_wrapper
from .warp import sample_eot, warp_patch

__all__ = ["AdversarialPatch", "eot_batch"]

_OPTIMIZERS = ("adam", "sign")


def _check_eot(max_rotation, scale_range, eot_samples) -> tuple[float, tuple[float, float], int]:
    max_rotation = check_float("max_rotation", max_rotation, strict=False)
    try:
        lo, hi = (float(s) for s in scale_range)
    except (TypeError, ValueError):
        raise ConfigError(f"scale_range must be a (low, high) pair, got {scale_range!r}") from None
    if not 0 < lo <= hi:
        raise ConfigError(f"scale_range must satisfy 0 < low <= high, got {scale_range!r}")
    return max_rotation, (lo, hi), check_int("eot_samples", eot_samples)


def eot_batch(
    attack: BasePatchAttack,
    patch: Tensor,
    x: Tensor,
    y: Tensor,
    eot_samples: int,
    max_rotation: float,
    scale_range: tuple[float, float],
) -> tuple[Tensor, Tensor]:
    """Paste ``eot_samples`` randomly transformed copies of ``patch`` on every image, batched.

    Each of the ``eot_samples * B`` copies gets its own rotation, scale and
    location (drawn from ``attack``'s generator, inside its region) and all are
    produced by one [`warp_patch`][triqdef.attacks.warp_patch] call.

    Args:
        attack: the attack whose generator and region are used.
        patch: ``(C, h, w)``.
        x: images ``(B, C, H, W)``.
        y: labels ``(B,)``.
        eot_samples: transforms per image.
        max_rotation: largest rotation in degrees.
        scale_range: ``(low, high)`` scale factors.

    Returns:
        ``(x_adv, y_rep)``: ``(eot_samples * B, C, H, W)`` patched images and their labels.
    """
    b, _, hh, ww = x.shape
    n = eot_samples * b
    dev = x.device
    centers, angles, scales = sample_eot(
        n,
        (hh, ww),
        spatial_size(patch),
        max_rotation,
        scale_range,
        lambda k: attack._rand((k,), dev),
        attack.region,
    )
    canvas, mask = warp_patch(patch, (hh, ww), centers, angles, scales)
    x_rep = x.repeat(eot_samples, 1, 1, 1)
    return x_rep * (1 - mask) + canvas, y.repeat(eot_samples)


class AdversarialPatch(UniversalPatchAttack):
    """Universal adversarial patch with Expectation over Transformation (GAP, Brown et al. 2017).

    One patch ``(C, h, w)`` is optimised over whole batches: at every step each
    image receives ``eot_samples`` copies of the patch, each with a random
    rotation in ``[-max_rotation, max_rotation]`` degrees, a random scale in
    ``scale_range`` and a random (sub-pixel) location inside the region. The
    copies are produced in one batched ``kornia`` affine warp of the patch and
    its mask (no per-sample loop), and the mean loss over all copies is
    ascended with Adam (``optimizer="adam"``, ``lr=step_size``) or projected
    sign steps (``"sign"``).

    The patch persists: ``attack(x, y)`` continues from the current patch for
    ``steps`` steps on that batch, then pastes it (untransformed) at random
    locations; [`fit`][triqdef.attacks.gap.AdversarialPatch.fit] trains it over many batches;
    [`apply`][triqdef.attacks.base.UniversalPatchAttack.apply] pastes it without training;
    [`reset`][triqdef.attacks.base.UniversalPatchAttack.reset] starts over.

    Args:
        model: ``nn.Module`` or [`TriQDefWrapper`][triqdef.TriQDefWrapper].
        patch_size: side or ``(h, w)``; see [`BasePatchAttack`][triqdef.attacks.BasePatchAttack].
        steps: optimisation steps per call.
        step_size: Adam learning rate or sign-step size.
        optimizer: ``"adam"`` or ``"sign"``.
        eot_samples: random transforms per image per step.
        max_rotation: largest rotation in degrees (0 turns rotation off).
        scale_range: ``(low, high)`` scale factors ((1, 1) turns scaling off).
        **kwargs: ``bits``, ``targeted``, ``target``, ``mean``, ``std``,
            ``generator``, ``seed``, ``region``, ``init_patch``, ``progress``
            (see [`BasePatchAttack`][triqdef.attacks.BasePatchAttack]).

    Attributes:
        patch: the universal patch ``(C, h, w)`` (a detached copy).
        locations: ``(B, 2)`` corners of the last call's pasted patches.
        last_loss: mean cross-entropy over the last step's transformed copies.

    Shape:
        - x: (B, C, H, W) in [0, 1]; y: (B,)
        - output: (B, C, H, W)

    Example:
        >>> from triqdef.attacks import apply_patch
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
        >>> gap = AdversarialPatch(net, patch_size=3, steps=4, eot_samples=2, seed=0)
        >>> x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
        >>> x_adv = gap(x, y)
        >>> gap.patch.shape
        torch.Size([1, 3, 3])
        >>> torch.equal(apply_patch(x, gap.patch, gap.locations), x_adv)
        True
    """

    name = "gap"

    def __init__(
        self,
        model: nn.Module,
        patch_size: int | tuple[int, int] | None = None,
        *,
        steps: int = 100,
        step_size: float = 0.1,
        optimizer: str = "adam",
        eot_samples: int = 1,
        max_rotation: float = 22.5,
        scale_range: tuple[float, float] = (0.9, 1.1),
        **kwargs: Any,
    ) -> None:
        super().__init__(model, patch_size, steps=steps, step_size=step_size, **kwargs)
        if optimizer not in _OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {_OPTIMIZERS}, got {optimizer!r}")
        self.optimizer = optimizer
        self.max_rotation, self.scale_range, self.eot_samples = _check_eot(
            max_rotation, scale_range, eot_samples
        )

    def _step(self, model: nn.Module, x: Tensor, y: Tensor) -> None:
        p = self._current_param()  # `_ensure_patch` ran before every step
        x_adv, y_rep = eot_batch(
            self, p, x, y, self.eot_samples, self.max_rotation, self.scale_range
        )
        obj = self._objective(self._logits(model, x_adv, self._run_bits(model)), y_rep).mean()
        (grad,) = torch.autograd.grad(obj, p)
        with torch.no_grad():
            if self.optimizer == "adam":
                if self._opt is None:
                    self._opt = torch.optim.Adam([p], lr=self.step_size)
                p.grad = -grad  # Adam minimises; the objective is maximised
                self._opt.step()
                p.grad = None
            else:
                p.add_(self.step_size * grad.sign())
            p.clamp_(0, 1)
        self.last_loss = self._loss_value(obj)

    def _attack(self, model: nn.Module, x: Tensor, y: Tensor, locations: Tensor | None) -> Tensor:
        self._ensure_patch(x)
        for _ in progress_bar(range(self.steps), self.progress, self.steps, "GAP"):
            self._step(model, x, y)
        return self.apply(x, locations)

    def fit(
        self,
        data: Iterable,
        epochs: int = 1,
        steps_per_batch: int = 1,
        progress: bool | None = None,
    ) -> AdversarialPatch:
        """Train the universal patch over many batches (continues from the current patch).

        Args:
            data: an iterable of ``(x, y)`` batches (a ``DataLoader``, a list) or
                one ``(x, y)`` pair of tensors; extra items in a batch are ignored,
                and batches are moved to the model's device.
            epochs: passes over ``data``.
            steps_per_batch: optimisation steps on each batch.
            progress: tqdm bar over batches (default: the constructor's ``progress``).

        Returns:
            ``self``, with ``patch`` set.

        Raises:
            InputError: a batch is not a valid ``(x, y)`` pair, or bad counts.
        """
        epochs = check_int("epochs", epochs, error=InputError)
        steps_per_batch = check_int("steps_per_batch", steps_per_batch, error=InputError)
        model = self._resolve_model(None)
        if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
            if data[0].ndim == 4:
                data = [data]
        show = self.progress if progress is None else bool(progress)
        wrap = model if _is_wrapper(model) else None
        seen = False
        param = next(model.parameters(), None)
        with _frozen_model(model, wrap):
            for _ in range(epochs):
                for batch in progress_bar(data, show, None, "GAP fit"):
                    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                        raise InputError(f"fit: each batch must be (x, y, ...), got {type(batch)}")
                    x, y = batch[0], batch[1]
                    for name, t in (("x", x), ("y", y)):
                        if isinstance(t, Tensor):
                            check_device(t, what=f"fit: {name}")  # before moving it
                    if param is not None and isinstance(x, Tensor) and isinstance(y, Tensor):
                        x, y = x.to(param.device), y.to(param.device)  # loaders yield CPU batches
                    x, y = self._check_call(model, x, y, None)
                    self._check_classes(model, x, y)
                    self._ensure_patch(x)
                    for _ in range(steps_per_batch):
                        self._step(model, x, y)
                    seen = True
        if not seen:
            raise InputError("fit: data yielded no batch")
        self.patch = self._current_param().detach().clone()  # made by the first step
        return self

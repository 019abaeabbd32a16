"""LAVAN: localized and visible adversarial noise, one patch per image (Karmon et al., 2018)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_int, progress_bar
from ..patches import _paste_patch
from .base import BasePatchAttack
from .regions import _draw_in_range, region_bounds

__all__ = ["LAVAN"]


class LAVAN(BasePatchAttack):
    """Per-sample localized patches by projected sign-gradient ascent (Karmon et al., 2018).

    Each image gets its own patch ``(C, h, w)`` at its own location. Every step
    moves every patch by ``step_size * sign(grad)`` and clips it to [0, 1];
    all samples run in one batch. With ``restarts > 1`` the attack starts over
    from new random patches and locations and keeps, per sample, the best patch
    seen (highest cross-entropy untargeted, lowest to the target when
    targeted), scored at every step.

    With ``location_search=True`` the location is optimised too (PBAT-style):
    every ``move_every`` steps each sample's patch is tried at a random shift of
    up to ``move_stride`` pixels per axis (kept inside the region) and the move
    is kept only for the samples whose loss improves, using one extra forward
    pass without gradient. Locations given at call time are then the starting
    points; without location search they stay fixed.

    Args:
        model: ``nn.Module`` or [`TriQDefWrapper`][triqdef.TriQDefWrapper].
        patch_size: side or ``(h, w)``; see [`BasePatchAttack`][triqdef.attacks.BasePatchAttack].
        steps: sign-gradient steps per restart.
        step_size: size of each step in pixel units.
        restarts: random restarts (best kept per sample).
        location_search: also search the location by random accepted moves.
        move_every: steps between move proposals.
        move_stride: largest shift of a proposal, in pixels per axis.
        **kwargs: ``bits``, ``targeted``, ``target``, ``mean``, ``std``,
            ``generator``, ``seed``, ``region``, ``init_patch``, ``progress``
            (see [`BasePatchAttack`][triqdef.attacks.BasePatchAttack]).

    Attributes:
        patch: ``(B, C, h, w)`` best patches of the last call.
        locations: ``(B, 2)`` their top-left corners.
        last_loss: mean cross-entropy of the returned images.

    Shape:
        - x: (B, C, H, W) in [0, 1]; y: (B,)
        - output: (B, C, H, W)

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
        >>> attack = LAVAN(net, patch_size=3, steps=5, seed=0)
        >>> x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
        >>> x_adv = attack(x, y)
        >>> attack.patch.shape, attack.locations.shape
        (torch.Size([4, 1, 3, 3]), torch.Size([4, 2]))
        >>> from triqdef.attacks import apply_patch
        >>> torch.equal(apply_patch(x, attack.patch, attack.locations), x_adv)
        True
    """

    name = "lavan"

    def __init__(
        self,
        model: nn.Module,
        patch_size: int | tuple[int, int] | None = None,
        *,
        steps: int = 100,
        step_size: float = 0.05,
        restarts: int = 1,
        location_search: bool = False,
        move_every: int = 10,
        move_stride: int = 2,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, patch_size, steps=steps, step_size=step_size, **kwargs)
        self.restarts = check_int("restarts", restarts)
        self.location_search = bool(location_search)
        self.move_every = check_int("move_every", move_every)
        self.move_stride = check_int("move_stride", move_stride)

    def _attack(self, model: nn.Module, x: Tensor, y: Tensor, locations: Tensor | None) -> Tensor:
        b, c, hh, ww = x.shape
        h, w = self._size_for((hh, ww))
        dev, dtype = x.device, x.dtype
        bits = self._run_bits(model)
        rmin, rmax, cmin, cmax = region_bounds(self.region, (hh, ww), (h, w))
        low = torch.tensor([rmin, cmin], device=dev)
        high = torch.tensor([rmax, cmax], device=dev)

        best_obj = torch.full((b,), -float("inf"), device=dev)
        best_patch = torch.zeros(b, c, h, w, device=dev, dtype=dtype)
        best_loc = torch.zeros(b, 2, device=dev, dtype=torch.long)

        def keep(obj: Tensor, patch: Tensor, loc: Tensor) -> None:
            better = obj > best_obj
            best_obj.copy_(torch.where(better, obj, best_obj))
            best_patch.copy_(torch.where(better.view(b, 1, 1, 1), patch, best_patch))
            best_loc.copy_(torch.where(better.view(b, 1), loc, best_loc))

        def score(patch: Tensor, loc: Tensor) -> Tensor:
            with torch.no_grad():
                logits = self._logits(model, _paste_patch(x, patch, loc), bits)
                return self._objective(logits, y)

        total = self.restarts * self.steps
        bar = progress_bar(range(total), self.progress, total, "LAVAN")
        it = iter(bar)
        for r in range(self.restarts):
            if r == 0 and self.init_patch is not None:
                patch = self.init_patch.to(dev, dtype).expand(b, c, h, w).clone()
            else:
                patch = self._rand((b, c, h, w), dev, dtype)
            if locations is not None:
                loc = locations.clone()
            else:
                loc = _draw_in_range(low, high, self._rand((b, 2), dev, torch.float64))
            for t in range(self.steps):
                next(it, None)
                patch.requires_grad_(True)
                obj = self._objective(self._logits(model, _paste_patch(x, patch, loc), bits), y)
                (grad,) = torch.autograd.grad(obj.sum(), patch)
                patch, obj = patch.detach(), obj.detach()
                keep(obj, patch, loc)
                if self.location_search and (t + 1) % self.move_every == 0:
                    shift = _draw_in_range(
                        torch.tensor(-self.move_stride, device=dev),
                        torch.tensor(self.move_stride, device=dev),
                        self._rand((b, 2), dev, torch.float64),
                    )
                    proposal = (loc + shift).maximum(low).minimum(high)
                    obj_p = score(patch, proposal)
                    keep(obj_p, patch, proposal)
                    loc = torch.where((obj_p > obj).view(b, 1), proposal, loc)
                patch = (patch + self.step_size * grad.sign()).clamp_(0, 1)
            keep(score(patch, loc), patch, loc)
        if hasattr(bar, "close"):
            bar.close()
        self.patch, self.locations = best_patch, best_loc
        self.last_loss = self._loss_value(best_obj)
        return _paste_patch(x, best_patch, best_loc)

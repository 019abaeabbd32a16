"""DPR: shape-deformable patches, one per image (Chen et al., ECCV 2022, "Shape Matters").

The Deformable Patch Representation describes a patch's outline by ``n`` anchor
points in polar form around a centre: anchor ``k`` sits at angle
``theta_k = 2 pi k / n`` and distance ``r_k``, and consecutive anchors are joined
by straight edges, so the outline is a star-shaped polygon. For a pixel at polar
coordinates ``(d, theta)`` with ``theta`` between ``theta_k`` and ``theta_k+1``,
the outline's radius in that direction is where the ray through the pixel meets
the edge between the two anchors,

    rho(theta) = r_k r_k+1 sin(Delta) / (r_k sin(phi) + r_k+1 sin(Delta - phi)),

with ``Delta = 2 pi / n`` and ``phi = theta - theta_k``; the soft mask
``sigmoid((rho(theta) - d) / temperature)`` is differentiable in every radius.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_float, check_int, progress_bar
from ..errors import ConfigError
from ..patches import _check_locations, _paste_patch
from .base import BasePatchAttack
from .gap import _check_eot
from .regions import _draw_in_range, region_bounds
from .warp import warp_patch

__all__ = ["DPR"]


# --- the representation ----------------------------------------------------------------------
class _PolarGrid:
    """Polar coordinates of a box's pixel centres around the box centre.

    Attributes:
        dist: ``(P,)`` distance of each pixel centre to the box centre (``P = h * w``).
        sector: ``(P,)`` index ``k`` of the anchor at or before the pixel's angle.
        phi: ``(P,)`` angle past that anchor, in ``[0, delta]``.
        delta: angle between consecutive anchors, ``2 pi / n``.
    """

    def __init__(
        self, size: tuple[int, int], n_anchors: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        h, w = size
        rows = torch.arange(h, device=device, dtype=dtype) - (h - 1) / 2
        cols = torch.arange(w, device=device, dtype=dtype) - (w - 1) / 2
        dy, dx = torch.meshgrid(rows, cols, indexing="ij")
        self.size, self.n = (h, w), n_anchors
        self.delta = 2 * math.pi / n_anchors
        self.dist = torch.hypot(dx, dy).flatten()
        theta = torch.atan2(dy, dx).flatten().remainder(2 * math.pi)
        self.sector = torch.floor(theta / self.delta).long().clamp_(0, n_anchors - 1)
        self.phi = (theta - self.sector.to(dtype) * self.delta).clamp(0, self.delta)

    def contour(self, radii: Tensor) -> Tensor:
        """``(B, P)`` radius of the outline in the direction of each pixel.

        Args:
            radii: ``(B, n)`` anchor radii, all positive.
        """
        r0 = radii[:, self.sector]
        r1 = radii[:, (self.sector + 1) % self.n]
        phi = self.phi.to(radii.dtype)
        return (
            r0
            * r1
            * math.sin(self.delta)
            / (r0 * torch.sin(phi) + r1 * torch.sin(self.delta - phi))
        )

    def soft_mask(self, radii: Tensor, temperature: float) -> Tensor:
        """``(B, P)`` soft mask ``sigmoid((rho - d) / temperature)``, differentiable in radii."""
        dist = self.dist.to(radii.dtype)
        return torch.sigmoid((self.contour(radii) - dist) / temperature)

    def fit(self, radii: Tensor, budget: int) -> tuple[Tensor, Tensor]:
        """Scale the outline to hold exactly ``budget`` pixels (all of them if fewer).

        Pixels are ranked by ``d / rho`` (how deep inside the outline they lie, a
        ranking that scaling the radii does not change); the ``budget`` first
        (ties broken by pixel index) form the mask, and the radii are scaled so
        that the outline passes halfway between the last pixel in and the first
        pixel out.

        Args:
            radii: ``(B, n)`` positive anchor radii.
            budget: the number of pixels of the mask, at least 1.

        Returns:
            ``(radii, mask)``: the scaled ``(B, n)`` radii and the ``(B, P)`` binary
            mask (dtype of ``radii``) with ``min(budget, P)`` ones per row.
        """
        depth = self.dist.to(radii.dtype) / self.contour(radii)  # (B, P)
        order = torch.argsort(depth, dim=1, stable=True)
        ranked = depth.gather(1, order)
        p = depth.shape[1]
        k = min(budget, p)
        if k < p:
            scale = (ranked[:, k - 1] + ranked[:, k]) / 2
        else:  # every pixel is in: put the outline past the farthest one
            scale = ranked[:, -1] + 1
        mask = torch.zeros_like(depth).scatter_(1, order[:, :k], 1.0)
        return radii * scale.clamp_min(1e-6).unsqueeze(1), mask


# --- the attack --------------------------------------------------------------------------------
class DPR(BasePatchAttack):
    """Per-sample shape-deformable patches, shape and texture optimised jointly (Chen et al., 2022).

    Each image gets its own patch: a texture over a square-ish *box* larger than
    ``patch_size`` and, inside it, an outline given by ``n_anchors`` anchor radii
    around the box centre (the Deformable Patch Representation; see the module
    docstring for the rasterisation). The area budget is the area of a
    ``patch_size`` patch, ``h * w`` pixels, and it is enforced exactly: the mask
    applied to the image is always the ``h * w`` pixels lying deepest inside the
    outline (all of the box if it is smaller), and after every step the radii are
    rescaled so that the outline encloses exactly those pixels. The shape can
    therefore stretch, thin out or bend within the box but never covers more
    pixels than a square patch of the same budget, which makes its attack success
    rate directly comparable with [`LAVAN`][triqdef.attacks.LAVAN]'s at the same
    ``patch_size``.

    Every step pastes the texture through the binary mask (what the image will
    get), takes the gradient of the loss with respect to the texture and, through
    the soft mask ``sigmoid((rho - d) / temperature)`` (a straight-through
    estimator: the forward value is the binary mask), with respect to the radii;
    the texture moves by ``step_size * sign(grad)`` and is clipped to [0, 1], the
    radii move by ``shape_step_size`` pixels times their gradient divided by its
    largest magnitude in that image (each kept below the box's half-diagonal plus a pixel and
    at least 5% of the image's largest radius), then are rescaled to the budget. All samples
    run in one batch. The best texture, mask and location seen per sample (highest
    cross-entropy untargeted, lowest to the target when targeted) are kept, over
    all steps and ``restarts``; the first restart starts from a circle, later ones
    from randomly perturbed radii.

    With ``eot=n`` every step scores ``n`` randomly rotated (within
    ``max_rotation`` degrees) and scaled (within ``scale_range``) copies of the
    masked patch per image, placed about the box centre with
    [`warp_patch`][triqdef.attacks.warp_patch], and ascends their mean loss (the
    best patch is then the one with the best mean); the returned images carry the
    untransformed patch.

    Args:
        model: ``nn.Module`` or [`TriQDefWrapper`][triqdef.TriQDefWrapper].
        patch_size: side or ``(h, w)`` of the square patch whose area, ``h * w``
            pixels, is the budget; see [`BasePatchAttack`][triqdef.attacks.BasePatchAttack].
        steps: optimisation steps per restart.
        step_size: texture step in pixel units (sign-gradient ascent).
        n_anchors: anchor points of the outline (at least 3).
        box_scale: the box is ``round(box_scale * h) x round(box_scale * w)``
            pixels, at most the image; 1 makes the box the square itself (no room
            to deform).
        shape_step_size: largest radius move of a step, in pixels (0 keeps the
            initial circle).
        temperature: width in pixels of the soft mask's edge, which decides how far
            from the outline the shape gradient reaches.
        restarts: random restarts (best kept per sample).
        eot: ``False`` (off) or the number of random transforms per image per step.
        max_rotation: largest EOT rotation in degrees.
        scale_range: ``(low, high)`` EOT scale factors.
        **kwargs: ``bits``, ``targeted``, ``target``, ``mean``, ``std``,
            ``generator``, ``seed``, ``region``, ``progress`` (see
            [`BasePatchAttack`][triqdef.attacks.BasePatchAttack]).

    Attributes:
        patch: ``(B, C, bh, bw)`` best textures of the last call, over the box.
        mask: ``(B, 1, bh, bw)`` their binary masks (dtype of the images), each with
            ``min(h * w, bh * bw)`` ones; ``apply_patch(x, attack.patch,
            attack.locations, mask=attack.mask)`` gives the returned images.
        radii: ``(B, n_anchors)`` the outlines' anchor radii in pixels.
        locations: ``(B, 2)`` top-left corners of the boxes.
        last_loss: mean cross-entropy of the returned images.

    Raises:
        ConfigError: an invalid argument, or ``init_patch`` (the texture covers the
            box, not the ``patch_size`` square, so there is no square to start from).

    Shape:
        - x: (B, C, H, W) in [0, 1]; y: (B,)
        - output: (B, C, H, W)

    Example:
        >>> from triqdef.attacks import apply_patch
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(144, 3))
        >>> attack = DPR(net, patch_size=3, steps=5, n_anchors=8, seed=0)
        >>> x, y = torch.rand(4, 1, 12, 12), torch.tensor([0, 1, 2, 0])
        >>> x_adv = attack(x, y)
        >>> attack.patch.shape, attack.mask.shape, attack.locations.shape
        (torch.Size([4, 1, 6, 6]), torch.Size([4, 1, 6, 6]), torch.Size([4, 2]))
        >>> attack.mask.sum(dim=(1, 2, 3)).tolist()  # the budget: 3 x 3 pixels each
        [9.0, 9.0, 9.0, 9.0]
        >>> torch.equal(apply_patch(x, attack.patch, attack.locations, mask=attack.mask), x_adv)
        True
    """

    name = "dpr"

    def __init__(
        self,
        model: nn.Module,
        patch_size: int | tuple[int, int] | None = None,
        *,
        steps: int = 100,
        step_size: float = 0.05,
        n_anchors: int = 12,
        box_scale: float = 2.0,
        shape_step_size: float = 0.25,
        temperature: float = 0.5,
        restarts: int = 1,
        eot: int | bool = False,
        max_rotation: float = 22.5,
        scale_range: tuple[float, float] = (0.9, 1.1),
        **kwargs: Any,
    ) -> None:
        if kwargs.get("init_patch") is not None:
            raise ConfigError(
                "DPR takes no init_patch: its texture covers the box around the deformable "
                "shape, not the patch_size square; leave init_patch out"
            )
        super().__init__(model, patch_size, steps=steps, step_size=step_size, **kwargs)
        self.n_anchors = check_int("n_anchors", n_anchors, low=3)
        self.box_scale = check_float("box_scale", box_scale, low=1.0, strict=False)
        self.shape_step_size = check_float("shape_step_size", shape_step_size, strict=False)
        self.temperature = check_float("temperature", temperature)
        self.restarts = check_int("restarts", restarts)
        if eot is True:
            raise ConfigError(
                "eot takes the number of random transforms per image per step (e.g. eot=4), "
                "or False to turn EOT off; got True"
            )
        self.eot = 0 if eot is False else check_int("eot", eot)
        self.max_rotation, self.scale_range, _ = _check_eot(max_rotation, scale_range, 1)
        self.mask: Tensor | None = None
        self.radii: Tensor | None = None

    def __repr__(self) -> str:
        eot = f", eot={self.eot}" if self.eot else ""
        return (
            f"{super().__repr__()[:-1]}, n_anchors={self.n_anchors}, "
            f"box_scale={self.box_scale}{eot})"
        )

    def _box_for(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """``(bh, bw)`` of the box on images of ``image_size``."""
        (hh, ww), (h, w) = image_size, self._size_for(image_size)
        return (
            min(hh, max(h, round(self.box_scale * h))),
            min(ww, max(w, round(self.box_scale * w))),
        )

    def _check_call(self, model: nn.Module, x, y, locations) -> tuple[Tensor, Tensor]:
        x, y = super()._check_call(model, x, y, None)
        if locations is not None:  # the corners are the box's, which is larger than the square
            _check_locations(locations, x, self._box_for((x.shape[-2], x.shape[-1])))
        return x, y

    # --- one step's images ---------------------------------------------------------------
    def _masks(self, grid: _PolarGrid, radii: Tensor, budget: int) -> tuple[Tensor, Tensor]:
        """``(radii, mask)``: radii fitted to the budget and the straight-through mask.

        The mask ``(B, 1, bh, bw)`` has the binary mask's values and the soft mask's
        gradient with respect to the returned radii (a leaf requiring grad).
        """
        radii, hard = grid.fit(radii.detach(), budget)
        radii.requires_grad_(True)
        soft = grid.soft_mask(radii, self.temperature)
        mask = hard + (soft - soft.detach())  # value: exactly hard
        return radii, mask.view(-1, 1, *grid.size)

    def _patched(self, x: Tensor, texture: Tensor, mask: Tensor, loc: Tensor, n_eot: int) -> Tensor:
        """Patched images: ``(B, ...)`` pasted, or ``(n_eot * B, ...)`` EOT copies."""
        mask = mask.to(x.dtype)
        if not n_eot:
            return _paste_patch(x, texture, loc, mask)
        b, c, hh, ww = x.shape
        bh, bw = texture.shape[-2:]
        n, dev = n_eot * b, x.device
        lo, hi = self.scale_range
        angles = (self._rand((n,), dev) * 2 - 1) * self.max_rotation
        scales = lo + self._rand((n,), dev) * (hi - lo)
        half = torch.tensor([(bw - 1) / 2, (bh - 1) / 2], device=dev)
        centers = (loc.flip(1).float() + half).repeat(n_eot, 1)  # (x, y) of each box centre
        stacked = torch.cat([texture * mask, mask], dim=1).repeat(n_eot, 1, 1, 1)
        canvas, _ = warp_patch(stacked, (hh, ww), centers, angles, scales)
        warped, m = canvas[:, :c], canvas[:, c:]
        return x.repeat(n_eot, 1, 1, 1) * (1 - m) + warped

    def _attack(self, model: nn.Module, x: Tensor, y: Tensor, locations: Tensor | None) -> Tensor:
        b, c, hh, ww = x.shape
        h, w = self._size_for((hh, ww))
        bh, bw = self._box_for((hh, ww))
        budget = h * w
        dev, dtype = x.device, x.dtype
        rdtype = torch.float64 if dtype == torch.float64 else torch.float32
        grid = _PolarGrid((bh, bw), self.n_anchors, dev, rdtype)
        r_max = math.hypot(bh, bw) / 2 + 1
        bits = self._run_bits(model)
        rmin, rmax, cmin, cmax = region_bounds(self.region, (hh, ww), (bh, bw))
        low = torch.tensor([rmin, cmin], device=dev)
        high = torch.tensor([rmax, cmax], device=dev)
        y_eot = y.repeat(self.eot) if self.eot else y

        best_obj = torch.full((b,), -float("inf"), device=dev)
        best_patch = torch.zeros(b, c, bh, bw, device=dev, dtype=dtype)
        best_mask = torch.zeros(b, 1, bh, bw, device=dev, dtype=dtype)
        best_radii = torch.zeros(b, self.n_anchors, device=dev, dtype=rdtype)
        best_loc = torch.zeros(b, 2, device=dev, dtype=torch.long)

        def keep(obj: Tensor, texture: Tensor, mask: Tensor, radii: Tensor, loc: Tensor) -> None:
            better = obj > best_obj
            best_obj.copy_(torch.where(better, obj, best_obj))
            best_patch.copy_(torch.where(better.view(b, 1, 1, 1), texture, best_patch))
            best_mask.copy_(torch.where(better.view(b, 1, 1, 1), mask.detach(), best_mask))
            best_radii.copy_(torch.where(better.view(b, 1), radii.detach(), best_radii))
            best_loc.copy_(torch.where(better.view(b, 1), loc, best_loc))

        def objective(texture: Tensor, mask: Tensor, loc: Tensor) -> Tensor:
            x_adv = self._patched(x, texture, mask, loc, self.eot)
            obj = self._objective(self._logits(model, x_adv, bits), y_eot)
            return obj.view(-1, b).mean(0) if self.eot else obj

        total = self.restarts * self.steps
        bar = progress_bar(range(total), self.progress, total, "DPR")
        it = iter(bar)
        for r in range(self.restarts):
            texture = self._rand((b, c, bh, bw), dev, dtype)
            if locations is not None:
                loc = locations.clone()
            else:
                loc = _draw_in_range(low, high, self._rand((b, 2), dev, torch.float64))
            radii = torch.ones(b, self.n_anchors, device=dev, dtype=rdtype)
            if r > 0:
                radii = radii + 0.5 * (self._rand(radii.shape, dev, rdtype) - 0.5)
            for _ in range(self.steps):
                next(it, None)
                radii, mask = self._masks(grid, radii, budget)
                texture.requires_grad_(True)
                obj = objective(texture, mask, loc)
                g_texture, g_radii = torch.autograd.grad(obj.sum(), (texture, radii))
                texture, radii, obj = texture.detach(), radii.detach(), obj.detach()
                keep(obj, texture, mask, radii, loc)
                texture = (texture + self.step_size * g_texture.sign()).clamp_(0, 1)
                largest = g_radii.abs().amax(1, keepdim=True).clamp_min(1e-12)
                radii = (radii + self.shape_step_size * g_radii / largest).clamp(max=r_max)
                radii = torch.maximum(radii, 0.05 * radii.amax(1, keepdim=True))
            radii, mask = self._masks(grid, radii, budget)
            with torch.no_grad():
                keep(objective(texture, mask, loc), texture, mask, radii, loc)
        if hasattr(bar, "close"):
            bar.close()
        self.patch, self.mask, self.radii, self.locations = (
            best_patch,
            best_mask,
            best_radii,
            best_loc,
        )
        x_adv = _paste_patch(x, best_patch, best_loc, best_mask)
        if self.eot:  # the kept objective was the EOT mean: score the returned images
            with torch.no_grad():
                best_obj = self._objective(self._logits(model, x_adv, bits), y)
        self.last_loss = self._loss_value(best_obj)
        return x_adv

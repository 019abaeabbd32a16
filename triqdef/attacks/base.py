"""The attack base classes: checks, normalisation, randomness and model state of every attack.

An attack is built on a model (any ``nn.Module`` or a
[`TriQDefWrapper`][triqdef.TriQDefWrapper]) and called torchattacks-style,
``x_adv = attack(x, y)``; ``attack(x, y, wrapper)`` also works, so every attack
is a [`PatchSource`][triqdef.attacks.PatchSource] for ``wrapper.loss(x, y, patch=attack)``.

The attack never changes the model: it runs every module in eval mode (BatchNorm
statistics and triqdef observers are only read), restores each module's
train/eval flag and the wrapper's bit-width afterwards, and takes gradients
with ``torch.autograd.grad`` with respect to the patch only, so no ``.grad`` is
left on any parameter.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator, Sequence
from typing import TypeGuard, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import (
    check_channel_stats,
    check_float,
    check_images,
    check_int,
    check_labels,
    check_patch_tensor,
    check_size2,
    model_dtype,
    spatial_size,
)
from ..errors import ConfigError, InputError
from ..patches import _check_locations, _paste_patch
from ..wrapper import TriQDefWrapper
from .regions import RegionLike, _corners_in_region, _seeded_generator, resolve_region

__all__ = ["BasePatchAttack", "UniversalPatchAttack"]


def _is_wrapper(model: object) -> TypeGuard[TriQDefWrapper]:
    return isinstance(model, TriQDefWrapper)


# --- model state -----------------------------------------------------------------------------
@contextlib.contextmanager
def _frozen_model(model: nn.Module, wrapper: TriQDefWrapper | None = None) -> Iterator[None]:
    """Eval mode and gradients on inside the block; every module's mode and the bit-width after.

    The flags are restored one module at a time, so a model with some modules
    deliberately in eval mode (frozen BatchNorm) comes back exactly as it was.
    """
    modes = [(m, m.training) for m in model.modules()]
    previous = wrapper.current_bits if wrapper is not None else None
    model.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        for m, flag in modes:
            m.training = flag
        if wrapper is not None and previous is not None:  # both or neither
            wrapper.set_bits(previous)


# --- the base class --------------------------------------------------------------------------
class BasePatchAttack:
    """Base class of the patch attacks: validation, normalisation, RNG, model state.

    Subclasses implement ``_attack``. Calling an attack checks its inputs
    (raising [`InputError`][triqdef.errors.InputError] before anything runs), puts the
    model in eval mode, runs the attack and restores every module's mode and the
    wrapper's bit-width.

    Args:
        model: any ``nn.Module`` returning ``(B, K)`` logits, or a
            [`TriQDefWrapper`][triqdef.TriQDefWrapper].
        patch_size: side (int) or ``(h, w)``. ``None``: the side of ``init_patch``
            when given, else ``round(0.1875 * min(H, W))`` of the images (6 on
            32x32, like [`RandomPatch`][triqdef.attacks.RandomPatch]).
        bits: bit-width the attack runs at when ``model`` is a wrapper (default:
            the wrapper's current bit-width at call time); must be ``None`` or 32
            for a plain model.
        steps: optimisation steps per call.
        step_size: step of the sign-gradient update (learning rate for Adam).
        targeted: minimise the cross-entropy to ``target`` instead of maximising
            the cross-entropy to the true labels.
        target: the target class (an int), required when ``targeted``.
        mean: per-channel means; with ``std``, the model sees ``(x - mean) / std``.
        std: per-channel standard deviations (> 0).
        generator: random generator for locations, initialisations and EOT draws.
        seed: seed of a generator created on the input's device at the first call
            (and again by [`reseed`][triqdef.attacks.base.BasePatchAttack.reseed]); exclusive
            with ``generator``.
        region: where patches go: ``None``/``"any"``, a name of
            [`REGIONS`][triqdef.attacks.REGIONS] or ``(top, left, bottom, right)``
            fractions of the image.
        init_patch: starting patch ``(C, h, w)`` with values in [0, 1].
        progress: show a tqdm bar over the optimisation steps.

    Attributes:
        patch: the crafted patch(es) after a call: ``(C, h, w)`` for universal
            attacks, ``(B, C, h, w)`` for per-sample ones.
        locations: ``(B, 2)`` int64 top-left ``(row, col)`` of the last call's
            patches; ``apply_patch(x, attack.patch, attack.locations)`` gives the
            returned images exactly.
        last_loss: cross-entropy (to the labels, or to the target when targeted)
            of the last call's final patches, or ``None`` before a call.

    Raises:
        ConfigError: an invalid constructor argument.
    """

    name = "patch"
    """Short name recorded in patch metadata."""

    def __init__(
        self,
        model: nn.Module | None,
        patch_size: int | tuple[int, int] | None = None,
        *,
        bits: int | None = None,
        steps: int = 100,
        step_size: float = 0.05,
        targeted: bool = False,
        target: int | None = None,
        mean: Sequence[float] | Tensor | None = None,
        std: Sequence[float] | Tensor | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        region: RegionLike = None,
        init_patch: Tensor | None = None,
        progress: bool = False,
    ) -> None:
        if model is not None and not isinstance(model, nn.Module):
            raise ConfigError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.patch_size = None if patch_size is None else check_size2(patch_size)
        if init_patch is not None:
            init_patch = check_patch_tensor(init_patch, "init_patch")
            if self.patch_size is None:
                self.patch_size = spatial_size(init_patch)
            elif spatial_size(init_patch) != self.patch_size:
                raise InputError(
                    f"init_patch is {tuple(init_patch.shape[-2:])} but patch_size is "
                    f"{self.patch_size}"
                )
        self.init_patch = init_patch
        self.bits = self._check_bits(bits)
        self.steps = check_int("steps", steps, low=0 if self._zero_steps_ok else 1)
        self.step_size = check_float("step_size", step_size)
        if not isinstance(targeted, bool):
            raise ConfigError(f"targeted must be a bool, got {targeted!r}")
        self.targeted = targeted
        self.target: int | None
        if targeted:
            if target is None:
                raise ConfigError("targeted=True needs target=<class index>")
            self.target = check_int("target", target, low=0)
        elif target is not None:
            raise ConfigError("target is given but targeted=False; pass targeted=True")
        else:
            self.target = None
        self.mean = check_channel_stats("mean", mean)
        self.std = check_channel_stats("std", std, positive=True)
        if (self.mean is None) != (self.std is None):
            self.mean = torch.zeros(1) if self.mean is None else self.mean
            self.std = torch.ones(1) if self.std is None else self.std
        if generator is not None and seed is not None:
            raise ConfigError("give generator= or seed=, not both")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ConfigError(f"generator must be a torch.Generator, got {generator!r}")
        if seed is not None:
            seed = check_int("seed", seed, low=0)
        self.generator, self.seed = generator, seed
        self._generators: dict[str, torch.Generator] = {}
        self.region_name, self.region = resolve_region(region)
        if not isinstance(progress, bool):
            raise ConfigError(f"progress must be a bool, got {progress!r}")
        self.progress = progress
        self.patch: Tensor | None = None
        self.locations: Tensor | None = None
        self.last_loss = None
        self._classes: dict[int, int] = {}

    _zero_steps_ok = False
    _last_loss: Tensor | float | None

    def _target_class(self) -> int:
        """The target class of a targeted attack (the constructor requires one)."""
        return cast(int, self.target)

    def _check_bits(self, bits) -> int | None:
        if bits is None:
            return None
        if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
            raise ConfigError(f"bits must be an int or None, got {bits!r}")
        if self.model is not None and _is_wrapper(self.model):
            if bits not in self.model.bits:
                raise ConfigError(
                    f"bit-width {bits} is not one of the wrapper's bits {self.model.bits}"
                )
        elif bits != 32:
            raise ConfigError(
                f"bits={bits} needs a TriQDefWrapper; a plain model only runs at 32 bits"
            )
        return int(bits)

    def __repr__(self) -> str:
        size = self.patch_size
        tgt = f", targeted=True, target={self.target}" if self.targeted else ""
        return (
            f"{type(self).__name__}(patch_size={size}, bits={self.bits}, steps={self.steps}, "
            f"step_size={self.step_size}{tgt}, region={self.region_name or self.region})"
        )

    # --- randomness -------------------------------------------------------------------
    def reseed(self, seed: int | None = None) -> None:
        """Start the random stream over (from ``seed``, or the constructor's ``seed``)."""
        if seed is not None:
            self.seed = check_int("seed", seed, low=0, error=InputError)
            self.generator = None
        self._generators.clear()

    def _gen(self, device: torch.device) -> torch.Generator | None:
        return _seeded_generator(self, device)

    def _rand(self, shape, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
        g = self._gen(device)
        where = g.device if g is not None else device
        return torch.rand(shape, generator=g, device=where, dtype=dtype).to(device)

    def _random_locations(
        self, n: int, image_size: tuple[int, int], patch_size: tuple[int, int], device
    ) -> Tensor:
        u = self._rand((n, 2), device, torch.float64)
        return _corners_in_region(self.region, image_size, patch_size, u)

    # --- the model --------------------------------------------------------------------
    def _resolve_model(self, wrapper) -> nn.Module:
        if self.model is None:
            if wrapper is None or not isinstance(wrapper, nn.Module):
                raise InputError(
                    f"{type(self).__name__} was built without a model; call it as "
                    "attack(x, y, wrapper) or build it on a model"
                )
            return wrapper
        return self.model

    def _logits(self, model: nn.Module, x: Tensor, bits: int | None = None) -> Tensor:
        """Run ``model`` on pixel-space images ``x`` (normalised here) at ``bits``."""
        if self.mean is not None and self.std is not None:  # both or neither
            c = x.shape[1]
            mean = self.mean.to(x.device, x.dtype)
            std = self.std.to(x.device, x.dtype)
            if mean.numel() not in (1, c) or std.numel() not in (1, c):
                raise InputError(
                    f"mean/std have {mean.numel()}/{std.numel()} values but the images have "
                    f"{c} channels"
                )
            x = (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
        if bits is not None and _is_wrapper(model):
            with model.at_bits(bits):
                out = model(x)
        else:
            out = model(x)
        if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != x.shape[0]:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise InputError(f"the model must return (B, K) logits, got {got}")
        return out

    def _objective(self, logits: Tensor, y: Tensor) -> Tensor:
        """Per-sample quantity to maximise: CE to ``y``, or minus CE to the target."""
        if self.targeted:
            target = torch.full_like(y, self._target_class())
            return -F.cross_entropy(logits.float(), target, reduction="none")
        return F.cross_entropy(logits.float(), y, reduction="none")

    def _loss_value(self, objective: Tensor) -> Tensor:
        """The reported cross-entropy of an objective tensor (kept on device until read)."""
        value = objective.detach().float().mean()
        return -value if self.targeted else value

    @property
    def last_loss(self) -> float | None:
        """Cross-entropy of the last call's final patches (``None`` before a call).

        Kept as a device tensor until read, so the attack loop never waits for
        the device just to record it.
        """
        value = self._last_loss
        if isinstance(value, Tensor):
            value = self._last_loss = float(value)
        return value

    @last_loss.setter
    def last_loss(self, value) -> None:
        self._last_loss = value

    def _run_bits(self, model: nn.Module) -> int | None:
        if not _is_wrapper(model):
            return None
        return self.bits if self.bits is not None else model.current_bits

    def _check_bits_for(self, model: nn.Module):
        """Bit-width of the class-count forward (``False``: none can run)."""
        return self._run_bits(model)

    def _check_classes(self, model: nn.Module, x: Tensor, y: Tensor) -> None:
        """Check labels and target against the model's class count (one tiny forward)."""
        key = id(model)
        if key not in self._classes:
            bits = self._check_bits_for(model)
            if bits is False:  # no bit-width can run yet: nothing to check against
                return
            with torch.no_grad():
                self._classes[key] = self._logits(model, x[:1], bits).shape[1]
        self._check_labels(self._classes[key], y)

    def _check_labels(self, k: int, y: Tensor) -> None:
        """Check the target and the labels ``y`` against ``k`` classes."""
        if self.targeted and not 0 <= self._target_class() < k:
            raise InputError(
                f"target class {self.target} is out of range: the model has {k} classes "
                f"(0..{k - 1})"
            )
        lo, hi = torch.aminmax(y)
        if int(lo) < 0 or int(hi) >= k:
            raise InputError(
                f"labels must be in [0, {k}) (the model has {k} classes), "
                f"got [{int(lo)}, {int(hi)}]"
            )

    # --- the call ---------------------------------------------------------------------
    def _size_for(self, image_size: tuple[int, int]) -> tuple[int, int]:
        if self.patch_size is not None:
            return self.patch_size
        side = max(1, round(0.1875 * min(image_size)))
        return side, side

    def _check_call(self, model: nn.Module, x, y, locations) -> tuple[Tensor, Tensor]:
        param = next(model.parameters(), None)
        check_images(x, device=None if param is None else param.device, dtype=model_dtype(model))
        y = check_labels(y, x)
        hh, ww = x.shape[-2:]
        h, w = self._size_for((hh, ww))
        if h > hh or w > ww:
            raise InputError(
                f"{type(self).__name__}: patch {(h, w)} is larger than the images {(hh, ww)}"
            )
        if self.init_patch is not None and self.init_patch.shape[0] != x.shape[1]:
            raise InputError(
                f"init_patch has {self.init_patch.shape[0]} channels, the images {x.shape[1]}"
            )
        if locations is not None:
            _check_locations(locations, x, (h, w))
        if x.is_inference():
            x = x.clone()
        return x.detach(), y

    def __call__(
        self,
        x: Tensor,
        y: Tensor,
        wrapper: nn.Module | None = None,
        *,
        locations: Tensor | None = None,
    ) -> Tensor:
        """Craft patches for ``x`` and return the patched images.

        Args:
            x: images ``(B, C, H, W)`` with values in [0, 1].
            y: true labels ``(B,)`` (integer).
            wrapper: ignored (it makes the attack a patch source for
                ``wrapper.loss(x, y, patch=attack)``), unless the attack was
                built with ``model=None``.
            locations: optional ``(B, 2)`` top-left corners to use instead of
                random ones.

        Returns:
            Patched images, shape and dtype of ``x``, detached, in [0, 1].

        Raises:
            InputError: bad images, labels, locations, target or patch size.
        """
        model = self._resolve_model(wrapper)
        x, y = self._check_call(model, x, y, locations)
        if locations is not None:
            locations = locations.to(x.device, torch.long)
        wrap = model if _is_wrapper(model) else None
        with _frozen_model(model, wrap):
            self._check_classes(model, x, y)
            x_adv = self._attack(model, x, y, locations)
        return x_adv.detach()

    def _attack(self, model: nn.Module, x: Tensor, y: Tensor, locations: Tensor | None) -> Tensor:
        raise NotImplementedError


class UniversalPatchAttack(BasePatchAttack):
    """A patch attack whose single patch ``(C, h, w)`` persists across calls.

    Each call continues from the current patch;
    [`apply`][triqdef.attacks.base.UniversalPatchAttack.apply] pastes it without optimising and
    [`reset`][triqdef.attacks.base.UniversalPatchAttack.reset] starts over. Subclasses implement
    the update.
    """

    _zero_steps_ok = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._param: Tensor | None = None
        self._opt: torch.optim.Optimizer | None = None

    def _current_param(self) -> Tensor:
        """The patch being optimised, once `_ensure_patch` has made it."""
        return cast(Tensor, self._param)

    def reset(self) -> None:
        """Forget the patch and any optimizer state; restart the seeded random stream."""
        self._param, self._opt, self.patch = None, None, None
        self.locations, self.last_loss = None, None
        self.reseed()

    def _ensure_patch(self, x: Tensor) -> Tensor:
        """The persistent patch (a leaf requiring grad) on ``x``'s device and dtype."""
        c, (h, w) = x.shape[1], self._size_for(spatial_size(x))
        p = self._param
        if p is not None and p.shape != (c, h, w):
            raise InputError(
                f"the current patch is {tuple(p.shape)} but these images need {(c, h, w)}; "
                "call reset() to start a new patch"
            )
        if p is None:
            if self.init_patch is not None:
                p = self.init_patch.to(x.device, x.dtype).clone()
            else:
                p = self._rand((c, h, w), x.device, x.dtype)
        elif p.device != x.device or p.dtype != x.dtype:
            p = p.detach().to(x.device, x.dtype)
        if p is not self._param:
            self._param = p.requires_grad_(True)
            self._opt = None
        return self._param

    def apply(self, x: Tensor, locations: Tensor | None = None) -> Tensor:
        """Paste the current patch (untransformed) on ``x`` without optimising.

        Args:
            x: images ``(B, C, H, W)`` in [0, 1].
            locations: ``(B, 2)`` corners; random inside the region when ``None``.

        Returns:
            Patched images ``(B, C, H, W)``; the corners are kept in ``locations``
            and the patch in ``patch``.

        Raises:
            InputError: no patch yet (call the attack first), or bad ``x`` / ``locations``.
        """
        if self._param is None:
            raise InputError(f"{type(self).__name__} has no patch yet: call the attack first")
        check_images(x)
        p = self._param.detach().to(x.device, x.dtype)
        if p.shape[0] != x.shape[1]:
            raise InputError(f"the patch has {p.shape[0]} channels, the images {x.shape[1]}")
        if p.shape[1] > x.shape[2] or p.shape[2] > x.shape[3]:
            raise InputError(
                f"the patch {tuple(p.shape[1:])} is larger than the images {tuple(x.shape[2:])}"
            )
        if locations is None:
            locations = self._random_locations(
                x.shape[0], spatial_size(x), spatial_size(p), x.device
            )
        else:
            locations = _check_locations(locations, x, spatial_size(p))
        self.patch = p.clone()
        self.locations = locations.to(x.device, torch.long)
        return _paste_patch(x.detach(), self.patch, self.locations)

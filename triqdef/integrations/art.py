"""Adversarial Robustness Toolbox (ART) interop:
[`as_classifier`][triqdef.integrations.art.as_classifier] and
[`patch_source`][triqdef.integrations.art.patch_source].

Needs the ``[art]`` extra (``pip install 'triqdef[art]'``); importing this module
without ART raises [`ConfigError`][triqdef.errors.ConfigError] (also an
``ImportError``) naming it. The core never imports ART.

```python
from art.attacks.evasion import AdversarialPatchPyTorch, FastGradientMethod
from triqdef.integrations.art import as_classifier, patch_source

classifier = as_classifier(wrapper, 4, input_shape=(1, 28, 28))  # the 4-bit model
x_adv = FastGradientMethod(classifier, eps=0.1).generate(x_np)  # any ART evasion attack

attack = AdversarialPatchPyTorch(classifier, patch_shape=(1, 6, 6), max_iter=5,
                                 targeted=False, verbose=False)
loss = wrapper.loss(x, y, patch=patch_source(attack, refresh_every=10, seed=0))
```
"""

from __future__ import annotations

import importlib
import numbers
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_int, check_labels, check_size2, logits_of, model_dtype
from ..errors import ConfigError, InputError, NotCalibratedError, TriQDefError
from ..patches import apply_patch, random_locations
from ..wrapper import TriQDefWrapper

__all__ = ["ARTPatchSource", "as_classifier", "patch_source"]


class _ARTMissing(ConfigError, ImportError):
    """ART is not installed: a [`ConfigError`][triqdef.errors.ConfigError] that is also an
    ``ImportError``, so ``except ImportError`` and ``pytest.importorskip`` keep working."""


try:  # an optional dependency: the [art] extra
    _classification = importlib.import_module("art.estimators.classification")
except ImportError as exc:
    raise _ARTMissing(
        "triqdef.integrations.art needs the Adversarial Robustness Toolbox: "
        f"pip install 'triqdef[art]' (importing it failed: {exc})"
    ) from None


# --- as_classifier -----------------------------------------------------------------------------
class _AtBits(nn.Module):
    """The model ART's classifier runs: ``wrapper`` at ``bits``, in the mode ART sets.

    The wrapper is held, not registered as a submodule, so ART's ``.to(device)``,
    ``.train(mode)`` and ``.zero_grad()`` on its model never reach it. Each forward runs
    the wrapper under ``at_bits(bits)`` in this module's train/eval mode and then
    restores the wrapper's bit-width and every module's mode. In eval mode the
    wrapper's parameters are kept out of the graph (``requires_grad`` off during the
    forward, restored after), so ART's input gradients leave no ``.grad`` on them.
    Inputs go to the wrapper's device and dtype, logits come back to the input's device.
    """

    def __init__(self, wrapper: TriQDefWrapper, bits: int, channels_first: bool) -> None:
        super().__init__()
        self._held = (wrapper,)  # a tuple: not a submodule (see above)
        self.bits = bits
        self.channels_first = channels_first

    @property
    def wrapper(self) -> TriQDefWrapper:
        """The [`TriQDefWrapper`][triqdef.TriQDefWrapper] this module runs."""
        return self._held[0]

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, K)`` of the wrapper at ``bits`` for inputs ``x`` (``(B, C, H, W)``,
        or ``(B, H, W, C)`` when not ``channels_first``)."""
        w = self.wrapper
        param = next(w.parameters(), None)
        z = x if self.channels_first or x.ndim != 4 else x.permute(0, 3, 1, 2)
        z = z.to(
            device=param.device if param is not None else x.device,
            dtype=model_dtype(w) or x.dtype,
        )
        modes = [(m, m.training) for m in w.modules()]
        frozen = [] if self.training else [p for p in w.parameters() if p.requires_grad]
        try:
            w.train(self.training)
            for p in frozen:
                p.requires_grad_(False)
            with w.at_bits(self.bits):
                out = w(z)
        finally:
            for p in frozen:
                p.requires_grad_(True)
            for m, flag in modes:
                m.training = flag
        return logits_of(out, "as_classifier").to(x.device)


def _check_shape(shape: Any) -> tuple[int, ...]:
    """``input_shape`` as a tuple of positive ints."""
    try:
        dims = tuple(shape)
    except TypeError:
        dims = ()
    if not dims or any(
        isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1 for d in dims
    ):
        raise ConfigError(
            f"as_classifier: input_shape must be the shape of one input, a tuple of positive "
            f"ints such as (1, 28, 28), got {shape!r}"
        )
    return tuple(int(d) for d in dims)


def _input_shape(wrapper: TriQDefWrapper, given: Any, channels_first: bool) -> tuple[int, ...]:
    """The given ``input_shape``, else that of the wrapper's last kept input."""
    if given is not None:
        return _check_shape(given)
    recent = wrapper.recent_inputs()
    if not recent:
        raise ConfigError(
            "as_classifier: pass input_shape=, the shape of one input such as (1, 28, 28) "
            "(x.shape[1:]); ART needs it, and it can be inferred only from the inputs a "
            "wrapper keeps with keep_recent_inputs(n)"
        )
    shape = tuple(recent[-1].shape[1:])
    if not channels_first and len(shape) == 3:
        shape = (shape[1], shape[2], shape[0])
    return shape


def _count_classes(module: _AtBits, shape: tuple[int, ...]) -> int:
    """The number of logits of one forward of zeros (eval mode, no gradient)."""
    w = module.wrapper
    param = next(w.parameters(), None)
    probe = torch.zeros(
        (1, *shape),
        device=param.device if param is not None else None,
        dtype=model_dtype(w) or torch.get_default_dtype(),
    )
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            logits = module(probe)
    except TriQDefError:
        raise
    except RuntimeError as exc:
        raise ConfigError(
            f"as_classifier: a forward of a zeros {tuple(probe.shape)} batch failed, so "
            f"nb_classes could not be inferred; check input_shape={shape} or pass "
            f"nb_classes= ({exc})"
        ) from exc
    finally:
        module.train(was)
    return int(logits.shape[1])


def as_classifier(
    wrapper: TriQDefWrapper,
    bits: int,
    *,
    input_shape: tuple[int, ...] | None = None,
    nb_classes: int | None = None,
    clip_values: tuple[float, float] | None = (0.0, 1.0),
    loss: nn.Module | None = None,
    **kwargs: Any,
) -> Any:
    """An ART ``PyTorchClassifier`` whose model is ``wrapper`` running at ``bits``.

    Any ART attack, defence or metric that takes a PyTorch classifier then runs on
    one bit-width of the shared backbone: ``FastGradientMethod(classifier, eps=0.1)``,
    ``AdversarialPatchPyTorch(classifier, ...)``, ...

    The classifier's ``model`` is a small module that runs
    ``with wrapper.at_bits(bits): wrapper(x)`` per batch, so the wrapper is never
    left at ``bits``: its bit-width, and every module's train/eval flag, are
    restored after each forward, and ART's ``.to(device)`` and ``.zero_grad()`` do not
    reach it (it stays on its own device; inputs move to it and logits move back).

    Mode: ART runs the model in eval mode unless a call asks for training mode
    (``predict``, ``loss_gradient``, ``class_gradient`` default to
    ``training_mode=False``; ``fit`` uses training mode). In eval mode the observers
    and the ``bits``-bit BatchNorm statistics are only read, and the wrapper's
    parameters are kept out of the autograd graph, so the input gradients that attacks
    take leave no ``.grad`` on them. In training mode (``fit``, or
    ``training_mode=True``) the wrapper behaves as in training: its observers and
    BatchNorm statistics at ``bits`` move, and gradients reach its parameters (``fit``
    then trains the shared weights at ``bits`` with the optimizer you pass).

    Args:
        wrapper: a [`TriQDefWrapper`][triqdef.TriQDefWrapper] (float32 or float64;
            ART feeds float32 inputs, which are cast to the model's dtype).
        bits: the bit-width to run; one of ``wrapper.bits`` and calibrated (see
            [`calibrated_bits`][triqdef.TriQDefWrapper.calibrated_bits]).
        input_shape: the shape of one input, e.g. ``(1, 28, 28)`` (``(28, 28, 1)``
            with ``channels_first=False``); default: that of the last input the
            wrapper kept with [`keep_recent_inputs`][triqdef.TriQDefWrapper.keep_recent_inputs].
        nb_classes: number of classes; default: the number of logits of one forward
            of a zero input at ``bits`` (eval mode, no gradient, no state changed).
        clip_values: ``(min, max)`` of valid inputs, which ART's attacks clip to.
        loss: the loss ART differentiates; default ``torch.nn.CrossEntropyLoss()``.
        **kwargs: passed to ``PyTorchClassifier`` (``preprocessing=(mean, std)``,
            ``optimizer``, ``channels_first``, ``device_type``, ...). With
            ``channels_first=False`` ART's ``(B, H, W, C)`` inputs are permuted to the
            model's ``(B, C, H, W)``. ``device_type`` defaults to the wrapper's device
            (``"cpu"`` or ``"gpu"``), so ART's tensors meet the model where it is.

    Returns:
        An ``art.estimators.classification.PyTorchClassifier``; ``classifier.predict(x)``
        returns the ``(N, K)`` logits of ``wrapper`` at ``bits`` in eval mode.

    Raises:
        ConfigError: ``wrapper`` is not a ``TriQDefWrapper``; ``bits`` is not one of its
            bit-widths; ``input_shape`` is missing (nothing kept to infer it from) or not
            a shape; ``nb_classes`` is not a positive int, or cannot be inferred.
        NotCalibratedError: the ``bits``-bit observers have never seen data.
    """
    if not isinstance(wrapper, TriQDefWrapper):
        raise ConfigError(f"as_classifier needs a TriQDefWrapper, got {type(wrapper).__name__}")
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in wrapper.bits:
        raise ConfigError(f"bit-width {bits!r} is not one of this wrapper's bits {wrapper.bits}")
    if bits not in wrapper.calibrated_bits():
        raise NotCalibratedError(
            f"as_classifier: the {bits}-bit observers have never seen data; run "
            f"wrapper.calibrate(batches) (or train at {bits} bits) before evaluating there"
        )
    channels_first = kwargs.get("channels_first", True)
    if not isinstance(channels_first, bool):
        raise ConfigError(f"as_classifier: channels_first must be a bool, got {channels_first!r}")
    if nb_classes is not None:
        nb_classes = check_int("as_classifier: nb_classes", nb_classes)
    shape = _input_shape(wrapper, input_shape, channels_first)
    module = _AtBits(wrapper, bits, channels_first)
    if nb_classes is None:
        nb_classes = _count_classes(module, shape)
    if "device_type" not in kwargs:
        param = next(wrapper.parameters(), None)
        on_cpu = param is None or param.device.type == "cpu"
        kwargs["device_type"] = "cpu" if on_cpu else "gpu"
    return _classification.PyTorchClassifier(
        model=module,
        loss=nn.CrossEntropyLoss() if loss is None else loss,
        input_shape=shape,
        nb_classes=nb_classes,
        clip_values=clip_values,
        **kwargs,
    )


# --- patch_source ------------------------------------------------------------------------------
class ARTPatchSource:
    """A [`PatchSource`][triqdef.patches.PatchSource] that draws its patch from an ART
    patch attack; build it with [`patch_source`][triqdef.integrations.art.patch_source].

    ``source(x, y, wrapper)`` returns ``x`` with the attack's patch pasted in: a
    ``(B, C, H, W)`` tensor on the device and of the dtype of ``x``, detached. The
    patch comes from ``attack.generate(x, y)`` (the images as a float32 numpy array
    in the layout of the attack's estimator, the labels as class indices, or
    ``target`` for a targeted attack), run again every ``refresh_every`` calls.

    Attributes:
        attack: the ART attack.
        patch: the last generated patch ``(C, h, w)`` (float32, CPU; resized to
            ``patch_size`` when given), or ``None`` before the first call.
        mask: its ``(C or 1, h, w)`` blending mask with values in [0, 1] (ART's
            circle or square mask; all ones when the attack returns none).
        locations: ``(B, 2)`` int64 top-left ``(row, col)`` of the last call's patches
            (``None`` with ``scale``, where ART places them).
        generations: how many times the attack has generated a patch.
    """

    def __init__(
        self,
        attack: Any,
        *,
        target: int | None = None,
        refresh_every: int | None = 1,
        patch_size: int | tuple[int, int] | None = None,
        scale: float | None = None,
        seed: int | None = None,
    ) -> None:
        if not callable(getattr(attack, "generate", None)):
            raise ConfigError(
                f"patch_source needs an ART attack with a generate method (e.g. "
                f"AdversarialPatchPyTorch), got {type(attack).__name__}"
            )
        estimator = getattr(attack, "estimator", None)
        self.channels_first = bool(getattr(estimator, "channels_first", True))
        # ART's PyTorch implementation keeps (C, h, w) patches whatever the images' layout
        impl = getattr(attack, "_attack", attack)  # AdversarialPatch delegates to one
        self._chw = self.channels_first or type(impl).__name__ == "AdversarialPatchPyTorch"
        self.targeted = bool(getattr(attack, "targeted", False))
        if self.targeted and target is None:
            raise ConfigError(
                f"patch_source: the {type(attack).__name__} is targeted (ART's "
                "AdversarialPatch is by default); pass target=<class> or build the attack "
                "with targeted=False"
            )
        if not self.targeted and target is not None:
            raise ConfigError(
                f"patch_source: target={target!r} but the {type(attack).__name__} is "
                "untargeted; build it with targeted=True"
            )
        if target is not None:
            target = check_int("patch_source: target", target, low=0)
            classes = getattr(estimator, "nb_classes", None)
            if isinstance(classes, int) and target >= classes:
                raise ConfigError(
                    f"patch_source: target {target} is not a class of the attack's "
                    f"classifier (nb_classes={classes})"
                )
        if refresh_every is not None:
            refresh_every = check_int("patch_source: refresh_every", refresh_every)
        size = None if patch_size is None else check_size2(patch_size, "patch_source: patch_size")
        if scale is not None:
            if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
                raise ConfigError(f"patch_source: scale must be a number, got {scale!r}")
            scale = float(scale)
            if not 0 < scale <= 1:
                raise ConfigError(f"patch_source: scale must be in (0, 1], got {scale}")
            if size is not None:
                raise ConfigError(
                    "patch_source: give patch_size (triqdef pastes the patch at that size) or "
                    "scale (ART places and scales it), not both"
                )
            if not callable(getattr(attack, "apply_patch", None)):
                raise ConfigError(
                    f"patch_source: scale= lets the attack place its patch, but the "
                    f"{type(attack).__name__} has no apply_patch method; leave scale=None"
                )
        if seed is not None:
            seed = check_int("patch_source: seed", seed, low=0)
        self.attack = attack
        self.target = target
        self.refresh_every = refresh_every
        self.patch_size = size
        self.scale = scale
        self.seed = seed
        self.patch: Tensor | None = None
        self.mask: Tensor | None = None
        self.locations: Tensor | None = None
        self.generations = 0
        self._raw: np.ndarray | None = None  # the patch as ART returned it, for apply_patch
        self._uses = 0  # calls since the last generation
        self._stale = True
        self._generators: dict[str, torch.Generator] = {}

    def __repr__(self) -> str:
        return (
            f"ARTPatchSource({type(self.attack).__name__}, refresh_every={self.refresh_every}, "
            f"patch_size={self.patch_size}, scale={self.scale})"
        )

    def refresh(self) -> None:
        """Generate a new patch at the next call, whatever ``refresh_every`` says."""
        self._stale = True

    def __call__(self, x: Tensor, y: Tensor | None = None, wrapper: Any = None) -> Tensor:
        """Patched copies of ``x``.

        Args:
            x: images ``(B, C, H, W)``, floating.
            y: labels ``(B,)`` (integer, on ``x``'s device); the attack's true labels
                when untargeted, unused when targeted.
            wrapper: unused: the attack runs on the classifier it was built on (see
                [`patch_source`][triqdef.integrations.art.patch_source]).

        Returns:
            ``(B, C, H, W)`` patched images, on ``x``'s device and of its dtype, detached.

        Raises:
            InputError: bad ``x`` or ``y``; the attack returned a patch with the wrong
                number of channels, NaN or Inf, or a mask that does not fit it; the
                patch is larger than the images.
            ConfigError: the attack's ``generate`` returned no ``(C, h, w)`` patch (it is
                not a patch attack).
        """
        if not isinstance(x, Tensor) or x.ndim != 4 or not x.is_floating_point():
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise InputError(f"patch_source: x must be a floating (B, C, H, W) tensor, got {got}")
        if x.numel() == 0:
            raise InputError(f"patch_source: x is empty, shape {tuple(x.shape)}")
        if not self.targeted:
            if y is None:
                raise InputError("patch_source: an untargeted attack needs the labels y")
            y = check_labels(y, x, "patch_source: y")
        due = self.refresh_every is not None and self._uses >= self.refresh_every
        if self._stale or due:
            self._generate(x, y)
        out = self._place(x)
        self._uses += 1
        return out

    # --- generating ----------------------------------------------------------------------
    def _numpy_images(self, x: Tensor) -> np.ndarray:
        """``x`` as ART takes it: a float32 numpy array in the estimator's layout."""
        xs = x.detach().to("cpu", torch.float32)
        if not self.channels_first:
            xs = xs.permute(0, 2, 3, 1)
        return np.ascontiguousarray(xs.numpy())

    def _generate(self, x: Tensor, y: Tensor | None) -> None:
        n, c = x.shape[0], x.shape[1]
        if self.targeted:
            labels = np.full(n, self.target, dtype=np.int64)
        else:
            assert y is not None  # checked by the caller
            labels = y.detach().cpu().numpy().astype(np.int64)
        # ART's patch attacks differentiate: allow it even under no_grad/inference_mode
        with torch.inference_mode(False), torch.enable_grad():
            out = self.attack.generate(x=self._numpy_images(x), y=labels)
        raw, raw_mask = (
            (out[0], out[1]) if isinstance(out, tuple) and len(out) == 2 else (out, None)
        )
        what = type(self.attack).__name__
        shape = getattr(raw, "shape", None)
        if shape is None or len(shape) != 3:
            raise ConfigError(
                f"patch_source: {what}.generate returned {shape or type(raw).__name__}, not a "
                "(C, h, w) patch; patch_source takes patch attacks such as "
                "AdversarialPatchPyTorch (evasion attacks return images: evaluate those "
                "through as_classifier)"
            )
        patch = torch.tensor(np.asarray(raw, dtype=np.float32))
        first, last = patch.shape[0] == c, patch.shape[-1] == c
        chw = first if first != last else self._chw  # the shape tells, else the attack's layout
        if not chw:
            patch = patch.permute(2, 0, 1)
        if patch.shape[0] != c:
            raise InputError(
                f"patch_source: {what} returned a patch with {patch.shape[0]} channels, the "
                f"images have {c}"
            )
        if not bool(torch.isfinite(patch).all()):
            raise InputError(
                f"patch_source: {what} returned a patch holding NaN or Inf (check the "
                "attack's learning rate and the classifier's clip_values)"
            )
        mask = self._mask(raw_mask, patch, chw, what)
        if self.patch_size is not None and tuple(patch.shape[-2:]) != self.patch_size:
            patch = _resize(patch, self.patch_size)
            mask = _resize(mask, self.patch_size)
        self._raw = np.array(raw, dtype=np.float32)
        self.patch, self.mask = patch, mask
        self.generations += 1
        self._uses = 0
        self._stale = False

    def _mask(self, raw: Any, patch: Tensor, chw: bool, what: str) -> Tensor:
        """ART's blending mask (in the patch's layout) as ``(C or 1, h, w)`` float32 in
        [0, 1]."""
        if raw is None:
            return torch.ones(1, *patch.shape[-2:])
        mask = torch.tensor(np.asarray(raw, dtype=np.float32))
        if mask.ndim == 2:
            mask = mask.unsqueeze(0)
        elif mask.ndim == 3 and not chw:
            mask = mask.permute(2, 0, 1)
        if (
            mask.ndim != 3
            or mask.shape[-2:] != patch.shape[-2:]
            or mask.shape[0] not in (1, patch.shape[0])
        ):
            raise InputError(
                f"patch_source: {what} returned a mask of shape {tuple(mask.shape)} for a "
                f"patch of shape {tuple(patch.shape)}"
            )
        if not bool(((mask >= 0) & (mask <= 1)).all()):  # NaN fails this too
            raise InputError(f"patch_source: {what} returned a mask with values outside [0, 1]")
        return mask

    # --- placing -------------------------------------------------------------------------
    def _generator(self, device: torch.device) -> torch.Generator | None:
        """One generator per device, seeded with ``seed`` (``None``: torch's global one)."""
        if self.seed is None:
            return None
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def _place(self, x: Tensor) -> Tensor:
        assert self.patch is not None and self.mask is not None  # generated before
        if self.scale is not None:
            return self._place_by_art(x)
        b, _, hh, ww = x.shape
        h, w = self.patch.shape[-2:]
        if h > hh or w > ww:
            raise InputError(
                f"patch_source: the patch is {(h, w)} but the images are {(hh, ww)}; pass "
                "patch_size= (the side to paste it at), build the attack with a smaller "
                "patch_shape, or pass scale= to let ART scale and place it"
            )
        gen = self._generator(x.device)
        loc = random_locations(b, (hh, ww), (h, w), generator=gen, device=x.device)
        xd = x.detach()
        out = apply_patch(xd, self.patch.to(x.device, x.dtype), loc)
        if not bool((self.mask == 1).all()):  # blend with ART's circle mask
            canvas = torch.zeros(b, self.mask.shape[0], hh, ww, device=x.device, dtype=x.dtype)
            m = apply_patch(canvas, self.mask.to(x.device, x.dtype), loc)
            out = xd * (1 - m) + out * m
        self.locations = loc
        return out

    def _place_by_art(self, x: Tensor) -> Tensor:
        """The attack's own ``apply_patch`` (its random scale, rotation and position)."""
        out = self.attack.apply_patch(
            self._numpy_images(x), scale=self.scale, patch_external=self._raw
        )
        res = torch.tensor(np.asarray(out, dtype=np.float32))
        if not self.channels_first and res.ndim == 4:
            res = res.permute(0, 3, 1, 2)
        if res.shape != x.shape:
            raise InputError(
                f"patch_source: {type(self.attack).__name__}.apply_patch returned "
                f"{tuple(res.shape)}, expected {tuple(x.shape)}"
            )
        self.locations = None
        return res.to(x.device, x.dtype)


def _resize(t: Tensor, size: tuple[int, int]) -> Tensor:
    """``(C, h, w)`` resized to ``size`` (bilinear, antialiased: values stay in range)."""
    return F.interpolate(
        t.unsqueeze(0), size=size, mode="bilinear", align_corners=False, antialias=True
    ).squeeze(0)


def patch_source(
    attack: Any,
    *,
    target: int | None = None,
    refresh_every: int | None = 1,
    patch_size: int | tuple[int, int] | None = None,
    scale: float | None = None,
    seed: int | None = None,
) -> ARTPatchSource:
    """Turn an ART patch attack into a patch source for ``wrapper.loss(x, y, patch=source)``.

    The attack runs on the classifier it was built on: build it on
    ``as_classifier(wrapper, bits)`` to attack the wrapper being trained at ``bits``
    (the classifier leaves the wrapper's bit-width, modes and gradients as they were,
    so the source can be called from inside ``wrapper.loss``), or on any other ART
    classifier to train against patches transferred from it.

    Refreshing: ``attack.generate`` runs ``attack.max_iter`` optimisation passes over
    the images, far more than one training step costs. The source regenerates its
    patch on the first call and then every ``refresh_every`` calls (default 1: every
    call, from that call's images and labels), and pastes the last patch in between;
    ``None`` generates once and keeps the patch until
    [`refresh`][triqdef.integrations.art.ARTPatchSource.refresh]. ART's
    ``AdversarialPatch`` attacks keep their patch between ``generate`` calls and
    continue optimising it (a warm start; ``attack.reset_patch()`` starts over), so a
    few ``max_iter`` per refresh keep up with a model that trains.

    Placing: by default triqdef pastes the patch with
    [`apply_patch`][triqdef.patches.apply_patch] at uniformly random corners (drawn
    from a generator seeded with ``seed``; ``source.locations`` holds them), blended
    with ART's circle or square mask, so only the patch's box changes. ART's
    ``AdversarialPatch`` usually learns a patch the size of the image's smaller side
    and shrinks it when applying it (``scale_min`` to ``scale_max``): give
    ``patch_size`` to paste it at that side (resized, bilinear), or build the attack
    with ``patch_shape=(C, s, s)``. With ``scale``, the attack's own ``apply_patch``
    places the patch instead (ART's random rotation and position at that scale of
    the smaller image side, from numpy's and torch's global generators, in float32).

    Layout: images go to ART in its estimator's layout (``(N, C, H, W)``, or
    ``(N, H, W, C)`` when the estimator has ``channels_first=False``) as float32 numpy
    arrays. The patch ART returns is read as ``(C, h, w)`` or ``(h, w, C)`` by where
    the images' channel count stands (``AdversarialPatchPyTorch`` returns ``(C, h, w)``
    in either layout, ``AdversarialPatchNumpy`` the estimator's layout), and the
    patched images come back as torch tensors on the device and of the dtype of
    ``x``. ART's attacks also draw from torch's and numpy's global generators (e.g. to
    shuffle batches): seed those for repeatable patches.

    Args:
        attack: an ART patch attack whose ``generate(x, y)`` returns a patch or a
            ``(patch, mask)`` pair: ``AdversarialPatch``, ``AdversarialPatchPyTorch``,
            ``AdversarialPatchNumpy``.
        target: the class a targeted attack pushes to (ART's ``AdversarialPatch`` is
            targeted by default); must be ``None`` for an untargeted attack, which gets
            the true labels.
        refresh_every: calls between two generations (``None``: generate once).
        patch_size: side (int) or ``(h, w)`` the patch is pasted at (default: its
            own size, which must fit the images).
        scale: let the attack place the patch at this scale in (0, 1].
        seed: seed of the corner draws (default: torch's global generator).

    Returns:
        An [`ARTPatchSource`][triqdef.integrations.art.ARTPatchSource].

    Raises:
        ConfigError: ``attack`` has no ``generate``; a targeted attack without
            ``target`` or an untargeted one with it; ``target``, ``refresh_every``,
            ``patch_size``, ``scale`` or ``seed`` invalid; both ``patch_size`` and
            ``scale``; ``scale`` for an attack without ``apply_patch``.
    """
    return ARTPatchSource(
        attack,
        target=target,
        refresh_every=refresh_every,
        patch_size=patch_size,
        scale=scale,
        seed=seed,
    )

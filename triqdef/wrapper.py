"""`TriQDefWrapper`: one shared backbone, switchable bit-widths, inserted by hooks."""

from __future__ import annotations

import collections
import contextlib
import copy
import difflib
import functools
import math
import threading
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .attacks.patching import PatchSource, RandomPatch
from .errors import (
    ConcurrentUseError,
    ConfigError,
    DetachedError,
    InputError,
    LayerNotFoundError,
    NotCalibratedError,
)
from .losses import PAIR_MODES, DescriptorConfig
from .quant import (
    BatchNormStats,
    BitContext,
    CleanRowsBatchNorm,
    LayerQuantizer,
    _recomputing_hook,
    weight_access,
)
from .taps import FeatureTaps

__all__ = ["TriQDefWrapper", "DEFAULT_BITS"]

DEFAULT_BITS = (32, 8, 5, 4, 2)
BN_ROWS = ("all", "clean")
_QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _in_backward() -> bool:
    """Whether this thread is running an autograd backward (e.g. the memory-bounded
    replay, which the engine may run on its own device thread for the caller)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


class _BitsGuard:
    """Which thread holds a wrapper's bit-width (inside ``at_bits``, ``calibrate`` or
    ``loss``). Re-entrant for its thread; a new one after a copy or unpickling."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.holder: int | None = None
        self.depth = 0

    def __reduce__(self):
        return (_BitsGuard, ())

    def _refuse(self, what: str, bits: int) -> ConcurrentUseError:
        return ConcurrentUseError(
            f"{what}: another thread (ident {self.holder}) is using this TriQDefWrapper at "
            f"{bits} bits (inside at_bits, calibrate or loss). The bit-width is one mode of "
            "the wrapper and its hooks swap the shared weights, so two threads cannot run it "
            "at once: give each thread its own copy (copy.deepcopy(wrapper)), or use "
            "DistributedDataParallel rather than DataParallel. Nothing was changed"
        )

    def check(self, what: str, bits: int) -> None:
        """Raise if another thread holds the bit-width (a plain read: no lock)."""
        holder = self.holder
        if holder is not None and holder != threading.get_ident() and not _in_backward():
            raise self._refuse(what, bits)

    @contextlib.contextmanager
    def hold(self, what: str, bits: int) -> Iterator[None]:
        """Hold the bit-width for this thread inside the block, or raise if another does."""
        if _in_backward():  # acting for the thread that called backward
            yield
            return
        me = threading.get_ident()
        with self._lock:
            if self.holder is not None and self.holder != me:
                raise self._refuse(what, bits)
            self.holder, self.depth = me, self.depth + 1
        try:
            yield
        finally:
            with self._lock:
                self.depth -= 1
                if not self.depth:
                    self.holder = None


def _logits_of(out, what: str = "loss") -> torch.Tensor:
    """The ``(B, K)`` class scores in what a classifier returned.

    Accepted: a ``(B, K)`` tensor; a tuple or namedtuple (its first item, e.g.
    torchvision's ``GoogLeNetOutputs`` / ``InceptionOutputs`` in training mode, whose
    auxiliary logits are not used); a mapping (its ``"logits"`` entry, e.g. a Hugging
    Face ``ModelOutput``, else its ``"out"`` entry); a ``(B, K, 1, ..., 1)`` tensor
    (squeezed to ``(B, K)``).

    Raises:
        InputError: anything else, e.g. ``(B, K, H, W)`` per-pixel scores (segmentation
            is not image classification) or ``(B,)``; the message names what the model
            returned.
    """
    got = out
    if isinstance(out, Mapping):
        key = "logits" if "logits" in out else "out" if "out" in out else None
        if key is None:
            raise InputError(
                f"{what}: the model returned a {type(got).__name__} with keys "
                f"{list(out)[:8]}; a mapping needs a 'logits' (or 'out') entry holding "
                "(B, K) class scores"
            )
        out = out[key]
    elif isinstance(out, (tuple, list)):
        if not out:
            raise InputError(f"{what}: the model returned an empty {type(got).__name__}")
        out = out[0]
    if not isinstance(out, torch.Tensor):
        inner = "" if out is got else f" whose first item / logits entry is {type(out).__name__}"
        raise InputError(
            f"{what}: the model must return (B, K) logits (or a tuple, namedtuple or dict "
            f"holding them), got {type(got).__name__}{inner}"
        )
    if out.ndim > 2 and all(s == 1 for s in out.shape[2:]):
        out = out.flatten(1)  # (B, K, 1, 1): a classifier ending in a 1x1 convolution
    if out.ndim != 2:
        hint = (
            "; (B, K, H, W) holds per-pixel scores (segmentation), not one score per class "
            "and image: pool them in the model (e.g. nn.AdaptiveAvgPool2d(1) + nn.Flatten())"
            if out.ndim > 2
            else ""
        )
        raise InputError(
            f"{what}: the model returned a tensor of shape {tuple(out.shape)}, expected "
            f"(B, K) class scores{hint}"
        )
    return out


def _loss_logits_hook(ctx: BitContext, module: nn.Module, args: tuple, output):
    """Forward hook of the root model: inside the loss (``ctx.rows`` set), hand the
    objective the ``(B, K)`` logits of a model returning a tuple, dict or ``(B, K, 1, 1)``;
    outside it the model's output is left exactly as it is."""
    if ctx.rows is None or (isinstance(output, torch.Tensor) and output.ndim == 2):
        return None
    return _logits_of(output, "loss")


def _key(name: str) -> str:
    """Module-dict key for a layer name (dots are not allowed in module names)."""
    return name.replace(".", "/") if name else "<root>"


def _check_bits(bits: Iterable[int]) -> tuple[int, ...]:
    try:
        bits = tuple(bits)
    except TypeError:
        raise ConfigError(f"bits must be a sequence of integers, got {bits!r}") from None
    if not bits:
        raise ConfigError("bits is empty; give at least one bit-width, e.g. bits=(32, 8, 4)")
    for b in bits:
        if isinstance(b, bool) or not isinstance(b, int):
            raise ConfigError(f"bits must be integers, got {b!r} ({type(b).__name__}) in {bits}")
        if not 2 <= b <= 32:
            raise ConfigError(f"bit-width {b} is out of range: every bit-width must be in [2, 32]")
    dup = sorted({b for b in bits if bits.count(b) > 1})
    if dup:
        raise ConfigError(f"bits {bits} lists {dup} more than once")
    return tuple(sorted(bits, reverse=True))


def _check_penalty_bits(m) -> int | None:
    if m is None:
        return None
    if isinstance(m, bool) or not isinstance(m, int) or m < 2:
        raise ConfigError(
            "penalty_bits must be None (every pair of active bit-widths) or an int >= 2 "
            f"(a pair needs two bit-widths), got {m!r}"
        )
    return m


def _check_input_bits(b) -> int | None:
    if b is None:
        return None
    if isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 32:
        raise ConfigError(
            "input_bits must be None (the model's input quantized like any layer input) or "
            f"an int in [2, 32] (the fewest bits its input is quantized to), got {b!r}"
        )
    return b


def _fdp_off_message(model: nn.Module, lambda_fdp: float) -> str:
    """The warning for FDP weighted but tapping nothing, with layers worth tapping."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    head = linears[-1] if linears else None  # the final classifier, not worth tapping

    def is_head(name: str) -> bool:
        return head is not None and (head == name or head.startswith(name + "."))

    names = [n for n, _ in model.named_children() if not is_head(n)]
    if not names:  # a flat model: any named module
        names = [n for n, _ in model.named_modules() if n and not is_head(n)]
    hint = f"e.g. layers={names[:5]}" if names else "layers=[...]"
    return (
        f"lambda_fdp={lambda_fdp} but layers=(): the Feature Disalignment Penalty is off. "
        f"Tap early-middle layers, {hint}, or pass lambda_fdp=0 to say FDP is meant to be off"
    )


def _check_names(model: nn.Module, names, what: str) -> tuple[str, ...]:
    if isinstance(names, str):
        names = (names,)
    try:
        names = tuple(names)
    except TypeError:
        raise ConfigError(f"{what} must be a sequence of layer names, got {names!r}") from None
    known = dict(model.named_modules())
    for name in names:
        if not isinstance(name, str):
            raise ConfigError(f"{what} must be layer names (str), got {name!r}")
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=5, cutoff=0.5)
            hint = f" Closest names: {close}." if close else ""
            raise LayerNotFoundError(
                f"{what} names {name!r}, which is not a module of {type(model).__name__}.{hint}"
                " List them all with [n for n, _ in model.named_modules()]."
            )
    return names


def _check_calibration_batches(w: TriQDefWrapper, batches: list) -> None:
    """Raise InputError for a batch that is not a non-empty tensor on the model's device, or
    a floating batch whose dtype differs from the model's or that holds NaN/Inf (checked
    before any statistic is reset). Integer batches (token ids) are accepted as they are."""
    param = next(w.model.parameters(), None)
    for i, x in enumerate(batches):
        if not isinstance(x, torch.Tensor) or x.numel() == 0:
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x)
            raise InputError(f"calibrate: batch {i} must be a non-empty tensor, got {got}")
        if param is not None and x.device != param.device:
            raise InputError(f"calibrate: batch {i} is on {x.device}, the model on {param.device}")
        if not x.is_floating_point():
            continue
        if param is not None and x.dtype != param.dtype:
            raise InputError(f"calibrate: batch {i} is {x.dtype}, the model is {param.dtype}")
        if not bool(torch.isfinite(x).all()):
            raise InputError(f"calibrate: batch {i} contains NaN or Inf")


def _check_feature_inputs(w: TriQDefWrapper, args: tuple, kwargs: dict) -> None:
    """Raise InputError unless the first argument is a tensor and every tensor argument is
    on the model's device and, when floating, of its parameters' dtype (any dtype under
    autocast). The model may take several inputs; non-tensor extras are left to it."""
    if not args or not isinstance(args[0], torch.Tensor):
        got = type(args[0]).__name__ if args else "nothing"
        raise InputError(f"features: the first argument must be a tensor, got {got}")
    param = next(w.model.parameters(), None)
    if param is None:
        return
    named = [(f"argument {i}", a) for i, a in enumerate(args)] + list(kwargs.items())
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            continue
        if t.device != param.device:
            raise InputError(
                f"features: {name} is on {t.device} but the model is on {param.device}"
            )
        if (
            t.is_floating_point()
            and t.dtype != param.dtype
            and not torch.is_autocast_enabled(t.device.type)
        ):
            raise InputError(
                f"features: {name} is {t.dtype} but the model's parameters are {param.dtype}"
            )


def _failed(checks: list[tuple[str, torch.Tensor]]) -> list[str]:
    """The labels whose 0-dim bool tensor is False, each once, in order (one host
    synchronisation per device)."""
    by_device: dict[torch.device, list] = {}
    for label, ok in checks:
        by_device.setdefault(ok.device, []).append((label, ok))
    bad = set()
    for entries in by_device.values():
        flags = torch.stack([ok for _, ok in entries]).tolist()
        bad.update(label for (label, _), fine in zip(entries, flags) if not fine)
    return [label for label in dict.fromkeys(label for label, _ in checks) if label in bad]


def _device_of(module: nn.Module) -> torch.device | None:
    """The device of a module's first parameter (its buffers follow it)."""
    p = next(module.parameters(), None)
    return None if p is None else p.device


def _weight_owner(layer: nn.Module, path: str) -> nn.Module:
    return layer.get_submodule(path) if path else layer


def _materialize(owner: nn.Module, name: str) -> None:
    """Replace a computed weight of ``owner`` (a throwaway copy) by a plain parameter
    holding its current value: every ``torch.nn.utils.parametrize`` tensor of the
    layer, or an old-style ``weight_norm`` / ``spectral_norm`` attribute."""
    if weight_access(owner, name) == "computed":
        key, hook = _recomputing_hook(owner, name)
        hook.remove(owner)  # what torch.nn.utils.remove_weight_norm does
        del owner._forward_pre_hooks[key]
        return
    if weight_access(owner, name) != "parametrized":
        return
    # Not parametrize.remove_parametrizations: it deletes the property from the
    # parametrized class, which a deep copy shares with the original layer.
    with torch.no_grad():
        values = {t: getattr(owner, t).detach().clone() for t in owner.parametrizations}
    owner.__class__ = type(owner).__bases__[0]  # the class before parametrization
    del owner._modules["parametrizations"]
    for t, value in values.items():
        owner.register_parameter(t, nn.Parameter(value))


def _check_weights(model: nn.Module, points: dict[str, tuple]) -> None:
    """Raise ConfigError for a layer whose weight the quantizer cannot swap."""
    modules = dict(model.named_modules())
    for name, (weights, _) in points.items():
        for path, pname in weights:
            owner = _weight_owner(modules[name], path)
            if weight_access(owner, pname) is None:
                full = f"{name}.{path}" if path else name
                raise ConfigError(
                    f"layer {full!r} ({type(owner).__name__}) holds its {pname!r} neither as an "
                    "nn.Parameter, nor through torch.nn.utils.parametrize, nor as an old-style "
                    "torch.nn.utils.weight_norm/spectral_norm attribute, so it cannot be "
                    f"quantized; keep it in full precision with exclude=[{name!r}]"
                )


def _quant_points(model: nn.Module, exclude: tuple[str, ...]) -> dict[str, tuple]:
    """Map layer name -> (weights, num_inputs) for every layer to quantize."""

    def excluded(name: str) -> bool:
        return any(name == e or name.startswith(e + ".") or e == "" for e in exclude)

    points: dict[str, tuple] = {}
    owned: set[str] = set()  # out_proj of attention is evaluated by its parent, not called
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            prefix = f"{name}." if name else ""
            owned.add(prefix + "out_proj")
            if excluded(name):
                continue
            inp = (
                (("", "in_proj_weight"),)
                if module._qkv_same_embed_dim
                else tuple(("", f"{c}_proj_weight") for c in "qkv")
            )
            points[name] = (inp + (("out_proj", "weight"),), 3)
        elif isinstance(module, _QUANTIZABLE) and name not in owned and not excluded(name):
            points[name] = ((("", "weight"),), 1)
    return points


class TriQDefWrapper(nn.Module):
    """Run one model at several bit-widths with one shared set of weights.

    Hooks are attached to the model you pass (no copy, no edit of its class):

    * every ``nn.Conv1d/2d/3d`` and ``nn.Linear`` (and ``nn.MultiheadAttention``'s
      projections) gets its weight fake-quantized per output channel and its input
      fake-quantized per tensor at the active bit-width (see :mod:`triqdef.quant`);
      a weight computed by ``torch.nn.utils.parametrize`` (e.g.
      ``torch.nn.utils.parametrizations.weight_norm`` or ``spectral_norm``) or by the
      older ``torch.nn.utils.weight_norm`` / ``spectral_norm`` is quantized as computed,
      and gradients reach the underlying parameters;
    * every BatchNorm layer keeps one set of running statistics per bit-width;
    * the layers named in ``layers`` are tapped for the perceptual penalties.

    At 32 bits no hook does anything: the output is bit-for-bit the bare model's.

    Args:
        model: any ``nn.Module``.
        bits: the bit-widths to support, each in [2, 32]; sorted high to low.
        layers: names (from ``model.named_modules()``) whose outputs are tapped.
        exclude: names of layers kept in full precision (a container excludes
            everything inside it).
        per_bit_bn: keep BatchNorm running statistics per bit-width (default).
            With ``False`` every bit-width shares the model's own statistics.
        momentum: weight of a new batch in the activation observers' moving average.
        lambda_adv: weight of the cross-entropy on patched inputs.
        lambda_fdp: weight of the Feature Disalignment Penalty (0 turns it off).
        lambda_gpdp: weight of the Gradient Perceptual Dissonance Penalty (0 turns it off).
        alpha: weight of the edge SoftDice inside both penalties.
        beta: weight of the HOG cosine inside both penalties.
        rho: share of each batch that is patched, in [0, 1].
        pairs: ``"mean"`` over unordered bit-width pairs (default) or ``"sum"``
            over ordered pairs (the paper's literal formula).
        patch_source: patches used when ``loss`` gets ``patch=None``; default
            :class:`~triqdef.attacks.RandomPatch` (uniform noise).
        memory_bounded: compute the loss's gradient one bit-width at a time, so only
            one double-backward graph is alive (see :meth:`loss`).
        check_finite: raise :class:`~triqdef.errors.NonFiniteLossError` instead of
            returning a NaN/Inf loss (one host synchronisation per call).
        descriptor: settings of the perceptual descriptors (quantile, sharpness, HOG).
        penalty_bits: an int ``m >= 2`` (default 2) or ``None`` (FDP and GPDP over
            every pair of active bit-widths: the exact objective). With ``m``, each
            [`loss`][triqdef.TriQDefWrapper.loss] call draws ``m`` of the ``K`` active
            bit-widths uniformly without replacement and computes FDP and GPDP (and ``lambda_cos`` /
            ``lambda_smooth``) over that sample only; only those ``m`` bit-widths
            build a double-backward graph, the others run a plain forward for their
            cross-entropy, which stays over all ``K``. The estimate is unbiased:
            ``pairs="mean"`` averages the sampled pairs, ``pairs="sum"`` scales their
            ordered sum by ``K (K-1) / (m (m-1))``. With ``m >= K`` (e.g. the default
            with two active bit-widths), or when none of those penalties is on, every
            bit-width is used and the result is exactly that of ``None``, with no
            random number drawn. The default 2 held the defence within seed noise
            while training 1.65x faster than ``None`` (see docs/objective.md). The
            draw uses torch's global CPU generator (``torch.randperm``): seed it with
            ``torch.manual_seed`` to reproduce it, and seed every DDP rank identically
            so that all ranks draw the same bit-widths. A validated attribute:
            assigning an invalid value raises [`ConfigError`][triqdef.errors.ConfigError]
            and keeps the old one.
        bn_rows: where [`loss`][triqdef.TriQDefWrapper.loss] takes BatchNorm running
            statistics from: ``"all"`` (default) the whole mixed batch, ``"clean"``
            its clean rows only, so that evaluation on clean data is not normalised
            with statistics of patched images. Either way the forward normalises with
            the whole batch's statistics, and a forward outside the loss uses every
            row. Applies to every bit-width's statistics (the model's own at 32 bits)
            and to BatchNorm with ``momentum=None``; needs BatchNorm inputs whose first
            dimension is the batch.
        input_bits: the fewest bits the model's own input is quantized to (default
            8; ``None``: no floor, the input is quantized at the active bit-width like
            any other layer input). A layer that reads the model's input tensor itself
            (the first convolution, usually) quantizes it at ``max(bits, input_bits)``
            bits, and not at all at 32; its weights and every other layer stay at the
            active bit-width. The paper quantizes activations after nonlinearities; a
            raw image at 2 bits (4 grey levels) is not its setting. A layer that reads
            a tensor computed from the input (e.g. normalised) is not affected.
            Honoured by [`export`][triqdef.TriQDefWrapper.export] and
            [`triqdef.save`][triqdef.io.save] / [`triqdef.load`][triqdef.io.load].
        lambda_cos: weight of the gradient-alignment penalty (GAL/TRS-style, experimental;
            default 0: off, the objective is bit for bit the one without it): the mean
            over pairs of (sampled) active bit-widths of ``|cos|`` between the raw input
            gradients of the patched rows' cross-entropy, per sample (flattened over
            ``C*H*W``), averaged over samples; in [0, 1] with ``pairs="mean"``. Follows
            ``pairs`` and ``penalty_bits`` like FDP and GPDP. Costs GPDP's double backward
            (shared with it when both are on). See docs/objective.md.
        lambda_smooth: weight of the TRS smoothness term (experimental; default 0: off):
            the mean over the (sampled) active bit-widths of the per-sample squared L2
            norm of the same input gradients (w.r.t. images in [0, 1]), averaged over
            samples. Its scale depends on the model and data: about 1.4 to 2.1 for an
            untrained ``SmallCNN(width=16)`` on Fashion-MNIST (cross-entropy about 2.5
            per term), about 0.7 to 1.4 over the first 300 Adam steps (see
            docs/objective.md). Independent of ``pairs``.

    Raises:
        ConfigError: an argument is not valid, or a layer to quantize holds its weight
            in a way the quantizer cannot swap (the message names it); nothing is
            attached to the model.
        LayerNotFoundError: a name in ``layers`` or ``exclude`` is not a module of
            the model.

    Warns:
        UserWarning: ``lambda_fdp > 0`` but ``layers`` is empty, so FDP is off; the
            message names layers worth tapping.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        ...                     nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
        >>> w = TriQDefWrapper(net, bits=(32, 4), layers=["2"])
        >>> _ = w(torch.rand(8, 1, 8, 8))            # 32 bits: the bare model
        >>> with w.at_bits(4):
        ...     logits = w(torch.rand(8, 1, 8, 8))   # training mode: observers update
        >>> logits.shape
        torch.Size([8, 10])
        >>> w.detach()
    """

    def __init__(
        self,
        model: nn.Module,
        bits: Sequence[int] = DEFAULT_BITS,
        layers: Sequence[str] = (),
        exclude: Sequence[str] = (),
        *,
        per_bit_bn: bool = True,
        momentum: float = 0.1,
        lambda_adv: float = 1.0,
        lambda_fdp: float = 0.8,
        lambda_gpdp: float = 0.5,
        alpha: float = 0.5,
        beta: float = 1.0,
        rho: float = 0.5,
        pairs: str = "mean",
        patch_source: PatchSource | None = None,
        memory_bounded: bool = False,
        check_finite: bool = True,
        descriptor: DescriptorConfig | None = None,
        penalty_bits: int | None = 2,
        bn_rows: str = "all",
        input_bits: int | None = 8,
        lambda_cos: float = 0.0,
        lambda_smooth: float = 0.0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be an nn.Module, got {type(model).__name__}")
        bits = _check_bits(bits)
        layers = _check_names(model, layers, "layers")
        exclude = _check_names(model, exclude, "exclude")
        if (
            isinstance(momentum, bool)
            or not isinstance(momentum, (int, float))
            or not 0.0 < float(momentum) <= 1.0
        ):
            raise ConfigError(f"momentum must be in (0, 1], got {momentum}")
        weights = dict(
            lambda_adv=lambda_adv,
            lambda_fdp=lambda_fdp,
            lambda_gpdp=lambda_gpdp,
            lambda_cos=lambda_cos,
            lambda_smooth=lambda_smooth,
            alpha=alpha,
            beta=beta,
        )
        for name, value in weights.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be finite and >= 0, got {value}")
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 <= rho <= 1:
            raise ConfigError(f"rho (patched share of the batch) must be in [0, 1], got {rho!r}")
        if pairs not in PAIR_MODES:
            raise ConfigError(f"pairs must be one of {PAIR_MODES}, got {pairs!r}")
        if patch_source is not None and not callable(patch_source):
            raise ConfigError(
                f"patch_source must be callable(x, y, wrapper) -> x_adv, got {patch_source!r}"
            )
        if descriptor is not None and not isinstance(descriptor, DescriptorConfig):
            raise ConfigError(f"descriptor must be a DescriptorConfig, got {descriptor!r}")
        penalty_bits = _check_penalty_bits(penalty_bits)
        if not isinstance(bn_rows, str) or bn_rows not in BN_ROWS:
            raise ConfigError(f"bn_rows must be one of {BN_ROWS}, got {bn_rows!r}")
        input_bits = _check_input_bits(input_bits)
        for module in model.modules():
            for hook in (*module._forward_pre_hooks.values(), *module._forward_hooks.values()):
                owner = getattr(hook, "__self__", None)
                if isinstance(owner, (LayerQuantizer, BatchNormStats)):
                    raise ConfigError(
                        "this model is already wrapped by a TriQDefWrapper; "
                        "call .detach() on that wrapper first"
                    )
        points = _quant_points(model, exclude)
        if not points:
            raise ConfigError(
                f"{type(model).__name__} has no Conv1d/2d/3d, Linear or MultiheadAttention "
                f"layer to quantize{' outside `exclude`' if exclude else ''}"
            )
        _check_weights(model, points)

        super().__init__()
        self.model = model
        self.bits = bits
        self.layers = layers
        self.exclude = exclude
        self.per_bit_bn = bool(per_bit_bn)
        self.lambda_adv, self.lambda_fdp = float(lambda_adv), float(lambda_fdp)
        self.lambda_gpdp, self.alpha, self.beta = float(lambda_gpdp), float(alpha), float(beta)
        self.rho, self.pairs = float(rho), pairs
        self.lambda_cos, self.lambda_smooth = float(lambda_cos), float(lambda_smooth)
        self.patch_source = RandomPatch() if patch_source is None else patch_source
        self.memory_bounded, self.check_finite = bool(memory_bounded), bool(check_finite)
        self.descriptor = descriptor or DescriptorConfig()
        self._penalty_bits = penalty_bits
        self.active_bits = bits
        self._last_terms: dict[str, torch.Tensor] = {}
        self._recent: collections.deque | None = None  # recent inputs, for BACT calibration
        self.bn_rows, self.input_bits = bn_rows, input_bits
        self._ctx = BitContext(tuple(b for b in bits if b < 32), input_bits)
        self._bn_rows_hooks = CleanRowsBatchNorm(self._ctx)
        self._bits = bits[0]
        self._guard = _BitsGuard()
        self._warned_uncalled: tuple[str, ...] = ()
        self._detached = False
        self._taps = FeatureTaps(layers)
        self._handles: list = []
        modules = dict(model.named_modules())
        self.quantizers = nn.ModuleDict(
            {
                _key(name): LayerQuantizer(
                    self._ctx, weights, n, momentum, device=_device_of(modules[name])
                )
                for name, (weights, n) in points.items()
            }
        )
        self.bn_stats = nn.ModuleDict()
        if self.per_bit_bn and self._ctx.qbits:
            for name, m in model.named_modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                    self.bn_stats[_key(name)] = BatchNormStats(self._ctx, m)
        self._attach(points)
        self.training = model.training  # the wrapper starts in the model's mode
        self.set_bits(bits[0])
        if self.lambda_fdp > 0 and not layers:
            warnings.warn(_fdp_off_message(model, self.lambda_fdp), UserWarning, stacklevel=2)

    # --- hooks -------------------------------------------------------------------------
    def _attach(self, points: dict) -> None:
        modules = dict(self.model.named_modules())
        for name in points:
            q, m = self.quantizers[_key(name)], modules[name]
            self._handles.append(m.register_forward_pre_hook(q.pre_hook, with_kwargs=True))
            self._handles.append(
                m.register_forward_hook(q.post_hook, with_kwargs=True, always_call=True)
            )
            for path, pname in q.weights:
                owner = _weight_owner(m, path)
                if weight_access(owner, pname) == "parametrized":
                    plist = owner.parametrizations[pname]
                    self._handles.append(plist.register_forward_hook(q.weight_hook))
        for name, m in modules.items():
            tracked = isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            if self.bn_rows == "clean" and tracked:  # before `stats`: it swaps back after
                rows = self._bn_rows_hooks
                pre, post = (functools.partial(h, name) for h in (rows.pre_hook, rows.post_hook))
                self._handles.append(m.register_forward_pre_hook(pre))
                self._handles.append(m.register_forward_hook(post, always_call=True))
            stats = self.bn_stats[_key(name)] if _key(name) in self.bn_stats else None
            if stats is None:
                continue
            self._handles.append(m.register_forward_pre_hook(stats.pre_hook))
            self._handles.append(m.register_forward_hook(stats.post_hook, always_call=True))
        floor = self.input_bits
        if floor is not None and any(b < floor for b in self._ctx.qbits):
            ctx = self._ctx  # the model's own input: held for the layers' pre-hooks
            self._handles.append(
                self.model.register_forward_pre_hook(
                    ctx.record_input, with_kwargs=True, prepend=True
                )
            )
            self._handles.append(
                self.model.register_forward_hook(
                    ctx.forget_input, with_kwargs=True, always_call=True
                )
            )
        for name in self.layers:
            hook = functools.partial(self._taps.hook, name)
            self._handles.append(modules[name].register_forward_hook(hook))
        logits = functools.partial(_loss_logits_hook, self._ctx)
        self._handles.append(self.model.register_forward_hook(logits))

    def detach(self) -> None:
        """Remove every hook from the model; idempotent.

        Afterwards the model's outputs, ``state_dict()`` and hook dictionaries
        are exactly those of the unwrapped model, and this wrapper refuses to run.
        """
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._detached = True

    def __enter__(self) -> TriQDefWrapper:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    # --- bit-widths --------------------------------------------------------------------
    @property
    def current_bits(self) -> int:
        """The active bit-width (a mode, like ``training``: not saved in checkpoints)."""
        return self._bits

    def _check_bits_arg(self, bits) -> None:
        if isinstance(bits, bool) or not isinstance(bits, int) or bits not in self.bits:
            raise ConfigError(f"bit-width {bits!r} is not one of this wrapper's bits {self.bits}")

    def set_bits(self, bits: int) -> TriQDefWrapper:
        """Make ``bits`` the active bit-width; returns ``self``.

        The bit-width is one mode of the whole wrapper, shared by every thread (its
        hooks also swap the shared weights during a forward), so a wrapper serves one
        thread at a time. While another thread is inside
        [`at_bits`][triqdef.TriQDefWrapper.at_bits],
        [`calibrate`][triqdef.TriQDefWrapper.calibrate] or
        [`loss`][triqdef.TriQDefWrapper.loss], this raises instead of switching that
        thread's bit-width under it; give each thread its own ``copy.deepcopy(wrapper)``.

        Raises:
            ConfigError: ``bits`` is not one of the wrapper's bit-widths.
            ConcurrentUseError: another thread holds the bit-width; nothing is changed.
        """
        self._check_bits_arg(bits)
        self._guard.check("set_bits", self._bits)
        self._bits = int(bits)
        self._ctx.index = self._ctx.qbits.index(bits) if bits < 32 else None
        return self

    @contextlib.contextmanager
    def at_bits(self, bits: int) -> Iterator[TriQDefWrapper]:
        """Context manager: run at ``bits`` inside the block, restore the previous one after.

        The block holds the wrapper's bit-width for the calling thread: ``at_bits``,
        ``set_bits``, ``calibrate`` or ``loss`` from another thread meanwhile raises
        ``ConcurrentUseError`` (a ``RuntimeError``; it changes nothing) instead of
        running one thread at the other's bit-width. Nesting in one thread is fine, and
        so is a backward inside the block (even one the autograd engine runs on its own
        thread). A plain ``wrapper(x)`` is not checked: from another thread it runs at
        whatever bit-width is active. A wrapper is not thread-safe: give each thread
        its own ``copy.deepcopy(wrapper)``.

        Raises:
            ConfigError: ``bits`` is not one of the wrapper's bit-widths.
            ConcurrentUseError: another thread holds the bit-width.
        """
        self._check_bits_arg(bits)
        with self._guard.hold("at_bits", self._bits):
            previous = self._bits
            self.set_bits(bits)
            try:
                yield self
            finally:
                self.set_bits(previous)

    # --- running -----------------------------------------------------------------------
    def _check_attached(self) -> None:
        if self._detached:
            raise DetachedError("this TriQDefWrapper was detached; wrap the model again to use it")

    def forward(self, x, y: torch.Tensor | None = None, patch=None, **kwargs):
        """Run the model at the active bit-width, or return the TriQDef loss.

        ``wrapper(x)`` returns the model's output at the active bit-width;
        ``wrapper(x, y, patch)`` returns ``wrapper.loss(x, y, patch)``, so that
        ``DistributedDataParallel(wrapper)(x, y, patch)`` synchronises the loss's
        gradients.
        """
        self._check_attached()
        if y is None:
            if patch is not None:
                raise ConfigError("wrapper(x, patch=...) needs labels: call wrapper(x, y, patch)")
            return self.model(x, **kwargs)
        return self.loss(x, y, patch)

    @property
    def penalty_bits(self) -> int | None:
        """How many active bit-widths each `loss` call samples for FDP and GPDP.

        Default 2; ``None``: all of them (the exact objective). Assignable between
        steps (e.g. ``wrapper.penalty_bits = None`` for a final exact phase); a value
        other than ``None`` or an int ``>= 2`` raises
        [`ConfigError`][triqdef.errors.ConfigError] and leaves the previous value.
        """
        return self._penalty_bits

    @penalty_bits.setter
    def penalty_bits(self, m: int | None) -> None:
        self._penalty_bits = _check_penalty_bits(m)

    def set_active_bits(self, bits: Iterable[int]) -> TriQDefWrapper:
        """Choose the bit-widths that :meth:`loss` trains (a subset of ``bits``)."""
        try:
            chosen = tuple(sorted(set(bits), reverse=True))
        except TypeError:
            raise ConfigError(f"active bits must be a set of bit-widths, got {bits!r}") from None
        unknown = [b for b in chosen if isinstance(b, bool) or not isinstance(b, int)]
        unknown += [b for b in chosen if b not in self.bits]
        if not chosen or unknown:
            raise ConfigError(
                f"active bits must be a non-empty subset of {self.bits}, got {tuple(bits)}"
            )
        self.active_bits = chosen
        return self

    def loss(
        self, x: torch.Tensor, y: torch.Tensor, patch: torch.Tensor | PatchSource | None = None
    ) -> torch.Tensor:
        """The TriQDef training loss over the active bit-widths.

        ``L = L_clean + lambda_adv * L_adv + lambda_fdp * L_FDP + lambda_gpdp * L_GPDP``

        The last ``round(rho * B)`` samples are patched (``x * (1 - M) + P * M``),
        the rest stay clean; each active bit-width runs one forward over that
        mixed batch. ``L_clean`` / ``L_adv`` are the cross-entropies of the clean /
        patched rows averaged over bit-widths; FDP compares the tapped ``layers``
        and GPDP the input gradients of the patched rows across bit-width pairs
        (see :mod:`triqdef.losses` and :mod:`triqdef.objective`). Penalties with
        weight 0 cost nothing: no taps, no double backward. With ``lambda_cos`` /
        ``lambda_smooth`` > 0 the loss adds ``lambda_cos * L_cos + lambda_smooth *
        L_smooth`` (GAL/TRS-style gradient diversity, computed from the same input
        gradients as GPDP).

        With ``memory_bounded=True`` the returned loss's backward re-runs one
        bit-width at a time with the other bit-widths' descriptors detached, which
        gives the same gradients with one double-backward graph alive at a time,
        at the price of a second forward pass per bit-width; ``backward(retain_graph=True)``
        works in both modes (a second backward accumulates the same gradients again).

        Under ``torch.no_grad()`` the loss is computed as in training (observers,
        BatchNorm statistics and [`loss_terms`][triqdef.TriQDefWrapper.loss_terms] move)
        and returned without a graph; under ``torch.inference_mode()`` it raises
        ``InputError`` before anything changes.

        With ``penalty_bits=m`` (fewer than the active bit-widths), the penalties are
        an unbiased estimate over the pairs of ``m`` bit-widths drawn for this call
        (the cross-entropy terms stay over every active bit-width); the memory-bounded
        backward reuses the same draw.

        The model may return its logits ``(B, K)`` directly, or inside a tuple or
        namedtuple (the first item is used: torchvision's ``GoogLeNetOutputs`` and
        ``InceptionOutputs`` give their main logits, the auxiliary ones are ignored),
        inside a mapping (its ``"logits"`` entry, e.g. a Hugging Face ``ModelOutput``,
        else its ``"out"`` entry), or as ``(B, K, 1, 1)`` (squeezed). ``wrapper(x)``
        still returns what the model returns.

        Args:
            x: images ``(B, C, H, W)`` on the model's device.
            y: class indices ``(B,)`` of any integer dtype (used as int64).
            patch: ``None`` (the wrapper's ``patch_source``), one patch ``(C, h, w)``
                placed at a random location per sample, a batch ``(N, C, h, w)``
                (one drawn per patched sample), or a patch source
                ``callable(x, y, wrapper) -> x_adv``.

        Returns:
            Scalar loss. :meth:`loss_terms` gives its breakdown.

        Raises:
            InputError: bad shapes, devices, labels out of range or not integers,
                images of another dtype than the model's parameters (outside
                autocast), NaN/Inf in ``x`` or the patch, a model output that holds no
                ``(B, K)`` logits (e.g. ``(B, K, H, W)`` segmentation scores), or a call
                under ``torch.inference_mode()``; nothing is changed.
            NonFiniteLossError: a term is NaN/Inf; nothing is changed.
            ConcurrentUseError: another thread holds the bit-width (see
                [`at_bits`][triqdef.TriQDefWrapper.at_bits]); nothing is changed.
        """
        from .objective import triqdef_loss

        with self._guard.hold("loss", self._bits):
            return triqdef_loss(self, x, y, patch)

    def loss_terms(self) -> dict[str, float]:
        """Breakdown of the last :meth:`loss` as plain floats (synchronises only when called).

        Keys: ``total``, ``clean``, ``adv``, ``clean/<b>``, ``adv/<b>`` per bit-width,
        ``fdp``, ``gpdp``, ``cos``, ``smooth`` (when on) and ``fdp/<b_i>-<b_j>``,
        ``gpdp/<b_i>-<b_j>``, ``cos/<b_i>-<b_j>``: the similarity of each pair (summed
        over tapped layers for FDP; the sample-mean ``|cos|`` of the input gradients
        for ``cos``). When
        ``penalty_bits`` drew a subset of the active bit-widths, only the sampled pairs
        appear, and ``penalty_bits/<b>`` is 1.0 for each sampled bit-width and 0.0
        for the others (its running mean is the inclusion rate, ``m / K``).
        """
        if not self._last_terms:
            return {}
        names = list(self._last_terms)
        values = torch.stack([t.float() for t in self._last_terms.values()]).tolist()
        return dict(zip(names, values))

    def features(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Run the model at the active bit-width and return the tapped outputs.

        In training mode the observers learn from this forward as from any other
        (a batch holding NaN or Inf is skipped by every observer it reaches).

        Returns:
            ``{layer name: output}`` for every name in ``layers``; nothing is kept
            after the call.

        Raises:
            InputError: the first argument is not a tensor, or a tensor argument is not
                on the model's device or (floating, outside autocast) not of its dtype.
        """
        self._check_attached()
        _check_feature_inputs(self, args, kwargs)
        with self._taps.capture():
            self.model(*args, **kwargs)
            return self._taps.pop()

    def quantized_layers(self) -> list[str]:
        """Names of the layers that are quantized below 32 bits."""
        return [n for n, _ in self.model.named_modules() if _key(n) in self.quantizers]

    def _layer_quantizers(self) -> list[LayerQuantizer]:
        """The quantizers in the order of ``quantized_layers()``."""
        return [self.quantizers[_key(n)] for n in self.quantized_layers()]

    def _observed(self) -> dict[str, list[bool]]:
        """Layer name -> whether its observers have seen data, per bit-width below 32."""
        k = len(self._ctx.qbits)
        return {
            n: [self.quantizers[_key(n)].calibrated(i) for i in range(k)]
            for n in self.quantized_layers()
        }

    def calibrated_bits(self) -> tuple[int, ...]:
        """Bit-widths whose observers have all seen data (32 bits needs none).

        Layers that never ran (see
        [`uncalled_layers`][triqdef.TriQDefWrapper.uncalled_layers]) do not count.
        A bit-width missing here raises
        [`NotCalibratedError`][triqdef.errors.NotCalibratedError] in evaluation until a
        training-mode forward at it or [`calibrate`][triqdef.TriQDefWrapper.calibrate].
        """
        rows = [row for row in self._observed().values() if any(row)]
        qbits = self._ctx.qbits
        ready = [bool(rows) and all(row[i] for row in rows) for i in range(len(qbits))]
        return tuple(b for b in self.bits if b == 32 or ready[qbits.index(b)])

    def uncalled_layers(self) -> list[str]:
        """Quantized layers that never ran: their observers have seen no data at any
        bit-width while other layers' have (e.g. an ``nn.Linear`` the model defines but
        its ``forward`` never calls).

        They do not hold back [`calibrated_bits`][triqdef.TriQDefWrapper.calibrated_bits]
        or [`export`][triqdef.TriQDefWrapper.export] (which leaves them in full
        precision, having no input range for them); ``calibrate`` and ``export`` warn
        once naming them. Keep such a layer out with ``exclude=[...]`` to silence the
        warning. Empty before any layer has seen data.
        """
        seen = {n: any(row) for n, row in self._observed().items()}
        return [n for n, s in seen.items() if not s] if any(seen.values()) else []

    def _warn_uncalled(self) -> list[str]:
        """Warn (once per set of layers) about layers that never ran; return them."""
        names = self.uncalled_layers()
        if names and tuple(names) != getattr(self, "_warned_uncalled", ()):
            self._warned_uncalled = tuple(names)
            warnings.warn(
                f"layers {names} never ran: their observers have seen no data at any "
                "bit-width while the other layers' have. calibrated_bits() ignores them and "
                "export() leaves them in full precision; call them in the model's forward, or "
                "keep them out with exclude=[...]",
                UserWarning,
                stacklevel=3,
            )
        return names

    @torch.no_grad()
    def calibrate(
        self, batches: Iterable, bits: Iterable[int] | None = None, observers: bool = True
    ) -> None:
        """Reset and re-estimate observers and BatchNorm statistics at ``bits``.

        Each batch (a tensor, or a tuple whose first item is the input) is run
        in training mode without gradients; BatchNorm statistics become the
        plain average over the batches. Weights are not touched. If anything
        fails, every statistic is restored to what it was. Finite batches whose
        activations overflow (e.g. ``x * 3e38``) fail the call when NaN or Inf reaches
        a quantized layer's input (its observers would skip that batch) or the
        BatchNorm statistics being estimated. Layers the batches never reach are
        reported once in a warning (see
        [`uncalled_layers`][triqdef.TriQDefWrapper.uncalled_layers]).

        Args:
            batches: an iterable of inputs, e.g. a few batches of a held-out loader.
            bits: bit-widths to calibrate (default: every bit-width below 32).
            observers: also reset and re-estimate the activation observers (default).
                With ``False`` only the BatchNorm statistics are re-estimated and every
                observer buffer is left exactly as it was; each of ``bits`` must then be
                calibrated already
                ([`calibrated_bits`][triqdef.TriQDefWrapper.calibrated_bits]).

        Raises:
            ConfigError: ``bits``, ``observers`` or ``batches`` is not valid.
            InputError: a batch is not a valid input, the model fails on it, or NaN or
                Inf reached a quantized layer's input or a BatchNorm statistic (the
                message names them).
            NotCalibratedError: ``observers=False`` for a bit-width whose observers
                have never seen data. Nothing is changed.
            ConcurrentUseError: another thread holds the bit-width. Nothing is changed.
        """
        self._check_attached()
        if not isinstance(observers, bool):
            raise ConfigError(f"observers must be True or False, got {observers!r}")
        try:
            targets = [b for b in (self._ctx.qbits if bits is None else bits)]
        except TypeError:
            raise ConfigError(f"bits must be a sequence of bit-widths, got {bits!r}") from None
        for b in targets:
            if isinstance(b, bool) or not isinstance(b, int) or b not in self.bits:
                raise ConfigError(f"bit-width {b!r} is not one of this wrapper's bits {self.bits}")
        missing = [] if observers else [b for b in targets if b not in self.calibrated_bits()]
        if missing:
            raise NotCalibratedError(
                f"calibrate(observers=False) keeps the observers, but those of {missing} bits "
                "have never seen data; calibrate them with observers=True first"
            )
        if not targets:  # e.g. a 32-bit-only wrapper: nothing to estimate
            return
        try:
            batches = [(b[0] if isinstance(b, (tuple, list)) else b) for b in batches]
        except TypeError:
            raise ConfigError(
                f"calibrate() needs an iterable of batches, got {batches!r}"
            ) from None
        if not batches:
            raise ConfigError("calibrate() got no batches")
        _check_calibration_batches(self, batches)
        with self._guard.hold("calibrate", self._bits):
            self._calibrate(batches, targets, observers)
        self._warn_uncalled()

    def _calibrate(self, batches: list, targets: list[int], observers: bool) -> None:
        params = {k for k, _ in self.named_parameters()}
        saved = {k: v.clone() for k, v in self.state_dict().items() if k not in params}
        bns = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        momenta = [m.momentum for m in bns]
        was_training, previous, observing = self.training, self._bits, self._ctx.observe
        names = {id(q): n for n, q in zip(self.quantized_layers(), self._layer_quantizers())}
        try:
            self.train()
            self._ctx.observe = observers  # False: the observers see nothing, move nothing
            self._ctx.finite_log = []
            for m in bns:
                m.momentum = None  # cumulative average over the calibration batches
                if 32 in targets or not self.bn_stats:  # the model's own statistics
                    m.reset_running_stats()
            for b in targets:
                self.set_bits(b)
                if b < 32:
                    resets = (*self.quantizers.values(),) if observers else ()
                    for module in (*resets, *self.bn_stats.values()):
                        module.reset(self._ctx.index)
                for i, x in enumerate(batches):
                    try:
                        self.model(x)
                    except Exception as exc:  # the model rejects this input: say which
                        raise InputError(
                            f"calibrate: the model failed on batch {i} at {b} bits "
                            f"({type(exc).__name__}: {exc}); statistics restored"
                        ) from exc
                checks = [(f"input of {names[id(q)]!r}", ok) for q, _, ok in self._ctx.finite_log]
                self._ctx.finite_log.clear()
                bad = _failed(checks + self._bn_finite(b))
                if bad:
                    raise InputError(
                        f"calibrate: at {b} bits NaN or Inf came out of finite batches in: "
                        f"{', '.join(bad)}. The model's activations overflow (e.g. inputs "
                        "scaled far beyond the training data); calibrate with data like the "
                        "training data. Statistics restored"
                    )
        except BaseException:
            # the wrapper's own statistics: restore them without the value checks
            nn.Module.load_state_dict(self, saved, strict=False)
            raise
        finally:
            self._ctx.finite_log = None
            for m, mom in zip(bns, momenta):
                m.momentum = mom
            self._ctx.observe = observing
            self.train(was_training)
            self.set_bits(previous)

    def _bn_finite(self, bits: int) -> list[tuple[str, torch.Tensor]]:
        """``(label, all finite)`` for the BatchNorm statistics ``bits`` runs with."""
        out = []
        for name, m in self.model.named_modules():
            if not isinstance(m, nn.modules.batchnorm._BatchNorm) or m.running_mean is None:
                continue
            stats = self.bn_stats[_key(name)] if _key(name) in self.bn_stats else None
            if bits < 32 and stats is not None:
                i = self._ctx.qbits.index(bits)
                mean, var = stats.running_mean[i], stats.running_var[i]
            else:
                mean, var = m.running_mean, m.running_var
            ok = torch.isfinite(mean).all() & torch.isfinite(var).all()
            out.append((f"the BatchNorm statistics of {name!r}", ok))
        return out

    def extra_repr(self) -> str:
        return (
            f"bits={self.bits}, current_bits={self._bits}, active_bits={self.active_bits}, "
            f"layers={list(self.layers)}, exclude={list(self.exclude)}, "
            f"per_bit_bn={self.per_bit_bn}, bn_rows={self.bn_rows!r}, "
            f"input_bits={self.input_bits}, lambda_adv={self.lambda_adv}, "
            f"lambda_fdp={self.lambda_fdp}, lambda_gpdp={self.lambda_gpdp}, alpha={self.alpha}, "
            f"beta={self.beta}, rho={self.rho}, pairs={self.pairs!r}, "
            f"penalty_bits={self.penalty_bits}"
            + (f", lambda_cos={self.lambda_cos}" if self.lambda_cos else "")
            + (f", lambda_smooth={self.lambda_smooth}" if self.lambda_smooth else "")
            + (", memory_bounded=True" if self.memory_bounded else "")
            + (", detached" if self._detached else "")
        )

    # --- state -------------------------------------------------------------------------
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Like ``nn.Module.load_state_dict``, but checks everything before copying anything.

        Keys (when ``strict``), types, shapes, dtypes and the values of observers and
        BatchNorm statistics are checked first, as
        [`check_state_dict`][triqdef.io.check_state_dict] describes: a tensor of another
        kind (an integer tensor for float weights), a value that is not a tensor, NaN/Inf
        observers or BatchNorm statistics, a negative running variance or an out-of-range
        observer kind is refused, so a failed load leaves the wrapper unchanged. Within
        a kind, dtypes are cast as ``nn.Module.load_state_dict`` does; with
        ``assign=True`` (the tensors become the wrapper's) they must match exactly.

        Args:
            state_dict (Mapping[str, torch.Tensor]): a mapping from keys of
                ``state_dict()`` to tensors.
            strict: require exactly this wrapper's keys.
            assign: keep the given tensors instead of copying into the existing ones.

        Returns:
            keys (NamedTuple): ``missing_keys`` and ``unexpected_keys``, as
                ``nn.Module.load_state_dict`` returns them (both empty when ``strict``).

        Raises:
            InputError: ``state_dict`` is not a mapping with str keys.
            CheckpointError: ``state_dict`` does not fit this wrapper; nothing is changed.
        """
        from .io import check_state_dict

        check_state_dict(self, state_dict, strict=strict, exact_dtype=bool(assign))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def export(self, bits: int) -> nn.Module:
        """A standalone copy of the model that runs at ``bits`` without any triqdef hook.

        The copy holds already-quantized weights, the ``bits``-bit BatchNorm
        statistics and fixed input quantizers, is in eval mode, reproduces this
        wrapper's eval-mode output at ``bits`` and is accepted by
        ``torch.export.export``. See :func:`triqdef.export.export_model`.

        A weight computed by a parametrization (``weight_norm``, ``spectral_norm``, new
        or old style) is stored in the copy as a plain quantized parameter (its
        eval-mode value). Layers that never ran
        ([`uncalled_layers`][triqdef.TriQDefWrapper.uncalled_layers]) are left in full
        precision, with a warning. The wrapper is not modified.
        """
        from .export import export_model

        self._check_attached()
        if isinstance(bits, bool) or bits not in self.bits:
            return export_model(self, bits)  # its ConfigError
        idle = self._warn_uncalled() if bits < 32 else []
        computed = [
            (_weight_owner(self.model.get_submodule(n), path), n, path, pname)
            for n, q in zip(self.quantized_layers(), self._layer_quantizers())
            for path, pname in q.weights
        ]
        computed = [c for c in computed if weight_access(c[0], c[3]) != "parameter"]
        if not idle and not computed:
            return export_model(self, bits)
        # An old-style weight_norm attribute computed with grad is not a leaf, which
        # deepcopy refuses: the copy gets its value (recomputed before any forward anyway).
        memo = {
            id(t): t.detach().clone()
            for owner, *_, pname in computed
            if isinstance(t := owner.__dict__.get(pname), torch.Tensor)
        }
        if bits == 32:  # the model as it is; only an old-style attribute needs the copy
            return export_model(copy.deepcopy(self, memo) if memo else self, bits)
        twin = copy.deepcopy(self, memo)  # this wrapper stays as it is
        twin.model.eval()  # spectral_norm: the eval-mode weight, no power iteration
        for name in idle:  # no quantizer: left in full precision (its hooks go with export's)
            del twin.quantizers[_key(name)]
        for _, name, path, pname in computed:
            _materialize(_weight_owner(twin.model.get_submodule(name), path), pname)
        return export_model(twin, bits)

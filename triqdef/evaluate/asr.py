"""Attack success rates: clean accuracy, ASR counts, transfer matrices, per-condition tables."""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from .._checks import (
    check_dtype,
    check_label_range,
    check_max_batches,
    check_target,
    is_label_dtype,
    label_dtype_error,
    label_range_error,
    labels_out_of_range,
    model_device,
    model_dtype,
)
from ..errors import InputError
from ..patches import apply_patch
from ..wrapper import TriQDefWrapper
from .reports import TransferMatrix, _bits_label, _fmt, _fmt_pct, _rate
from .session import _batches, _Evaluated, _PerBitEvaluated

__all__ = [
    "asr_by_condition",
    "asr_counts",
    "attack_success_rate",
    "clean_accuracy",
    "transfer_matrix",
]


def _counts(
    logits_clean: Tensor | None, logits_adv: Tensor, y: Tensor, target: Tensor | None
) -> tuple[Tensor, Tensor]:
    """(successes, eligible) as 0-dim device tensors (no host sync).

    A row with a NaN or Inf logit is never a success for the model: never correct when
    clean (so not eligible), and always a success for the attack when patched.
    """
    pred_adv = logits_adv.argmax(dim=1)
    broken = ~torch.isfinite(logits_adv).all(dim=1)
    if target is None:
        clean = cast(Tensor, logits_clean)  # the callers pass it for an untargeted ASR
        eligible = (clean.argmax(dim=1) == y) & torch.isfinite(clean).all(dim=1)
        success = eligible & ((pred_adv != y) | broken)
    else:
        eligible = y != target
        success = eligible & ((pred_adv == target) | broken)
    return success.sum(), eligible.sum()


def clean_accuracy(
    wrapper_or_model: TriQDefWrapper | nn.Module,
    loader: Iterable,
    bits: Sequence[int] | int | None = None,
    mean: Sequence[float] | Tensor | None = None,
    std: Sequence[float] | Tensor | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    max_batches: int | None = None,
) -> dict[int, float]:
    """Top-1 accuracy on clean images at each bit-width.

    The loader is read once; each batch is evaluated at every bit-width, in eval mode
    and without gradients. Modes and the active bit-width are restored afterwards.

    Args:
        wrapper_or_model: a [`TriQDefWrapper`][triqdef.TriQDefWrapper], or a plain ``nn.Module``
            (which counts as 32 bits).
        loader: any iterable of ``(x, y)`` batches (a ``DataLoader``, a list of tuples),
            images in [0, 1].
        bits: bit-widths to evaluate (default: all of ``wrapper.bits``; ``(32,)`` for a
            plain module).
        mean: per-channel mean subtracted before the model (``None``: no shift).
        std: per-channel standard deviation divided out before the model (``None``: 1).
        device: where to run: the model's device (the default), named as a
            ``torch.device``, a string or a CUDA index; the model is not moved.
        progress: show a tqdm progress bar over batches.
        max_batches: stop after this many batches (default: the whole loader).

    Returns:
        ``{bits: accuracy in [0, 1]}`` in the order of ``bits``.

    Raises:
        InputError: empty loader, malformed batch (including one on the meta device,
            images holding NaN/Inf or of another dtype than the model's parameters,
            labels outside the model's classes), bits other than 32 for a plain module,
            a ``device`` this machine does not have or that is not the model's.
        ConfigError: a bit-width that the wrapper does not have.

    Shape:
        - x: ``(B, C, H, W)``, y: ``(B,)`` per batch (any integer dtype)

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        >>> data = [(torch.rand(5, 1, 2, 2), torch.zeros(5, dtype=torch.long))]
        >>> list(clean_accuracy(net, data))
        [32]
    """
    ev = _Evaluated("clean_accuracy", wrapper_or_model, mean, std, device)
    bits = ev.check_bits(bits, "bits")
    max_batches = check_max_batches(max_batches)
    correct = {b: torch.zeros((), dtype=torch.long, device=ev.device) for b in bits}
    total = 0
    batches = contextlib.closing(
        _batches(loader, ev.device, max_batches, progress, "clean_accuracy", ev.dtype)
    )
    with ev.session(), torch.no_grad(), batches as stream:
        for x, y in stream:
            for i, b in enumerate(bits):
                logits = ev.logits(x, b)  # a row with NaN/Inf is never correct
                if i == 0:  # eval mode: that forward changed nothing
                    k = logits.shape[1]
                    bad_x = ~torch.isfinite(x).all()
                    if bool(bad_x | labels_out_of_range(y, k)):  # one host sync per batch
                        if bool(bad_x):
                            raise InputError(
                                "clean_accuracy: x contains NaN or Inf (batch of shape "
                                f"{tuple(x.shape)})"
                            )
                        raise label_range_error("clean_accuracy", y, k)
                correct[b] += ((logits.argmax(dim=1) == y) & torch.isfinite(logits).all(1)).sum()
            total += y.shape[0]
    return {b: int(correct[b]) / total for b in bits}


def asr_counts(
    logits_clean: Tensor | None,
    logits_adv: Tensor,
    y: Tensor,
    target: int | Tensor | None = None,
) -> tuple[int, int]:
    """Attack-success counts of one batch, from logits.

    Untargeted ASR = among samples correctly classified when clean (at the target
    bit-width), the share misclassified when patched. Targeted ASR = among samples whose
    label is not the target, the share predicted as the target.

    So with ``target=None`` the eligible samples are those whose clean prediction is
    right, and a success is an eligible sample whose patched prediction is wrong; with a
    target, the eligible samples are those whose label differs from it, and a success is
    an eligible sample predicted as the target (``logits_clean`` is then unused and may
    be ``None``). ASR is ``successes / eligible``.

    Args:
        logits_clean: logits on the clean images, at the bit-width being attacked.
        logits_adv: logits on the patched images, same bit-width.
        y: true labels.
        target: ``None`` (untargeted), one class index, or one per sample.

    Returns:
        ``(successes, eligible)`` as Python ints.

    Raises:
        InputError: shapes disagree, labels or target outside ``[0, classes)``.

    Shape:
        - logits_clean, logits_adv: ``(B, K)``
        - y: ``(B,)``; target: int or ``(B,)``

    Example:
        >>> clean = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
        >>> adv = torch.tensor([[0.0, 0.0, 3.0], [0.0, 0.0, 3.0]])
        >>> asr_counts(clean, adv, torch.tensor([0, 1]), target=2)
        (2, 2)
    """
    fn = "asr_counts"
    for name, t in (("logits_clean", logits_clean), ("logits_adv", logits_adv)):
        if t is None and name == "logits_clean" and target is not None:
            continue
        if not isinstance(t, Tensor) or t.ndim != 2 or t.shape[1] == 0:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise InputError(f"{fn}: {name} must be a (B, classes) tensor, got {got}")
    b, k = logits_adv.shape
    if logits_clean is not None and logits_clean.shape != logits_adv.shape:
        raise InputError(
            f"{fn}: logits_clean {tuple(logits_clean.shape)} and logits_adv "
            f"{tuple(logits_adv.shape)} differ in shape"
        )
    if not isinstance(y, Tensor) or not is_label_dtype(y.dtype):
        raise label_dtype_error(f"{fn}: y", y)
    if y.shape != (b,):
        raise InputError(f"{fn}: y must have shape ({b},) like the logits, got {tuple(y.shape)}")
    y = y.to(logits_adv.device).long()
    check_label_range(fn, y, k)
    t = None if target is None else check_target(fn, target, y, k)
    if target is None and logits_clean is None:
        raise InputError(f"{fn}: an untargeted ASR needs logits_clean")
    s, e = _counts(logits_clean, logits_adv, y, t)
    return int(s), int(e)


def attack_success_rate(
    model: TriQDefWrapper | nn.Module,
    x_clean: Tensor,
    x_adv: Tensor,
    y: Tensor,
    target: int | Tensor | None = None,
    *,
    bits: int | None = None,
    mean: Sequence[float] | Tensor | None = None,
    std: Sequence[float] | Tensor | None = None,
) -> tuple[int, int]:
    """Attack-success counts of one batch of images (see `asr_counts`).

    Untargeted ASR = among samples correctly classified when clean (at the target
    bit-width), the share misclassified when patched. Targeted ASR = among samples
    whose label is not the target, the share predicted as the target.

    The model runs in eval mode without gradients, at ``bits`` (default: the wrapper's
    active bit-width); modes and the active bit-width are restored afterwards.

    Args:
        model: a [`TriQDefWrapper`][triqdef.TriQDefWrapper] or a plain ``nn.Module``
            returning logits.
        x_clean: clean images in [0, 1].
        x_adv: patched images in [0, 1].
        y: true labels.
        target: ``None`` (untargeted), one class index, or one per sample.
        bits: bit-width to evaluate at (wrapper only; default: the active one).
        mean: per-channel mean subtracted before the model.
        std: per-channel standard deviation divided out before the model.

    Returns:
        ``(successes, eligible)``; the ASR is their ratio.

    Raises:
        InputError: shapes disagree, images not on the model's device or of another
            dtype than its parameters, labels or target outside the model's classes.
        ConfigError: ``bits`` is not one of the wrapper's bit-widths.

    Shape:
        - x_clean, x_adv: ``(B, C, H, W)``
        - y: ``(B,)``; target: int or ``(B,)``
    """
    fn = "attack_success_rate"
    for name, t in (("x_clean", x_clean), ("x_adv", x_adv)):
        if not isinstance(t, Tensor) or t.ndim != 4 or not t.is_floating_point():
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise InputError(f"{fn}: {name} must be a floating (B, C, H, W) tensor, got {got}")
    if x_clean.shape != x_adv.shape:
        raise InputError(
            f"{fn}: x_clean {tuple(x_clean.shape)} and x_adv {tuple(x_adv.shape)} differ in shape"
        )
    if isinstance(model, nn.Module):
        has_state = next(model.parameters(), None) is not None
        has_state = has_state or next(model.buffers(), None) is not None
        home = model_device(model) if has_state else None
        for name, t in (("x_clean", x_clean), ("x_adv", x_adv)):
            if t.device.type == "meta":
                raise InputError(f"{fn}: {name} is on the meta device, which holds no data")
            if home is not None and t.device != home:
                raise InputError(f"{fn}: {name} is on {t.device} but the model is on {home}")
            check_dtype(t, model_dtype(model), name, f"{fn}: ")
    ev = _Evaluated(fn, model, mean, std, x_clean.device)
    b = ev.wrapper.current_bits if (bits is None and ev.wrapper is not None) else bits
    b = 32 if b is None else ev.check_bit(b)
    with ev.session(), torch.no_grad():
        clean = ev.logits(x_clean, b) if target is None else None
        adv = ev.logits(x_adv, b)
    return asr_counts(clean, adv, y, target)


def _attack_name(attack: object) -> str:
    name = getattr(attack, "name", None)
    return name if isinstance(name, str) and name else type(attack).__name__


def transfer_matrix(
    wrapper: TriQDefWrapper | nn.Module | Mapping[int, nn.Module],
    make_attack: Callable[[Any, int], Any],
    loader: Iterable,
    source_bits: Sequence[int] | None = None,
    target_bits: Sequence[int] | None = None,
    mean: Sequence[float] | Tensor | None = None,
    std: Sequence[float] | Tensor | None = None,
    max_batches: int | None = None,
    progress: bool = False,
    *,
    device: torch.device | str | None = None,
    seed: int | None = None,
) -> TransferMatrix:
    """Cross-bit transfer of a patch attack: craft at each source, evaluate at each target.

    For every batch and every source bit-width ``s``, the attack built by
    ``make_attack(wrapper, s)`` (once per source, before the first batch) crafts patched
    images ``x_adv = attack(x, y)``; those same images are then classified at every
    target bit-width ``t``, and counted with the ASR definitions of `triqdef.evaluate`: untargeted
    ASR = among samples correctly classified when clean (at the target bit-width), the
    share misclassified when patched; targeted ASR = among samples whose label is not the
    target, the share predicted as the target. The diagonal is therefore exactly the
    direct attack's ASR at that bit-width.

    Noise floor: for each source, ``apply_patch(x, U, attack.locations, mask=attack.mask)``
    with ``U`` uniform noise shaped like ``attack.patch`` (same size, same locations, and
    the same shape for an attack with a mask, such as [`DPR`][triqdef.attacks.DPR]) is
    evaluated at every target with the same definition; counts are pooled over the
    sources.

    The attack protocol: ``attack(x, y)`` returns patched images like ``x``; afterwards
    ``attack.patch`` holds the patch(es) ``(C, h, w)`` or ``(B, C, h, w)``,
    ``attack.locations`` their ``(B, 2)`` top-left corners (``None``: random locations
    for the noise patch) and, if the attack has one, ``attack.mask`` their shape
    ``(B | 1, 1, h, w)`` (``None`` or absent: the whole box); ``attack.targeted`` and
    ``attack.target`` say whether and where it aims. The attack is called with
    gradients enabled, the model in eval mode and the wrapper set to ``s``; the model
    is put back in eval mode after each call.

    Args:
        wrapper: a [`TriQDefWrapper`][triqdef.TriQDefWrapper] (a plain ``nn.Module`` gives a 1 x 1
            matrix at 32 bits), or a mapping ``{bits: model}`` of separately trained
            models, one per bit-width (e.g. per-bit QAT): then the attack of source ``s``
            runs on ``models[s]`` and target ``t`` is evaluated on ``models[t]``, so every
            off-diagonal cell is a transfer between two models.
        make_attack: factory ``make_attack(model, bits) -> attack`` (``model`` is the
            wrapper, or ``models[bits]`` for a mapping), e.g.
            ``lambda m, b: LAVAN(m, patch_size=6, bits=b, steps=40)``.
        loader: iterable of ``(x, y)`` batches, images in [0, 1]; read once.
        source_bits: bit-widths to craft at (default: all of the wrapper's).
        target_bits: bit-widths to evaluate at (default: all of the wrapper's).
        mean: per-channel mean subtracted before the model (the attack gets raw images and
            its own ``mean``/``std``).
        std: per-channel standard deviation divided out before the model.
        max_batches: stop after this many batches.
        progress: show a tqdm progress bar over batches.
        device: where to run: the model's device (the default), named as a
            ``torch.device``, a string or a CUDA index; the model is not moved.
        seed: seed of the noise-floor patches (default: the global RNG).

    Returns:
        the [`TransferMatrix`][triqdef.evaluate.TransferMatrix].

    Raises:
        InputError: empty loader, malformed batch (images of another dtype than the
            model's parameters, labels outside its classes) or attack output, a target
            class outside the model's outputs, attacks that disagree on being targeted,
            a ``device`` this machine does not have or that is not the model's.
        ConfigError: a bit-width the wrapper does not have.

    Shape:
        - x: ``(B, C, H, W)`` in [0, 1], y: ``(B,)`` per batch
    """
    fn = "transfer_matrix"
    if not callable(make_attack):
        raise InputError(
            f"{fn}: make_attack must be a callable (model, bits) -> attack, got {make_attack!r}"
        )
    ev: _Evaluated | _PerBitEvaluated
    if isinstance(wrapper, Mapping):
        ev = _PerBitEvaluated(fn, wrapper, mean, std, device)
    else:
        ev = _Evaluated(fn, wrapper, mean, std, device)
    sources = ev.check_bits(source_bits, "source_bits")
    targets = ev.check_bits(target_bits, "target_bits")
    max_batches = check_max_batches(max_batches)
    gen = None
    if seed is not None:
        gen = torch.Generator(device=ev.device)
        gen.manual_seed(int(seed))

    n_s, n_t = len(sources), len(targets)
    zeros = functools.partial(torch.zeros, dtype=torch.long, device=ev.device)
    succ, elig = zeros(n_s, n_t), zeros(n_s, n_t)
    noise_succ, noise_elig = zeros(n_t), zeros(n_t)
    samples = 0
    batches = contextlib.closing(_batches(loader, ev.device, max_batches, progress, fn, ev.dtype))
    with ev.session(), batches as stream:
        attacks = {s: make_attack(ev.source_model(s), s) for s in sources}
        ev.module.eval()
        for s, attack in attacks.items():
            if not callable(attack):
                raise InputError(
                    f"{fn}: make_attack(model, {s}) returned {attack!r}, which is not callable"
                )
        flags = {bool(getattr(a, "targeted", False)) for a in attacks.values()}
        if len(flags) > 1:
            raise InputError(f"{fn}: the attacks disagree on being targeted")
        targeted = flags.pop()
        first = attacks[sources[0]]
        target = getattr(first, "target", None) if targeted else None
        if targeted and target is None:
            raise InputError(f"{fn}: a targeted attack must set attack.target")

        for x, y in stream:
            with torch.no_grad():
                clean = {t: ev.logits(x, t) for t in targets}
            k = clean[targets[0]].shape[1]
            check_label_range(fn, y, k)
            tgt = check_target(fn, target, y, k) if targeted else None
            for i, s in enumerate(sources):
                attack = attacks[s]
                x_adv = ev.call_source(attack, x, y, s, f"the {s}-bit attack")
                patch, locations = (
                    getattr(attack, "patch", None),
                    getattr(attack, "locations", None),
                )
                if not isinstance(patch, Tensor):
                    raise InputError(
                        f"{fn}: after attack(x, y), attack.patch must hold the crafted patch "
                        f"(a tensor), got {type(patch).__name__}"
                    )
                if gen is not None:
                    noise = torch.rand(patch.shape, generator=gen, device=ev.device)
                else:
                    noise = torch.rand(patch.shape, device=ev.device)
                if isinstance(locations, Tensor):
                    locations = locations.to(ev.device)
                mask = getattr(attack, "mask", None)  # a shaped patch's noise has its shape
                mask = mask.to(ev.device) if isinstance(mask, Tensor) else None
                x_noise = apply_patch(x, noise.to(x.dtype), locations, mask, generator=gen)
                with torch.no_grad():
                    for j, t in enumerate(targets):
                        ref = clean[t] if tgt is None else None
                        s_, e_ = _counts(ref, ev.logits(x_adv, t), y, tgt)
                        succ[i, j] += s_
                        elig[i, j] += e_
                        s_, e_ = _counts(ref, ev.logits(x_noise, t), y, tgt)
                        noise_succ[j] += s_
                        noise_elig[j] += e_
            samples += y.shape[0]

    succ_l, elig_l = succ.tolist(), elig.tolist()
    ns_l, ne_l = noise_succ.tolist(), noise_elig.tolist()
    single_target = None
    if targeted and isinstance(target, numbers.Integral) and not isinstance(target, bool):
        single_target = int(target)
    elif targeted and isinstance(target, Tensor) and target.numel() == 1:
        single_target = int(target)
    return TransferMatrix(
        source_bits=list(sources),
        target_bits=list(targets),
        asr=[[_rate(s, e) for s, e in zip(rs, re)] for rs, re in zip(succ_l, elig_l)],
        counts=[[(s, e) for s, e in zip(rs, re)] for rs, re in zip(succ_l, elig_l)],
        noise_floor=[_rate(s, e) for s, e in zip(ns_l, ne_l)],
        noise_counts=list(zip(ns_l, ne_l)),
        attack=_attack_name(first),
        targeted=targeted,
        target=single_target,
        samples=samples,
    )


def asr_by_condition(
    results: Mapping[str, TransferMatrix],
    seen: Callable[[str], bool] | Iterable[str] | None = None,
    reduce: str = "pooled",
    digits: int = 1,
) -> str:
    """One row per evaluation condition, one column per target bit-width (paper table 5).

    Each condition (e.g. ``"LAVAN 6x6"``, ``"LAVAN 8x8, 4-bit source (unseen)"``) is a
    [`TransferMatrix`][triqdef.evaluate.TransferMatrix] reduced to one ASR per target
    bit-width with [`TransferMatrix.per_target`][triqdef.evaluate.TransferMatrix.per_target].
    A condition is *unseen* when its patch size, location region or generation bit-width
    was not used to build the training pool; the caller decides which, with ``seen``. When
    ``seen`` is given, each row is labelled ``seen``/``unseen`` and three summary rows
    follow: the mean over seen conditions, the mean over unseen ones, and the gap
    ``unseen - seen`` in percentage points.

    Args:
        results: ``{condition name: matrix}``, in display order.
        seen: predicate ``name -> bool`` or a collection of the seen names.
        reduce: how a matrix becomes one row (see
            [`TransferMatrix.per_target`][triqdef.evaluate.TransferMatrix.per_target]).
        digits: decimals of the percentages.

    Returns:
        a markdown table; columns are the union of the target bit-widths (``n/a`` where a
        matrix lacks one).

    Example:
        >>> m = TransferMatrix([32], [32], [[0.5]], [[(1, 2)]], [0.0], [(0, 2)])
        >>> print(asr_by_condition({"6x6": m, "8x8": m}, seen={"6x6"}))
        | condition | setting | 32-bit |
        |---|---|---|
        | 6x6 | seen | 50.0 |
        | 8x8 | unseen | 50.0 |
        | mean (seen) | seen | 50.0 |
        | mean (unseen) | unseen | 50.0 |
        | gap (unseen - seen, pp) |  | 0.0 |
    """
    if not results:
        raise InputError("asr_by_condition: results is empty")
    for name, m in results.items():
        if not isinstance(m, TransferMatrix):
            raise InputError(
                f"asr_by_condition: {name!r} maps to {type(m).__name__}, not a TransferMatrix"
            )
    is_seen: Callable[[str], bool] | None
    if seen is None or callable(seen):
        is_seen = seen
    else:
        names = set(seen)
        is_seen = names.__contains__
    columns = sorted({t for m in results.values() for t in m.target_bits}, reverse=True)
    rows: dict[str, list[float]] = {}
    for name, m in results.items():
        values = dict(zip(m.target_bits, m.per_target(reduce)))
        rows[name] = [values.get(t, float("nan")) for t in columns]

    head = ["condition"] + (["setting"] if is_seen else []) + [_bits_label(t) for t in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def line(name: str, setting: str | None, values: list[float], pct: bool = True) -> None:
        cells = [name] + ([setting or ""] if is_seen else [])
        cells += [_fmt_pct(v, digits) if pct else _fmt(v, digits) for v in values]
        lines.append("| " + " | ".join(cells) + " |")

    def mean(group: list[list[float]]) -> list[float]:
        out = []
        for j in range(len(columns)):
            vals = [r[j] for r in group if not math.isnan(r[j])]
            out.append(sum(vals) / len(vals) if vals else float("nan"))
        return out

    for name, row in rows.items():
        line(name, None if is_seen is None else ("seen" if is_seen(name) else "unseen"), row)
    if is_seen is not None:
        s = mean([v for n, v in rows.items() if is_seen(n)])
        u = mean([v for n, v in rows.items() if not is_seen(n)])
        line("mean (seen)", "seen", s)
        line("mean (unseen)", "unseen", u)
        line("gap (unseen - seen, pp)", None, [100 * (b - a) for a, b in zip(s, u)], pct=False)
    return "\n".join(lines)

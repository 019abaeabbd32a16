"""`check_state_dict`: everything a state dict must be before a wrapper loads it."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .errors import CheckpointError, InputError
from .quant import _SIGNED, BatchNormStats, LayerQuantizer

__all__ = ["check_state_dict"]

_OBSERVERS = ("act_min", "act_max")


def _value_rules(wrapper) -> dict[str, str]:
    """Key -> what its values must be: observers, observer kinds and BatchNorm statistics
    (per-bit rows, and the model's own 32-bit statistics)."""
    rules: dict[str, str] = {}
    for name, m in wrapper.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(m, LayerQuantizer):
            rules.update({prefix + k: "observer" for k in _OBSERVERS})
            rules[prefix + "act_kind"] = "kind"
            if m.lsq:  # learned step sizes
                rules[prefix + "act_log_step"] = "step"
                n = len(m.weights)
                rules.update({f"{prefix}weight_log_steps.{j}": "step" for j in range(n)})
        elif isinstance(m, BatchNormStats) or (
            isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        ):
            rules[prefix + "running_mean"] = "mean"
            rules[prefix + "running_var"] = "variance"
            rules[prefix + "num_batches_tracked"] = "count"
    return rules


def _kind_of(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "floating-point"
    return "integer"


def _rows(mask: torch.Tensor) -> str:
    bad = torch.nonzero(mask.reshape(-1)).reshape(-1)[:5].tolist()
    return f"{int(mask.sum())} value(s), first at flat index {bad}"


def _value_problem(key: str, v: torch.Tensor, mine: torch.Tensor, rule: str | None) -> str | None:
    """What is wrong with the values of ``v`` loaded into ``mine`` (None: nothing)."""
    if v.is_meta or v.numel() == 0:
        return None
    try:
        return _values(key, v, mine, rule)
    except (RuntimeError, NotImplementedError, TypeError) as exc:  # e.g. uint64 comparisons
        return (
            f"{key}: its {v.dtype} values cannot be checked ({type(exc).__name__}); "
            f"convert it to {mine.dtype}"
        )


def _values(key: str, v: torch.Tensor, mine: torch.Tensor, rule: str | None) -> str | None:
    if _kind_of(mine.dtype) == "integer" and v.dtype != mine.dtype:
        info = torch.iinfo(mine.dtype)
        if bool((v < info.min).any() or (v > info.max).any()):
            return f"{key}: values outside the range of {mine.dtype} [{info.min}, {info.max}]"
    if rule is None:
        return None
    cast = v.detach().to(mine.dtype) if v.dtype != mine.dtype else v.detach()
    if rule in ("observer", "mean", "variance", "step"):
        bad = ~torch.isfinite(cast)
        if bool(bad.any()):
            what = {"observer": "an observer", "step": "a learned (log) step size"}.get(
                rule, "a BatchNorm statistic"
            )
            return f"{key}: NaN/Inf in {what} ({_rows(bad)}); it must be finite"
        if rule == "variance" and bool((cast < 0).any()):
            return f"{key}: negative running variance ({_rows(cast < 0)}); it must be >= 0"
    elif rule == "kind":
        bad = (v < 0) | (v > _SIGNED)
        if bool(bad.any()):
            return (
                f"{key}: observer kinds outside 0..{_SIGNED} (0 unseen, 1 unsigned, 2 signed; "
                f"{_rows(bad)})"
            )
    elif rule == "count" and bool((v < 0).any()):
        return f"{key}: negative batch count ({_rows(v < 0)}); it must be >= 0"
    return None


def _list(items: list[str]) -> str:
    return f"{items[:5]}{' ...' if len(items) > 5 else ''}"


def check_state_dict(
    wrapper: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    strict: bool = True,
    *,
    exact_dtype: bool = False,
    source: str | None = None,
) -> None:
    """Raise if ``state_dict`` does not fit ``wrapper``; modify nothing.

    Checks, for every entry that
    [`TriQDefWrapper.load_state_dict`][triqdef.TriQDefWrapper.load_state_dict] would copy:

    * keys: missing and unexpected ones (when ``strict``);
    * types and shapes: a ``torch.Tensor`` (not on the ``meta`` device) of the
      wrapper's shape;
    * dtypes: the same kind as the wrapper's (floating point, integer, bool); with
      ``exact_dtype`` exactly the wrapper's dtype; integers must fit the wrapper's
      integer dtype;
    * values: observers (``act_min``, ``act_max``) and BatchNorm ``running_mean`` /
      ``running_var`` (per-bit rows and the model's own) finite, ``running_var >= 0``,
      ``num_batches_tracked >= 0``, observer kinds ``act_kind`` in 0..2, learned log
      step sizes (``act_log_step``, ``weight_log_steps.<j>`` with ``quantizer="lsq"``)
      finite.

    Args:
        wrapper: the [`TriQDefWrapper`][triqdef.TriQDefWrapper] to load into.
        state_dict: a mapping from keys of ``wrapper.state_dict()`` to tensors.
        strict: also require exactly the wrapper's keys, as ``nn.Module.load_state_dict``.
        exact_dtype: require every tensor's dtype to be the wrapper's (as
            [`triqdef.load`][triqdef.io.load] does, and ``load_state_dict(assign=True)``).
        source: where the state dict comes from (a file), named in the message.

    Raises:
        InputError: ``state_dict`` is not a mapping with str keys.
        CheckpointError: anything listed above does not fit; the message names the
            entries (at most five per problem) and ``source``.
    """
    where = f"{source}: " if source is not None else ""
    if not isinstance(state_dict, Mapping):
        raise InputError(
            f"{where}load_state_dict needs a mapping from keys to tensors (e.g. "
            f"wrapper.state_dict()), got {type(state_dict).__name__}"
        )
    odd = [repr(k) for k in state_dict if not isinstance(k, str)]
    if odd:
        raise InputError(f"{where}state_dict keys must be str, got {_list(odd)}")
    own = wrapper.state_dict()
    problems = []
    if strict:
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if missing:
            problems.append(f"missing keys {_list(missing)}")
        if unexpected:
            problems.append(f"unexpected keys {_list(unexpected)}")
    shared = [k for k in state_dict if k in own]
    types = [
        f"{k}: {type(state_dict[k]).__name__}"
        for k in shared
        if not isinstance(state_dict[k], torch.Tensor)
    ]
    if types:
        problems.append(f"values that are not tensors {_list(types)}")
    tensors = {k: state_dict[k] for k in shared if isinstance(state_dict[k], torch.Tensor)}
    shapes = [
        f"{k}: given {tuple(v.shape)} vs wrapper {tuple(own[k].shape)}"
        for k, v in tensors.items()
        if v.shape != own[k].shape
    ]
    if shapes:
        problems.append(f"shape mismatches {_list(shapes)}")
    meta = [k for k, v in tensors.items() if v.is_meta and not own[k].is_meta]
    if meta:
        problems.append(f"tensors on the meta device, which hold no values {_list(meta)}")
    same = (lambda a, b: a == b) if exact_dtype else (lambda a, b: _kind_of(a) == _kind_of(b))
    dtypes = [
        f"{k}: given {v.dtype} vs wrapper {own[k].dtype}"
        for k, v in tensors.items()
        if not same(v.dtype, own[k].dtype)
    ]
    if dtypes:
        problems.append(f"dtype mismatches {_list(dtypes)}")
    if not problems:  # values only once types, shapes and dtypes are right
        rules = _value_rules(wrapper)
        values = [_value_problem(k, v, own[k], rules.get(k)) for k, v in tensors.items()]
        invalid = [p for p in values if p is not None]
        if invalid:
            problems.append(f"invalid values {_list(invalid)}")
    if problems:
        hint = (
            "re-save it from a healthy wrapper, or convert the wrapper (e.g. .float()) to the "
            "saved dtypes"
            if dtypes
            else "build the wrapper like the one that was saved, or fix the listed entries"
        )
        raise CheckpointError(
            f"{where}state_dict does not fit this wrapper: " + "; ".join(problems) + f" ({hint})"
        )

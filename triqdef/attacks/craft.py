"""Crafting a patch pool: LAVAN or GAP patches over sizes, bit-widths, targets and regions."""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Iterable, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from .._checks import (
    check_images,
    check_int,
    check_size2,
    is_label_dtype,
    label_dtype_error,
    progress_bar,
)
from ..errors import ConfigError, InputError
from .base import _is_wrapper
from .gap import AdversarialPatch
from .lavan import LAVAN
from .regions import resolve_region

__all__ = ["craft_patches"]

_ATTACKS = {"lavan": LAVAN, "gap": AdversarialPatch}


def _gather(data: Any, needed: int) -> tuple[Tensor, Tensor]:
    """Collect at least ``needed`` images (or all there are) from batches or an (x, y) pair."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        if data[0].ndim == 4:
            data = [data]
    xs, ys, count = [], [], 0
    try:
        iterator = iter(data)
    except TypeError:
        raise InputError(f"data must be an iterable of (x, y) batches, got {data!r}") from None
    for batch in iterator:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise InputError(f"each batch must be (x, y, ...), got {type(batch).__name__}")
        x, y = batch[0], batch[1]
        check_images(x)
        if not isinstance(y, Tensor) or not is_label_dtype(y.dtype):
            raise label_dtype_error("labels", y)
        if y.shape != (x.shape[0],):
            raise InputError(f"labels must be a ({x.shape[0]},) tensor, got {tuple(y.shape)}")
        xs.append(x.detach())
        ys.append(y.detach().long().to(x.device))
        count += x.shape[0]
        if count >= needed:
            break
    if not xs:
        raise InputError("data yielded no batch")
    return torch.cat(xs), torch.cat(ys)


def craft_patches(
    model: nn.Module,
    data: Iterable,
    sizes: Sequence = (4, 6, 8),
    n_patches: int | None = None,
    targets: Sequence[int | None] = (None,),
    regions: Sequence | None = None,
    bits: int | Sequence[int] = 32,
    attack: str = "lavan",
    steps: int = 100,
    step_size: float | None = None,
    seed: int = 0,
    batch_size: int = 128,
    progress: bool = False,
    **attack_kwargs: Any,
) -> tuple[list[Tensor], list[dict]]:
    """Craft the patches of a pool and their metadata; see
    [`PatchPool.build`][triqdef.attacks.pool.PatchPool.build], which wraps them in a pool.

    The grid ``sizes x bits x targets x regions`` is covered round-robin:
    ``n_patches`` patches in all (default: one per grid cell). With
    ``attack="lavan"`` each patch is the LAVAN patch of one image (images of
    the target class are skipped for targeted cells; a cell's images run as
    one batch); with ``attack="gap"`` each patch is a universal patch fitted
    on a random batch of ``batch_size`` images.

    Returns:
        ``(patches, metadata)``: ``(C, h, w)`` patches and one metadata dict each.

    Raises:
        ConfigError: bad grid or attack settings; InputError: bad data.
    """
    if attack not in _ATTACKS:
        raise ConfigError(f"attack must be one of {tuple(_ATTACKS)}, got {attack!r}")
    sizes = [
        check_size2(s, "sizes") for s in (sizes if isinstance(sizes, (list, tuple)) else [sizes])
    ]
    bits_list = [bits] if isinstance(bits, (int, numbers.Integral)) else list(bits)
    for b in bits_list:
        ok = b in model.bits if _is_wrapper(model) else b == 32
        if isinstance(b, bool) or not ok:
            allowed = model.bits if _is_wrapper(model) else (32,)
            raise ConfigError(f"bits {b!r} is not available; the model runs at {allowed}")
    targets = list(targets)
    regions = [resolve_region(r)[0] or list(resolve_region(r)[1]) for r in (regions or ["any"])]
    if not sizes or not bits_list or not targets:
        raise ConfigError("sizes, bits and targets must be non-empty")
    grid = list(itertools.product(sizes, bits_list, targets, regions))
    n = len(grid) if n_patches is None else check_int("n_patches", n_patches)
    counts = [n // len(grid) + (i < n % len(grid)) for i in range(len(grid))]
    batch_size = check_int("batch_size", batch_size)
    need = max(batch_size, max(counts)) * 2
    xs, ys = _gather(data, need)
    param = next(model.parameters(), None)
    if param is not None:
        xs, ys = xs.to(param.device), ys.to(param.device)
    pick = torch.Generator().manual_seed(seed)
    kw = dict(attack_kwargs, steps=steps)
    if step_size is not None:
        kw["step_size"] = step_size
    patches, metadata = [], []
    cells = [(i, cell) for i, cell in enumerate(grid) if counts[i]]
    for i, (size, b, target, region) in progress_bar(cells, progress, len(cells), "pool"):
        k = counts[i]
        pool_ids = torch.arange(xs.shape[0])
        if target is not None:
            pool_ids = pool_ids[ys.cpu() != target] if (ys != target).any() else pool_ids
        common = dict(
            kw,
            bits=b if _is_wrapper(model) else None,
            targeted=target is not None,
            target=target,
            region=region,
            seed=seed * 100003 + i,
        )
        meta = dict(
            size=list(size),
            bits=b,
            target=target,
            region=region,
            attack=attack,
            image_size=list(xs.shape[-2:]),
            steps=steps,
        )
        if attack == "lavan":
            order = pool_ids[torch.randperm(len(pool_ids), generator=pick)]
            chosen = order.repeat(k // len(order) + 1)[:k].to(xs.device)
            lavan = LAVAN(model, size, **common)
            for start in range(0, k, batch_size):
                sel = chosen[start : start + batch_size]
                lavan(xs[sel], ys[sel])
                # both set by the call above
                patch, locs = cast(Tensor, lavan.patch), cast(Tensor, lavan.locations)
                for p, loc in zip(patch, locs.tolist()):
                    patches.append(p)
                    metadata.append(dict(meta, location=loc))
        else:
            for j in range(k):
                order = pool_ids[torch.randperm(len(pool_ids), generator=pick)]
                sel = order[:batch_size].to(xs.device)
                gap = AdversarialPatch(model, size, **dict(common, seed=common["seed"] + j))
                gap(xs[sel], ys[sel])
                patches.append(gap.patch)
                metadata.append(dict(meta, location=None))
    return patches, metadata

"""The patch pool: crafted patches with metadata, sampled as a patch source, saved to disk."""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_images, check_int, check_size2, resolve_device, spatial_size
from .._safetensors import read_safetensors, write_atomic
from ..errors import CheckpointError, ConfigError, InputError
from ..patches import _paste_patch
from .craft import craft_patches
from .regions import _draw_in_range, _seeded_generator, region_bounds, resolve_region

__all__ = ["PatchPool", "POOL_FORMAT", "POOL_FORMAT_VERSION"]

POOL_FORMAT = "triqdef-patch-pool"
POOL_FORMAT_VERSION = "1"


def _norm_meta(meta: dict, patch: Tensor, error=ConfigError) -> dict:
    """Check one patch's metadata and fill the derived fields."""
    if not isinstance(meta, dict):
        raise error(f"patch metadata must be a dict, got {type(meta).__name__}")
    out = dict(meta)
    size = tuple(patch.shape[-2:])
    if "size" in out and tuple(check_size2(out["size"], "metadata size", error)) != size:
        raise error(f"metadata size {out['size']} does not match the patch {size}")
    out["size"] = list(size)
    bits = out.get("bits", 32)
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not 2 <= int(bits) <= 32:
        raise error(f"metadata bits must be an int in [2, 32], got {bits!r}")
    out["bits"] = int(bits)
    target = out.get("target")
    if target is not None and (
        isinstance(target, bool) or not isinstance(target, numbers.Integral) or target < 0
    ):
        raise error(f"metadata target must be None or a class index, got {target!r}")
    out["target"] = None if target is None else int(target)
    name, box = resolve_region(out.get("box", out.get("region")), error)
    out["region"], out["box"] = name, list(box)
    attack = out.get("attack", "custom")
    if not isinstance(attack, str):
        raise error(f"metadata attack must be a str, got {attack!r}")
    out["attack"] = attack
    return out


class PatchPool:
    """A pool of adversarial patches with their metadata, and a patch source drawing from it.

    The paper's default patch source (section 4.1): patches crafted offline on
    the full-precision model, diverse in size, position and target class.
    ``pool(x, y, wrapper)`` pastes one random pool patch per image at a random
    location inside the region the patch was crafted for; patches of different
    sizes in one batch are handled by grouping the images by patch size.

    Each patch has a metadata dict: ``size`` ``[h, w]``, ``bits`` (generation
    bit-width), ``target`` (``None`` = untargeted), ``region`` (region name or
    ``None`` for a custom box), ``box`` (``[top, left, bottom, right]``
    fractions), ``attack`` and, when known, ``location`` (``[row, col]`` where
    it was crafted) and ``image_size``.

    Args:
        patches: patches ``(C, h, w)`` with values in [0, 1], all with the same ``C``.
        metadata: one dict per patch (missing fields get defaults: 32 bits,
            untargeted, region ``"any"``, attack ``"custom"``).
        generator: random generator of [`__call__`][triqdef.attacks.pool.PatchPool.__call__]
            and [`sample`][triqdef.attacks.pool.PatchPool.sample].
        seed: seed of a generator created on the input's device instead.

    Attributes:
        patches: list of ``(C, h, w)`` CPU float tensors.
        metadata: list of dicts, one per patch.
        locations: ``(B, 2)`` corners of the last call.
        indices: ``(B,)`` pool index of each image's patch in the last call.

    Shape:
        - patches: (C, h, w) each, sizes may differ
        - call: x (B, C, H, W) in [0, 1] -> (B, C, H, W)

    Example:
        >>> pool = PatchPool([torch.rand(1, 3, 3), torch.rand(1, 5, 5)],
        ...                  [{"region": "top-left"}, {"bits": 8}], seed=0)
        >>> x_adv = pool(torch.zeros(6, 1, 12, 12), torch.zeros(6, dtype=torch.long))
        >>> x_adv.shape, pool.is_seen(size=3), pool.is_seen(size=4), pool.is_seen(bits=4)
        (torch.Size([6, 1, 12, 12]), True, False, False)
    """

    def __init__(
        self,
        patches: Sequence[Tensor],
        metadata: Sequence[dict] | None = None,
        *,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> None:
        patches = list(patches)
        if not patches:
            raise ConfigError("a PatchPool needs at least one patch")
        metadata = [{} for _ in patches] if metadata is None else list(metadata)
        if len(metadata) != len(patches):
            raise ConfigError(f"{len(patches)} patches but {len(metadata)} metadata dicts")
        clean = []
        for i, p in enumerate(patches):
            if not isinstance(p, Tensor) or p.ndim != 3 or not p.is_floating_point():
                got = f"{p.dtype} {tuple(p.shape)}" if isinstance(p, Tensor) else p
                raise InputError(f"patch {i} must be a floating (C, h, w) tensor, got {got}")
            p = p.detach().to("cpu", torch.float32).contiguous()
            if p.numel() == 0 or not bool(((p >= 0) & (p <= 1)).all()):
                raise InputError(f"patch {i} must be non-empty with values in [0, 1]")
            clean.append(p)
        channels = {p.shape[0] for p in clean}
        if len(channels) > 1:
            raise InputError(f"all patches must have the same channel count, got {channels}")
        if generator is not None and seed is not None:
            raise ConfigError("give generator= or seed=, not both")
        self.patches = clean
        self.metadata = [_norm_meta(m, p) for m, p in zip(metadata, clean)]
        self.generator, self.seed = generator, None if seed is None else check_int("seed", seed, 0)
        self._generators: dict[str, torch.Generator] = {}
        self._cache: dict = {}
        self.locations: Tensor | None = None
        self.indices: Tensor | None = None

    # --- description ------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.patches)

    def __repr__(self) -> str:
        return (
            f"PatchPool({len(self)} patches, sizes={sorted(self.sizes)}, bits={sorted(self.bits)}, "
            f"targets={sorted(self.targets, key=lambda t: -1 if t is None else t)}, "
            f"regions={sorted(self.regions)}, attacks={sorted(self.attacks)})"
        )

    @property
    def channels(self) -> int:
        """Channel count of the patches."""
        return self.patches[0].shape[0]

    @property
    def sizes(self) -> set[tuple[int, int]]:
        """Patch sizes ``(h, w)`` in the pool."""
        return {tuple(m["size"]) for m in self.metadata}

    @property
    def bits(self) -> set[int]:
        """Generation bit-widths in the pool."""
        return {m["bits"] for m in self.metadata}

    @property
    def targets(self) -> set[int | None]:
        """Target classes in the pool (``None`` = untargeted)."""
        return {m["target"] for m in self.metadata}

    @property
    def regions(self) -> set[tuple[float, ...]]:
        """Location regions (boxes) in the pool."""
        return {tuple(m["box"]) for m in self.metadata}

    @property
    def attacks(self) -> set[str]:
        """Names of the attacks that made the pool."""
        return {m["attack"] for m in self.metadata}

    def is_seen(
        self,
        size: int | tuple[int, int] | None = None,
        bits: int | None = None,
        region: str | tuple[float, float, float, float] | None = None,
    ) -> bool:
        """Whether a configuration was used to build the pool ("seen" in evaluation).

        Each given attribute is checked on its own: the result is ``True`` when
        every given one (patch size, generation bit-width, location region)
        occurs in the pool; ``None`` means "any". Unseen = a size, bit-width or
        region not used to build the pool.

        Args:
            size: an int or ``(h, w)``.
            bits: a bit-width.
            region: a region name or ``(top, left, bottom, right)`` box.

        Returns:
            ``True`` if seen.

        Example:
            >>> pool = PatchPool([torch.rand(3, 4, 4)], [{"bits": 32, "region": "center"}])
            >>> pool.is_seen(size=4, bits=32), pool.is_seen(region="top-left")
            (True, False)
        """
        if size is not None and check_size2(size, "size", InputError) not in self.sizes:
            return False
        if bits is not None and bits not in self.bits:
            return False
        if region is not None:
            _, box = resolve_region(region, InputError)
            if box not in self.regions:
                return False
        return True

    # --- randomness -------------------------------------------------------------------
    def _gen(self, device: torch.device, generator=None) -> torch.Generator | None:
        return generator if generator is not None else _seeded_generator(self, device)

    def _rand(self, shape, device, generator=None) -> Tensor:
        g = self._gen(torch.device(device), generator)
        where = g.device if g is not None else device
        return torch.rand(shape, generator=g, device=where, dtype=torch.float64).to(device)

    def reseed(self, seed: int | None = None) -> None:
        """Restart the random stream (from ``seed``, or the pool's seed)."""
        if seed is not None:
            self.seed, self.generator = check_int("seed", seed, 0, InputError), None
        self._generators.clear()

    # --- use --------------------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None) -> list[tuple[Tensor, dict]]:
        """Draw ``n`` patches (with replacement) and their metadata.

        Args:
            n: how many.
            generator: optional generator (default: the pool's).

        Returns:
            ``n`` pairs ``(patch (C, h, w), metadata dict)``.
        """
        n = check_int("n", n, 0, InputError)
        u = self._rand((n,), "cpu" if generator is None else generator.device, generator)
        idx = torch.floor(u * len(self)).long().clamp_(max=len(self) - 1).tolist()
        return [(self.patches[i], dict(self.metadata[i])) for i in idx]

    def to_batch(
        self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> dict[tuple[int, int], Tensor]:
        """The patches stacked per size: ``{(h, w): (N_s, C, h, w)}``.

        Args:
            device: where the stacks go (default: where the patches are, the CPU).
            dtype: a floating dtype.

        Raises:
            InputError: ``device`` is not a device this machine has, or ``dtype`` is not
                a floating ``torch.dtype``.
        """
        if device is not None:
            device = resolve_device(device, "to_batch: device")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise InputError(f"to_batch: dtype must be a floating torch.dtype, got {dtype!r}")
        groups: dict[tuple[int, int], list[Tensor]] = {}
        for p in self.patches:
            groups.setdefault(spatial_size(p), []).append(p)
        return {k: torch.stack(v).to(device, dtype) for k, v in groups.items()}

    def _layout(self, image_size, device, dtype):
        key = (tuple(image_size), str(device), dtype)
        if key not in self._cache:
            hh, ww = image_size
            fits = [i for i, p in enumerate(self.patches) if p.shape[1] <= hh and p.shape[2] <= ww]
            if not fits:
                raise InputError(f"no pool patch fits in images of size {(hh, ww)}")
            groups: dict[tuple[int, int], list[int]] = {}
            for i in fits:
                groups.setdefault(spatial_size(self.patches[i]), []).append(i)
            size_id = torch.full((len(self),), -1, dtype=torch.long)
            local = torch.zeros(len(self), dtype=torch.long)
            stacks = []
            for g, members in enumerate(groups.values()):
                size_id[members] = g
                local[members] = torch.arange(len(members))
                stacks.append(torch.stack([self.patches[i] for i in members]).to(device, dtype))
            bounds = torch.tensor(
                [
                    region_bounds(m["box"], (hh, ww), tuple(m["size"])) if i in fits else (0,) * 4
                    for i, m in enumerate(self.metadata)
                ],
                dtype=torch.long,
            )
            self._cache[key] = (
                torch.tensor(fits, device=device),
                size_id.to(device),
                local.to(device),
                stacks,
                bounds.to(device),
            )
        return self._cache[key]

    def __call__(
        self,
        x: Tensor,
        y: Tensor | None = None,
        wrapper: nn.Module | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Paste one random pool patch per image, inside its region (a patch source).

        Args:
            x: images ``(B, C, H, W)`` in [0, 1].
            y: labels (unused; accepted so the pool is a patch source).
            wrapper: the model being trained (optional); ``x`` must be on its device.
            generator: optional generator (default: the pool's).

        Returns:
            Patched images ``(B, C, H, W)``; ``indices`` and ``locations``
            record what went where.

        Raises:
            InputError: bad ``x`` (including one on the meta device or, with ``wrapper``,
                not on the model's device), a channel mismatch, or no patch fits the images.
        """
        param = next(wrapper.parameters(), None) if isinstance(wrapper, nn.Module) else None
        check_images(x, device=None if param is None else param.device)
        if x.shape[1] != self.channels:
            raise InputError(
                f"the pool's patches have {self.channels} channels, x has {x.shape[1]}"
            )
        b, dev = x.shape[0], x.device
        fits, size_id, local, stacks, bounds = self._layout(tuple(x.shape[-2:]), dev, x.dtype)
        u = self._rand((b, 3), dev, generator)
        idx = fits[torch.floor(u[:, 0] * len(fits)).long().clamp_(max=len(fits) - 1)]
        bnd = bounds[idx]
        loc = torch.stack(
            [
                _draw_in_range(bnd[:, 0], bnd[:, 1], u[:, 1]),
                _draw_in_range(bnd[:, 2], bnd[:, 3], u[:, 2]),
            ],
            dim=1,
        )
        out = x.detach().clone()
        group = size_id[idx]
        for g, stack in enumerate(stacks):
            rows = (group == g).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            patched = _paste_patch(out[rows], stack[local[idx[rows]]], loc[rows])
            out.index_copy_(0, rows, patched)
        self.indices, self.locations = idx, loc
        return out

    # --- building ---------------------------------------------------------------------
    @classmethod
    def build(
        cls,
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
    ) -> PatchPool:
        """Craft a diverse pool of patches on ``model`` (the paper: the 32-bit model).

        The grid ``sizes x bits x targets x regions`` is covered round-robin:
        ``n_patches`` patches in all (default: one per grid cell). With
        ``attack="lavan"`` each patch is the LAVAN patch of one image (images of
        the target class are skipped for targeted cells; a cell's images run as
        one batch); with ``attack="gap"`` each patch is a universal patch fitted
        on a random batch of ``batch_size`` images.

        Args:
            model: ``nn.Module`` or [`TriQDefWrapper`][triqdef.TriQDefWrapper].
            data: iterable of ``(x, y)`` batches (images in [0, 1]) or one ``(x, y)``
                pair; read until enough images are collected.
            sizes: patch sides or ``(h, w)`` pairs.
            n_patches: total patches (default ``len(grid)``).
            targets: target classes, ``None`` for untargeted.
            regions: location regions (names or boxes; default ``("any",)``).
            bits: generation bit-width(s); only 32 for a plain model.
            attack: ``"lavan"`` or ``"gap"``.
            steps: optimisation steps of each attack.
            step_size: step size (default: the attack's).
            seed: seed of every random choice (and of the pool's sampling).
            batch_size: images per attack batch.
            progress: show a tqdm bar over the grid cells.
            **attack_kwargs: passed to the attack (``restarts``, ``eot_samples``,
                ``mean``, ``std``, ...).

        Returns:
            The pool.

        Raises:
            ConfigError: bad grid or attack settings; InputError: bad data.
        """
        patches, metadata = craft_patches(
            model,
            data,
            sizes=sizes,
            n_patches=n_patches,
            targets=targets,
            regions=regions,
            bits=bits,
            attack=attack,
            steps=steps,
            step_size=step_size,
            seed=seed,
            batch_size=batch_size,
            progress=progress,
            **attack_kwargs,
        )
        return cls(patches, metadata, seed=seed)

    # --- files ------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the pool to a safetensors file, atomically (temp file + rename).

        One tensor per patch (``patch_00000``, ...); the header metadata holds
        ``format``, ``format_version``, ``count`` and JSON lists of the pool's
        ``sizes``, ``bits``, ``targets``, ``regions``, ``attack`` names and
        ``patches`` (every patch's metadata dict).

        Args:
            path: destination (conventionally ``*.safetensors``).
        """

        tensors = {f"patch_{i:05d}": p.contiguous() for i, p in enumerate(self.patches)}
        header = {
            "format": POOL_FORMAT,
            "format_version": POOL_FORMAT_VERSION,
            "count": str(len(self)),
            "sizes": json.dumps(sorted(list(s) for s in self.sizes)),
            "bits": json.dumps(sorted(self.bits)),
            "targets": json.dumps(sorted(self.targets, key=lambda t: -1 if t is None else t)),
            "regions": json.dumps(sorted(list(r) for r in self.regions)),
            "attack": json.dumps(sorted(self.attacks)),
            "patches": json.dumps(self.metadata),
        }
        write_atomic(tensors, path, header)

    @classmethod
    def load(cls, path: str | os.PathLike, **kwargs: Any) -> PatchPool:
        """Read a pool written by [`save`][triqdef.attacks.pool.PatchPool.save].

        Args:
            path: the file.
            **kwargs: ``generator`` / ``seed`` of the new pool.

        Returns:
            The pool, patches and metadata equal to the saved ones.

        Raises:
            CheckpointFileError: missing, unreadable or not a regular file (a
                [`CheckpointError`][triqdef.errors.CheckpointError] that is an ``OSError``).
            CheckpointError: truncated, corrupt or foreign file, or a newer format.
        """
        tensors, header = read_safetensors(Path(path), "patch-pool", "PatchPool.save")
        if header.get("format") != POOL_FORMAT:
            raise CheckpointError(f"{path} is not a triqdef patch pool (metadata: {header})")
        if header.get("format_version") != POOL_FORMAT_VERSION:
            raise CheckpointError(
                f"{path} has patch-pool format version {header.get('format_version')!r}; "
                f"this triqdef reads version {POOL_FORMAT_VERSION}"
            )
        try:
            count = int(header["count"])
            metadata = json.loads(header["patches"])
            patches = [tensors[f"patch_{i:05d}"] for i in range(count)]
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{path}: inconsistent patch-pool file ({exc!r})") from None
        if len(tensors) != count or not isinstance(metadata, list) or len(metadata) != count:
            raise CheckpointError(
                f"{path}: the file holds {len(tensors)} tensors and "
                f"{len(metadata) if isinstance(metadata, list) else '?'} metadata entries, "
                f"expected {count}"
            )
        try:
            return cls(patches, metadata, **kwargs)
        except (ConfigError, InputError) as exc:
            raise CheckpointError(f"{path}: invalid patch-pool content: {exc}") from None

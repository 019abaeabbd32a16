"""PatchAttack: black-box textured patches placed by reinforcement learning (Yang et al., 2020).

The attack sees only the model's output probabilities. A dictionary of class textures
(built from training images by
[`fit_textures`][triqdef.attacks.patchattack.PatchAttack.fit_textures], or given) supplies
the patches' appearance; per image, a policy over discrete actions (where each patch goes,
which texture it shows and which crop of that texture) is trained with REINFORCE from the
model's answers to the patched images it proposes, within a query budget.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import (
    check_float,
    check_images,
    check_int,
    check_labels,
    check_size2,
    progress_bar,
)
from ..errors import ConfigError, InputError
from ..patches import _paste_patch
from .base import BasePatchAttack
from .regions import RegionLike, region_bounds

__all__ = ["PatchAttack"]

_FLOOR = -1.0e4
"""Reward of a query whose outputs are not finite (worse than any finite log-probability)."""

_BETAS, _EPS = (0.9, 0.999), 1e-8
"""Adam's moment decays and denominator epsilon for the policy's logits."""

_MAX_CANDIDATES = 4096
"""Most texture candidates clustered per class by `fit_textures` (a seeded subsample above)."""


# --- the texture dictionary ------------------------------------------------------------------
def _check_textures(textures: Any, labels: Any) -> tuple[Tensor, Tensor | None]:
    """Check a texture dictionary ``(T, C, th, tw)`` in [0, 1] and its ``(T,)`` class labels."""
    if not isinstance(textures, Tensor) or textures.ndim != 4 or not textures.is_floating_point():
        got = (
            f"{textures.dtype} {tuple(textures.shape)}"
            if isinstance(textures, Tensor)
            else type(textures).__name__
        )
        raise InputError(f"textures must be a floating (T, C, h, w) tensor, got {got}")
    if textures.numel() == 0:
        raise InputError(f"textures is empty, shape {tuple(textures.shape)}")
    if textures.device.type == "meta":
        raise InputError("textures is on the meta device, which holds no data")
    lo, hi = torch.aminmax(textures.detach())
    if not bool((lo >= 0) & (hi <= 1)):  # NaN fails this too
        raise InputError(
            f"textures values must lie in [0, 1] (pixel space, like the images), got "
            f"[{float(lo):.4g}, {float(hi):.4g}]"
        )
    if labels is None:
        return textures.detach().clone(), None
    if (
        not isinstance(labels, Tensor)
        or labels.is_floating_point()
        or labels.is_complex()
        or labels.dtype == torch.bool
    ):
        raise InputError(f"texture_labels must be an integer (T,) tensor, got {labels!r}")
    if labels.shape != (textures.shape[0],):
        raise InputError(
            f"texture_labels must have shape ({textures.shape[0]},), one class per texture, "
            f"got {tuple(labels.shape)}"
        )
    if bool((labels < 0).any()):
        raise InputError(f"texture_labels must be class indices >= 0, got {labels.tolist()}")
    return textures.detach().clone(), labels.detach().to(torch.long).cpu().clone()


def _descriptors(images: Tensor) -> Tensor:
    """Texture statistics of ``(N, C, h, w)`` crops: Gram matrices of fixed local features.

    The features are each channel and its horizontal and vertical differences (a fixed
    filter bank standing in for the paper's VGG features); the descriptor is the upper
    triangle of their ``(3C, 3C)`` Gram matrix, averaged over positions, so it describes
    the texture wherever it sits in the crop.

    Returns:
        ``(N, D)`` float64 descriptors with ``D = 3C (3C + 1) / 2``.
    """
    x = images.double()
    dx = x[..., :, 1:] - x[..., :, :-1]
    dy = x[..., 1:, :] - x[..., :-1, :]
    feats = torch.cat([x[..., 1:, 1:], dx[..., 1:, :], dy[..., :, 1:]], dim=1).flatten(2)
    gram = feats @ feats.transpose(1, 2) / max(1, feats.shape[-1])  # (N, 3C, 3C)
    i, j = torch.triu_indices(gram.shape[1], gram.shape[2])
    return gram[:, i, j]


def _medoids(desc: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """Indices of ``k`` distinct rows of ``desc`` nearest the centres of a k-means clustering.

    k-means++ seeding from ``gen``, then Lloyd iterations on standardised descriptors.
    """
    n = desc.shape[0]
    z = (desc - desc.mean(0)) / desc.std(0, unbiased=False).clamp_min(1e-12)
    first = int(torch.randint(n, (1,), generator=gen))
    centres = z[first : first + 1]
    while centres.shape[0] < k:
        d2 = torch.cdist(z, centres).min(1).values.square()
        if float(d2.sum()) <= 0:  # every row is already a centre: repeat one
            pick = 0
        else:
            pick = int(torch.multinomial(d2 / d2.sum(), 1, generator=gen))
        centres = torch.cat([centres, z[pick : pick + 1]])
    for _ in range(20):
        assign = torch.cdist(z, centres).argmin(1)
        moved = centres.clone()
        for c in range(k):
            members = z[assign == c]
            if members.shape[0]:
                moved[c] = members.mean(0)
        if torch.equal(moved, centres):
            break
        centres = moved
    dist = torch.cdist(centres, z)
    chosen: list[int] = []
    for c in range(k):  # nearest member not already chosen by another centre
        order = dist[c].argsort()
        pick = next(int(i) for i in order if int(i) not in chosen)
        chosen.append(pick)
    return torch.tensor(chosen, dtype=torch.long)


# --- the attack ------------------------------------------------------------------------------
class PatchAttack(BasePatchAttack):
    """Black-box textured patch attack by reinforcement learning (Yang et al., ECCV 2020).

    Only the model's output probabilities are used: every model call runs under
    ``torch.no_grad()`` and no gradient of the model is ever taken, so the model may be
    any black box returning ``(B, K)`` logits (the probabilities are their softmax).

    **Texture dictionary.** Patches are crops of textures ``(T, C, th, tw)``, each with a
    class label. [`fit_textures`][triqdef.attacks.patchattack.PatchAttack.fit_textures]
    builds it from training images as the paper does, per class: texture statistics
    (Gram matrices) of the class's images are clustered with k-means and each cluster
    contributes its most central image (or crop) as a texture. Untargeted, an image of
    class ``y`` is attacked with the textures of the other classes; targeted, with those
    of the target class (textures given without labels are all used).

    **Agent.** For each of ``n_patches`` square patches the action is a position (every
    corner inside the region), a texture index and a crop offset inside that texture. Per
    image, the policy is a categorical distribution over each of these choices (logits
    start at zero: uniform). Each step samples ``rl_batch`` action sets per image, pastes
    them and queries the model once for all images of the batch together; the reward is
    ``log(1 - p_y)`` (targeted: ``log p_target``) and REINFORCE with the rewards
    standardised per image (the paper's baseline subtraction) updates the logits with
    Adam. An image stops as soon as one of its queries succeeds (the prediction leaves
    ``y``, or reaches the target) or its budget is spent; the best query seen (a success
    first, then the highest reward) gives its patch.

    **Queries.** Each image's budget is ``queries`` model evaluations: one of the clean
    image (which checks the labels against the model's classes) and ``rl_batch`` per
    step while it is still searching (the last step takes what is left).
    ``queries_used`` reports them per image.

    Differences from the paper's implementation: the policy factorises over the choices
    instead of an LSTM that chains them, all patches are chosen jointly instead of one
    agent per patch, and textures are cluster medoids of real images described by fixed
    low-level features (the paper synthesises textures from VGG Gram matrices).

    Args:
        model: ``nn.Module`` (queried only) or [`TriQDefWrapper`][triqdef.TriQDefWrapper].
        patch_size: side or ``(h, w)`` of each patch; see
            [`BasePatchAttack`][triqdef.attacks.BasePatchAttack].
        queries: model evaluations allowed per image, the clean one included (>= 2).
        textures: the texture dictionary ``(T, C, th, tw)`` in [0, 1], each texture at
            least as large as the patch; ``None``: call
            [`fit_textures`][triqdef.attacks.patchattack.PatchAttack.fit_textures] first.
        texture_labels: ``(T,)`` class of each texture (``None``: every texture is used
            for every image).
        n_patches: patches per image, chosen jointly.
        rl_batch: action sets sampled (and queries made) per image per step (>= 2, since
            REINFORCE compares them).
        lr: Adam learning rate of the policy's logits.
        bits: bit-width the attack runs at when ``model`` is a wrapper (see
            [`BasePatchAttack`][triqdef.attacks.BasePatchAttack]).
        targeted: aim at ``target`` instead of away from the labels.
        target: the target class, required when ``targeted``.
        mean: per-channel means; the model sees ``(x - mean) / std``.
        std: per-channel standard deviations.
        generator: random generator of the agent's samples.
        seed: seed of a generator made at the first call (exclusive with ``generator``).
        region: where patches go: ``None``/``"any"``, a name of
            [`REGIONS`][triqdef.attacks.REGIONS] or ``(top, left, bottom, right)`` fractions.
        progress: show a tqdm bar over the steps.

    Attributes:
        patch: after a call, ``(B, C, h, w)`` patches with ``n_patches=1``; with more
            patches, ``(B, C, H, W)`` canvases holding the patches inside ``mask``.
        locations: ``(B, 2)`` top-left corners with ``n_patches=1``; ``None`` with more
            (the patches are then given by ``mask``).
        mask: ``None`` with ``n_patches=1``; with more, the ``(B, 1, H, W)`` union of the
            patches' squares, so ``apply_patch(x, attack.patch, mask=attack.mask)`` gives
            the returned images.
        queries_used: ``(B,)`` int64 model evaluations spent on each image.
        success: ``(B,)`` bool, whether the returned image fooled the model when queried.
        textures: the texture dictionary ``(T, C, th, tw)`` (``None`` before one is given).
        texture_labels: ``(T,)`` int64 classes of the textures, or ``None``.
        last_loss: mean cross-entropy (to the labels, or to the target) of the returned
            images, from the queries that found them.

    Raises:
        ConfigError: an invalid setting.
        InputError: ``textures``/``texture_labels`` that are not a valid dictionary.

    Shape:
        - x: (B, C, H, W) in [0, 1]; y: (B,)
        - output: (B, C, H, W)

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
        >>> x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
        >>> attack = PatchAttack(net, patch_size=3, queries=21, rl_batch=5, seed=0)
        >>> attack = attack.fit_textures(torch.rand(30, 1, 8, 8), torch.arange(30) % 3)
        >>> x_adv = attack(x, y)
        >>> attack.patch.shape, attack.locations.shape, bool(attack.queries_used.max() <= 21)
        (torch.Size([4, 1, 3, 3]), torch.Size([4, 2]), True)
        >>> from triqdef.attacks import apply_patch
        >>> torch.equal(apply_patch(x, attack.patch, attack.locations), x_adv)
        True
    """

    name = "patchattack"

    def __init__(
        self,
        model: nn.Module,
        patch_size: int | tuple[int, int] | None = None,
        *,
        queries: int = 500,
        textures: Tensor | None = None,
        texture_labels: Tensor | None = None,
        n_patches: int = 1,
        rl_batch: int = 20,
        lr: float = 0.3,
        bits: int | None = None,
        targeted: bool = False,
        target: int | None = None,
        mean: Any = None,
        std: Any = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        region: RegionLike = None,
        progress: bool = False,
    ) -> None:
        queries = check_int("queries", queries, low=2)
        rl_batch = check_int("rl_batch", rl_batch, low=2)
        n_patches = check_int("n_patches", n_patches)
        lr = check_float("lr", lr)
        if textures is None and texture_labels is not None:
            raise ConfigError("texture_labels is given without textures; pass both")
        tex, labels = (
            (None, None) if textures is None else _check_textures(textures, texture_labels)
        )
        steps = max(1, math.ceil((queries - 1) / rl_batch))
        super().__init__(
            model,
            patch_size,
            bits=bits,
            steps=steps,
            step_size=lr,
            targeted=targeted,
            target=target,
            mean=mean,
            std=std,
            generator=generator,
            seed=seed,
            region=region,
            progress=progress,
        )
        if targeted and labels is not None and not bool(labels.eq(self._target_class()).any()):
            raise ConfigError(
                f"no texture has the target class {self.target}; the targeted attack uses the "
                "target class's textures (give some, or texture_labels=None to use all)"
            )
        self.queries, self.rl_batch, self.n_patches, self.lr = queries, rl_batch, n_patches, lr
        self.textures: Tensor | None = tex
        self.texture_labels: Tensor | None = labels
        self.mask: Tensor | None = None
        self.queries_used: Tensor | None = None
        self.success: Tensor | None = None
        self._clean_classes = 0

    def __repr__(self) -> str:
        tex = None if self.textures is None else tuple(self.textures.shape)
        tgt = f", targeted=True, target={self.target}" if self.targeted else ""
        return (
            f"PatchAttack(patch_size={self.patch_size}, bits={self.bits}, "
            f"queries={self.queries}, n_patches={self.n_patches}, rl_batch={self.rl_batch}, "
            f"lr={self.lr}, textures={tex}{tgt}, region={self.region_name or self.region})"
        )

    # --- the dictionary ---------------------------------------------------------------
    def fit_textures(
        self,
        x: Tensor,
        y: Tensor,
        per_class: int = 8,
        size: int | tuple[int, int] | None = None,
        seed: int = 0,
    ) -> PatchAttack:
        """Build the texture dictionary from labelled training images (no model query).

        For each class, candidate textures (the class's images, or with ``size`` their
        crops of that size on a half-size stride) are described by Gram matrices of fixed
        local features, clustered with k-means into ``per_class`` clusters, and the
        candidate nearest each cluster centre becomes a texture of that class.

        Args:
            x: training images ``(N, C, H, W)`` in [0, 1].
            y: their labels ``(N,)`` (integer).
            per_class: textures per class (fewer when a class has fewer candidates).
            size: side or ``(h, w)`` of the textures (default: the whole images); the
                patches are crops of them, so at least the patch size.
            seed: seed of the clustering (its own generator: the attack's random stream
                is untouched).

        Returns:
            The attack itself (``textures`` and ``texture_labels`` set), for chaining.

        Raises:
            InputError: bad images or labels, or ``size`` larger than the images.
            ConfigError: ``per_class``, ``size`` or ``seed`` not a positive int (``seed``:
                non-negative).
        """
        check_images(x, "x")
        y = check_labels(y, x, "y")
        per_class = check_int("per_class", per_class)
        seed = check_int("seed", seed, low=0)
        hh, ww = x.shape[-2:]
        th, tw = (hh, ww) if size is None else check_size2(size)
        if th > hh or tw > ww:
            raise InputError(f"fit_textures: size {(th, tw)} is larger than the images {(hh, ww)}")
        if bool((y < 0).any()):
            raise InputError("fit_textures: labels must be class indices >= 0")
        gen = torch.Generator().manual_seed(seed)
        images, y_cpu = x.detach().cpu(), y.cpu()
        sr, sc = max(1, th // 2), max(1, tw // 2)
        rows = list(range(0, hh - th + 1, sr))
        cols = list(range(0, ww - tw + 1, sc))
        textures, labels = [], []
        for k in torch.unique(y_cpu).tolist():
            xk = images[y_cpu == k]
            crops = torch.cat([xk[..., r : r + th, c : c + tw] for r in rows for c in cols])
            if crops.shape[0] > _MAX_CANDIDATES:
                crops = crops[torch.randperm(crops.shape[0], generator=gen)[:_MAX_CANDIDATES]]
            keep = _medoids(_descriptors(crops), min(per_class, crops.shape[0]), gen)
            textures.append(crops[keep])
            labels.append(torch.full((keep.numel(),), int(k), dtype=torch.long))
        self.textures = torch.cat(textures).to(x.device, x.dtype).contiguous()
        self.texture_labels = torch.cat(labels)
        return self

    # --- checks -----------------------------------------------------------------------
    def _check_call(self, model: nn.Module, x, y, locations) -> tuple[Tensor, Tensor]:
        x, y = super()._check_call(model, x, y, locations)
        if self.textures is None:
            raise InputError(
                "PatchAttack has no texture dictionary: call attack.fit_textures(x_train, "
                "y_train) first, or build it with textures=(T, C, h, w)"
            )
        t, c, th, tw = self.textures.shape
        h, w = self._size_for(tuple(x.shape[-2:]))
        if c != x.shape[1]:
            raise InputError(f"the textures have {c} channels, the images {x.shape[1]}")
        if th < h or tw < w:
            raise InputError(
                f"the textures are {(th, tw)} but the patch is {(h, w)}: patches are crops of "
                "textures, so give textures at least as large (fit_textures(..., size=...))"
            )
        if locations is not None and self.n_patches != 1:
            raise InputError(
                f"locations= fixes one corner per image, but n_patches={self.n_patches}; "
                "use n_patches=1 or let the agent place the patches"
            )
        return x, y

    def _check_classes(self, model: nn.Module, x: Tensor, y: Tensor) -> None:
        """The clean query (one per image): labels, target and textures against the classes."""
        with torch.no_grad():
            k = self._logits(model, x, self._run_bits(model)).shape[1]
        if k < 2:
            raise InputError(f"the model has {k} class; a patch attack needs at least 2")
        self._check_labels(k, y)
        if self.targeted and self.texture_labels is not None:
            if not bool(self.texture_labels.eq(self._target_class()).any()):
                raise InputError(
                    f"no texture has the target class {self.target}; the targeted attack "
                    "uses the target class's textures (fit textures that include it, or "
                    "pass texture_labels=None to use all)"
                )
        if not self.targeted and self.texture_labels is not None:
            others = self.texture_labels.to(y.device).view(1, -1) != y.view(-1, 1)
            lonely = ~others.any(1)
            if bool(lonely.any()):
                cls = int(y[lonely][0])
                raise InputError(
                    f"every texture is of class {cls}, the label of an image to attack; the "
                    "untargeted attack uses other classes' textures (fit textures on several "
                    "classes, or pass texture_labels=None)"
                )
        self._clean_classes = k

    # --- the search -------------------------------------------------------------------
    def _attack(self, model: nn.Module, x: Tensor, y: Tensor, locations: Tensor | None) -> Tensor:
        with torch.no_grad():
            return self._search(model, x, y, locations)

    def _allowed_textures(self, y: Tensor, tex_labels: Tensor | None, t: int) -> Tensor:
        """``(B, T)`` bool: the textures each image may use."""
        b = y.shape[0]
        if tex_labels is None:
            return torch.ones(b, t, dtype=torch.bool, device=y.device)
        if self.targeted:
            return (tex_labels == self._target_class()).view(1, t).expand(b, t)
        return tex_labels.view(1, t) != y.view(b, 1)

    def _search(self, model: nn.Module, x: Tensor, y: Tensor, locations: Tensor | None) -> Tensor:
        b, _, hh, ww = x.shape
        h, w = self._size_for((hh, ww))
        dev, p = x.device, self.n_patches
        bits = self._run_bits(model)
        tex = cast(Tensor, self.textures).to(dev, x.dtype)  # set: `_check_call` checked
        t, _, th, tw = tex.shape
        labels = None if self.texture_labels is None else self.texture_labels.to(dev)
        if locations is None:
            rmin, rmax, cmin, cmax = region_bounds(self.region, (hh, ww), (h, w))
            origin = torch.tensor([rmin, cmin], device=dev).view(1, 1, 2).expand(b, p, 2)
            n_rows, n_cols = rmax - rmin + 1, cmax - cmin + 1
        else:
            origin, n_rows, n_cols = locations.view(b, 1, 2), 1, 1
        # the action's parts, per patch: row, column, texture, crop row, crop column
        sizes = (n_rows, n_cols, t, th - h + 1, tw - w + 1)
        logits = [torch.zeros(b, p, d, device=dev) for d in sizes]
        bias = [torch.zeros(b, p, d, device=dev) for d in sizes]
        allowed = self._allowed_textures(y, labels, t)
        bias[2] = torch.zeros(b, t, device=dev).masked_fill(~allowed, -math.inf)
        bias[2] = bias[2].view(b, 1, t).expand(b, p, t)
        moments = [(torch.zeros_like(z), torch.zeros_like(z)) for z in logits]

        def compose(xs: Tensor, acts: Tensor, corner: Tensor) -> tuple[Tensor, list[Tensor]]:
            """Paste the patches of actions ``acts`` (N, P, 5); also return each crop."""
            ar_h, ar_w = torch.arange(h, device=dev), torch.arange(w, device=dev)
            crops = []
            for k in range(p):
                a = acts[:, k]
                rr = (a[:, 3:4] + ar_h).view(-1, h, 1)
                cc = (a[:, 4:5] + ar_w).view(-1, 1, w)
                crop = tex[a[:, 2].view(-1, 1, 1), :, rr, cc].permute(0, 3, 1, 2)
                xs = _paste_patch(xs, crop, corner[:, k] + a[:, :2])
                crops.append(crop)
            return xs, crops

        used = torch.ones(b, dtype=torch.long, device=dev)  # the clean query
        active = torch.ones(b, dtype=torch.bool, device=dev)
        best_acts = torch.zeros(b, p, 5, dtype=torch.long, device=dev)
        best_key = torch.full((b,), -math.inf, device=dev, dtype=torch.float64)
        best_succ = torch.zeros(b, dtype=torch.bool, device=dev)
        best_obj = torch.zeros(b, device=dev)
        target = self._target_class() if self.targeted else None
        spent, step = 1, 0
        bar = progress_bar(range(self.steps), self.progress, self.steps, "PatchAttack")
        it = iter(bar)
        while spent < self.queries and bool(active.any()):
            next(it, None)
            n = min(self.rl_batch, self.queries - spent)
            acts = torch.stack(
                [self._sample(z + m, n) for z, m in zip(logits, bias)], dim=-1
            )  # (B, n, P, 5)
            idx = active.nonzero().squeeze(1)
            a_n = idx.numel()
            xs = x[idx].unsqueeze(1).expand(a_n, n, *x.shape[1:]).reshape(a_n * n, *x.shape[1:])
            corner = origin[idx].unsqueeze(1).expand(a_n, n, p, 2).reshape(a_n * n, p, 2)
            flat = acts[idx].reshape(a_n * n, p, 5)
            out = self._logits(model, compose(xs, flat, corner)[0], bits).float()
            reward, succ, obj = self._score(out, y[idx].repeat_interleave(n), target)
            reward, succ, obj = (v.view(a_n, n) for v in (reward, succ, obj))
            used[idx] += n
            spent += n
            # keep the best query per image: a success first, then the highest reward
            key = reward.double() + succ.double() * 1e6  # float64: rewards stay distinct
            top_key, top = key.max(1)
            better = top_key > best_key[idx]
            sel = idx[better]
            rows = top[better]
            best_key[sel] = top_key[better]
            best_acts[sel] = acts[sel, rows]
            best_succ[sel] = succ[better, rows]
            best_obj[sel] = obj[better, rows]
            # REINFORCE: standardised rewards, gradient of log-probabilities w.r.t. logits
            adv = (reward - reward.mean(1, keepdim=True)) / (
                reward.std(1, unbiased=False, keepdim=True) + _EPS
            )
            step += 1
            for i, (z, m) in enumerate(zip(logits, bias)):
                prob = torch.softmax(z[idx] + m[idx], dim=-1)  # (A, P, d)
                chosen = F.one_hot(acts[idx, :, :, i], z.shape[-1]).to(z.dtype)  # (A, n, P, d)
                grad = torch.zeros_like(z)
                grad[idx] = (
                    torch.einsum("an,anpd->apd", adv, chosen) / n
                    - adv.mean(1).view(-1, 1, 1) * prob
                )
                self._adam(z, grad, moments[i], step)
            active &= ~best_succ
        if hasattr(bar, "close"):
            bar.close()
        x_adv, crops = compose(x, best_acts, origin)
        corners = origin + best_acts[..., :2]
        if p == 1:
            self.patch, self.locations, self.mask = crops[0], corners[:, 0], None
        else:
            ones = torch.ones(1, 1, h, w, device=dev, dtype=x.dtype)
            mask = torch.zeros(b, 1, hh, ww, device=dev, dtype=x.dtype)
            for k in range(p):
                mask = _paste_patch(mask, ones, corners[:, k])
            self.patch, self.locations, self.mask = x_adv * mask, None, mask
        self.queries_used, self.success = used, best_succ
        self.last_loss = self._loss_value(best_obj)
        return x_adv

    def _sample(self, logits: Tensor, n: int) -> Tensor:
        """``n`` draws per image from categorical ``logits`` (B, P, d): (B, n, P), Gumbel-max."""
        b, p, d = logits.shape
        u = self._rand((b, n, p, d), logits.device).clamp_(1e-12, 1 - 1e-7)
        return (logits.unsqueeze(1) - torch.log(-torch.log(u))).argmax(-1)

    def _score(self, logits: Tensor, y: Tensor, target: int | None) -> tuple[Tensor, ...]:
        """Reward, success and objective (CE as in `_objective`) of each query's logits."""
        finite = torch.isfinite(logits).all(1)
        logp = torch.log_softmax(logits, dim=1)
        pred = logits.argmax(1)
        if target is None:
            reward = torch.logsumexp(logp.scatter(1, y.view(-1, 1), -math.inf), dim=1)
            succ = pred != y
            obj = -logp.gather(1, y.view(-1, 1)).squeeze(1)
        else:
            reward = logp[:, target]
            succ = pred == target
            obj = logp[:, target]
        reward = torch.where(finite & torch.isfinite(reward), reward, _FLOOR)
        return reward, succ & finite, torch.where(finite, obj, torch.nan)

    def _adam(self, param: Tensor, grad: Tensor, state: tuple[Tensor, Tensor], step: int) -> None:
        """One Adam ascent step of ``param`` along ``grad`` (in place)."""
        m, v = state
        b1, b2 = _BETAS
        m.mul_(b1).add_(grad, alpha=1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        m_hat = m / (1 - b1**step)
        v_hat = v / (1 - b2**step)
        param.add_(self.lr * m_hat / (v_hat.sqrt() + _EPS))

"""The TriQDef penalties: perceptual alignment of maps across bit-widths.

Both penalties compare, for every pair of active bit-widths, the *descriptors*
of one map per bit-width:

* FDP (Feature Disalignment Penalty): the map is a tapped layer's output on the
  patched inputs;
* GPDP (Gradient Perceptual Dissonance Penalty): the map is the input gradient
  of the cross-entropy on the patched inputs.

A map's descriptors are computed once per bit-width (never once per pair):

1. ``m``: the channel mean of the map (Algorithm 1 of the paper), divided by its
   per-sample root-mean-square (so the sharpness ``k`` and the HOG epsilon act
   on a fixed scale whether the map is a feature map of order 1 or an input
   gradient of order 1e-4);
2. edges ``E = soft_binarize(sobel_edges(m), q, k)``, flattened;
3. texture ``H = soft_hog(m, cell, block, orientations)``, unit-normalised.

The similarity of bit-widths ``i`` and ``j`` is
``alpha * SoftDice(E_i, E_j) + beta * cos(H_i, H_j)``, averaged over samples.
Similarities are *penalised* (added to the loss): training pushes the
bit-widths' maps apart.

Pairs: the paper sums over ordered pairs ``b_i != b_j`` (each unordered pair
twice), so the penalty grows with the number of active bit-widths, which the
curriculum changes. The default ``pairs="mean"`` averages over unordered pairs
instead, keeping the scale independent of the stage; ``pairs="sum"`` is the
paper's literal ordered sum (``K (K - 1)`` times the mean for ``K`` bit-widths).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange, reduce
from torch import Tensor

from .errors import ConfigError
from .functional import _sobel_edges, _soft_binarize, soft_hog

__all__ = [
    "DescriptorConfig",
    "Descriptors",
    "describe",
    "gradient_alignment",
    "gradient_smoothness",
    "pair_similarity",
    "penalty",
]

PAIR_MODES = ("mean", "sum")


@dataclass(frozen=True)
class DescriptorConfig:
    """How maps are described (the paper's defaults).

    Attributes:
        q: quantile of the soft edge threshold.
        k: sharpness of the soft edge threshold.
        cell: HOG cell side in pixels.
        block: HOG block side in cells.
        orientations: HOG orientation bins over [0, pi).
        eps: guard of the RMS normalisation and of the Sobel magnitude.
    """

    q: float = 0.85
    k: float = 100.0
    cell: int = 4
    block: int = 2
    orientations: int = 9
    eps: float = 1e-6


@dataclass
class Descriptors:
    """Descriptors of one map at one bit-width.

    Attributes:
        edges: ``(B, N)`` soft-binarized Sobel edges.
        hog: ``(B, D)`` unit-norm soft HOG.
    """

    edges: Tensor
    hog: Tensor

    def detach(self) -> Descriptors:
        return Descriptors(self.edges.detach(), self.hog.detach())


def _as_map(t: Tensor) -> Tensor:
    """View a tapped output as ``(B, C, H, W)``.

    ``(B, N, D)`` token maps become ``(B, 1, N, D)``, ``(B, D)`` vectors ``(B, 1, 1, D)``
    and ``(B, C, D, H, W)`` volumes ``(B, C * D, H, W)``.
    """
    if t.ndim == 4:
        return t
    if t.ndim == 3:
        return rearrange(t, "b n d -> b 1 n d")
    if t.ndim == 2:
        return rearrange(t, "b d -> b 1 1 d")
    if t.ndim == 5:  # volumes: depth folded into channels
        return rearrange(t, "b c d h w -> b (c d) h w")
    raise ConfigError(f"cannot describe a map of shape {tuple(t.shape)}: need 2 to 5 dims")


def describe(t: Tensor, cfg: DescriptorConfig = DescriptorConfig()) -> Descriptors:
    """Descriptors of a feature map or input gradient.

    Args:
        t: ``(B, C, H, W)`` map (``(B, N, D)`` token maps and ``(B, D)`` vectors are
            viewed as single-channel maps).
        cfg: descriptor settings.

    Returns:
        [`Descriptors`][triqdef.losses.Descriptors] with ``edges (B, H*W)`` and
        ``hog (B, D)``.
    """
    m = _as_map(t)
    m = m.float() if m.dtype in (torch.float16, torch.bfloat16) else m
    m = m.mean(dim=1, keepdim=True)
    rms = m.square().mean(dim=(1, 2, 3), keepdim=True).add(cfg.eps * cfg.eps).sqrt()
    m = m / rms
    edges = _soft_binarize(_sobel_edges(m, cfg.eps), cfg.q, cfg.k).flatten(1)
    h = soft_hog(m, cfg.cell, cfg.block, cfg.orientations, cfg.eps)
    h = h / h.square().sum(dim=1, keepdim=True).add(cfg.eps * cfg.eps).sqrt()
    return Descriptors(edges, h)


def pair_similarity(
    a: list[Descriptors], b: list[Descriptors] | None = None, alpha: float = 0.5, beta: float = 1.0
) -> Tensor:
    """Similarity of every pair of bit-widths, ``alpha * SoftDice + beta * cos``.

    Args:
        a: descriptors of one map at ``K`` bit-widths.
        b: descriptors to compare against (default ``a``); pass detached copies to
            let gradients flow through ``a`` only.
        alpha: weight of the edge SoftDice.
        beta: weight of the HOG cosine.

    Returns:
        ``(K, K)`` matrix of sample-mean similarities.
    """
    b = a if b is None else b
    ea, eb = torch.stack([d.edges for d in a]), torch.stack([d.edges for d in b])  # (K, B, N)
    ha, hb = torch.stack([d.hog for d in a]), torch.stack([d.hog for d in b])  # (K, B, D)
    inter = torch.einsum("ibn,jbn->bij", ea, eb)
    # total[b, i, j] = sum(E_i[b]) + sum(E_j[b])
    total = reduce(ea, "i b n -> b i 1", "sum") + reduce(eb, "j b n -> b 1 j", "sum")
    dice = 2 * inter / (total + 1e-6)
    cos = torch.einsum("ibd,jbd->bij", ha, hb)
    return (alpha * dice + beta * cos).mean(dim=0)


def _flat_work(g: Tensor) -> Tensor:
    """``(B, ...)`` -> ``(B, N)``, half precision upcast to float32."""
    g = g.float() if g.dtype in (torch.float16, torch.bfloat16) else g
    return g.flatten(1)


def gradient_alignment(
    a: list[Tensor], b: list[Tensor] | None = None, eps: float = 1e-12
) -> Tensor:
    """Absolute cosine similarity of raw maps (input gradients) of every pair of bit-widths.

    The TRS form of the GAL/TRS gradient-diversity penalty: for bit-widths ``i`` and
    ``j``, ``|cos(g_i[s], g_j[s])|`` per sample ``s`` (each map flattened over
    ``C*H*W``), averaged over samples. Each norm is floored at ``eps`` (as
    ``sqrt(max(|g|^2, eps^2))``), so an all-zero map gives 0 and finite gradients of
    every order.

    Args:
        a: ``K`` maps ``(B, C, H, W)``, one per bit-width.
        b: maps to compare against (default ``a``); pass detached copies to let
            gradients flow through ``a`` only.
        eps: floor of each sample's norm.

    Returns:
        ``(K, K)`` matrix of sample-mean absolute cosines (reduce it with
        [`penalty`][triqdef.losses.penalty]).
    """

    def unit(maps: list[Tensor]) -> Tensor:
        g = torch.stack([_flat_work(m) for m in maps])  # (K, B, N)
        norm = g.square().sum(dim=2, keepdim=True).clamp_min(eps * eps).sqrt()
        return g / norm

    ua = unit(a)
    ub = ua if b is None else unit(b)
    return torch.einsum("ibn,jbn->bij", ua, ub).abs().mean(dim=0)


def gradient_smoothness(g: Tensor) -> Tensor:
    """The TRS model-smoothness term of one map: ``mean_s ||g[s]||_2^2``.

    Args:
        g: ``(B, C, H, W)`` input gradient of one bit-width.

    Returns:
        scalar: the per-sample squared L2 norm (over ``C*H*W``), averaged over samples.
    """
    return _flat_work(g).square().sum(dim=1).mean()


def penalty(sim: Tensor, pairs: str = "mean", only: int | None = None) -> Tensor:
    """Reduce a ``(K, K)`` similarity matrix over pairs of distinct bit-widths.

    Args:
        sim: output of [`pair_similarity`][triqdef.losses.pair_similarity] or
            [`gradient_alignment`][triqdef.losses.gradient_alignment].
        pairs: ``"mean"`` over unordered pairs or ``"sum"`` over ordered pairs.
        only: with partner descriptors detached, the row of bit-width ``only``
            scaled so that summing this over all ``only`` gives the gradient of
            the full penalty (the memory-bounded mode).

    Returns:
        scalar (0 when ``K < 2``).
    """
    k = sim.shape[0]
    if k < 2:
        return sim.sum() * 0
    off = ~torch.eye(k, dtype=torch.bool, device=sim.device)
    scale = 1.0 / (k * (k - 1)) if pairs == "mean" else 1.0  # mean over unordered = ordered
    if only is None:
        return (sim * off).sum() * scale
    # row `only` against detached partners; each unordered pair appears in two rows,
    # and each row carries the gradient of both ordered terms of its pairs
    return 2 * (sim[only] * off[only]).sum() * scale

"""Alignment across bit-widths: how alike input gradients and feature maps are (tables 3 and 12)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_label_range, check_max_batches
from ..errors import InputError
from ..functional import descriptor_cosine, edge_iou, gradient_cosine, hog, soft_dice
from ..losses import DescriptorConfig, _as_map, describe
from ..patches import apply_patch
from ..taps import FeatureTaps
from ..wrapper import TriQDefWrapper, _check_names
from .reports import INPUT_GRAD, METRICS, AlignmentReport
from .session import _batches, _Evaluated

__all__ = ["alignment_report"]


class _LayerTaps(FeatureTaps):
    """[`FeatureTaps`][triqdef.taps.FeatureTaps] for alignment: each layer's first floating
    output of a forward, detached (a tuple output gives its first tensor).

    A layer that returns no floating tensor raises at once: its output is no feature map.
    """

    def hook(self, name: str, module: nn.Module, args: tuple, output: object) -> None:
        if isinstance(output, (tuple, list)):
            output = next((o for o in output if isinstance(o, Tensor)), None)
        if not isinstance(output, Tensor) or not output.is_floating_point():
            raise InputError(
                f"alignment_report: layer {name!r} returned no floating tensor "
                f"({type(output).__name__}); pick layers whose output is a feature map"
            )
        if any(name in outputs for outputs in self._store.values()):
            return  # a module called twice: keep its first output
        super().hook(name, module, args, output.detach())


def _channel_mean_rms(t: Tensor, eps: float) -> Tensor:
    """``(B, 1, H, W)`` channel mean divided by its per-sample RMS (as ``describe``)."""
    m = _as_map(t).float().mean(dim=1, keepdim=True)
    return m / m.square().mean(dim=(1, 2, 3), keepdim=True).add(eps * eps).sqrt()


def _hard_hog(m: Tensor, cfg: DescriptorConfig) -> Tensor:
    """scikit-image HOG, or triqdef's small-map HOG for maps smaller than one block."""
    if min(m.shape[-2:]) >= cfg.cell * cfg.block:
        return hog(m, cfg.cell, cfg.block, cfg.orientations, skimage_compatible=True)
    return hog(m, cfg.cell, cfg.block, cfg.orientations, skimage_compatible=False)


def _hard_hog_cosine(ha: Tensor, hb: Tensor) -> Tensor:
    """Cosine of hard HOG descriptors; two all-zero descriptors (flat maps) count as 1."""
    cos = descriptor_cosine(ha, hb)
    both_flat = (ha.abs().sum(dim=1) == 0) & (hb.abs().sum(dim=1) == 0)
    return torch.where(both_flat, torch.ones_like(cos), cos)


class _MapStats:
    """Per-bit descriptors of one map, computed once and compared pairwise."""

    def __init__(self, raw: Tensor, cfg: DescriptorConfig) -> None:
        self.raw = _as_map(raw).float()
        self.norm = _channel_mean_rms(raw, cfg.eps)
        self.soft = describe(raw, cfg)
        self.hog = _hard_hog(self.norm, cfg)
        self.q = cfg.q
        # a map one pixel high or wide has gradients along one axis only: every pixel votes
        # for the same orientation bin, so any two such maps have HOG cosine 1. Undefined.
        self.has_texture = min(self.norm.shape[-2:]) > 1

    def compare(self, other: _MapStats) -> dict[str, Tensor]:
        ea, eb = self.soft.edges, other.soft.edges
        out = {
            "cosine": gradient_cosine(self.raw, other.raw),
            "edge_iou": edge_iou(self.norm, other.norm, q=self.q),
            "hog_cosine": _hard_hog_cosine(self.hog, other.hog),
            "soft_dice": soft_dice(ea.view(ea.shape[0], 1, 1, -1), eb.view(eb.shape[0], 1, 1, -1)),
            "soft_hog": descriptor_cosine(self.soft.hog, other.soft.hog),
        }
        if not (self.has_texture and other.has_texture):
            for k in ("hog_cosine", "soft_hog"):
                out[k] = torch.full_like(out[k], float("nan"))
        return out


def _patched(ev: _Evaluated, patch: object, x: Tensor, y: Tensor, gen) -> Tensor:
    fn = ev.fn
    if isinstance(patch, Tensor):
        if patch.ndim not in (3, 4) or not patch.is_floating_point() or patch.numel() == 0:
            raise InputError(
                f"{fn}: patch must be a floating (C, h, w) or (N, C, h, w) tensor, got "
                f"{patch.dtype} {tuple(patch.shape)}"
            )
        p = patch.detach().to(x.device, x.dtype)
        if p.ndim == 4 and p.shape[0] not in (1, x.shape[0]):
            pick = torch.randint(0, p.shape[0], (x.shape[0],), generator=gen, device=gen.device)
            p = p[pick.to(x.device)]
        return apply_patch(x, p, generator=gen)
    if callable(patch):
        return ev.call_source(patch, x, y, None, "patch(x, y)")
    raise InputError(
        f"{fn}: patch must be None, a (C, h, w) tensor or a callable patch(x, y) -> x_adv, "
        f"got {type(patch).__name__}"
    )


def alignment_report(
    wrapper: TriQDefWrapper | nn.Module,
    loader: Iterable,
    bits: Sequence[int] | None = None,
    patch: Tensor | Callable[[Tensor, Tensor], Tensor] | None = None,
    layers: Sequence[str] | None = None,
    max_batches: int | None = 1,
    mean: Sequence[float] | Tensor | None = None,
    std: Sequence[float] | Tensor | None = None,
    *,
    pairs: Sequence[tuple[int, int]] | None = None,
    device: torch.device | str | None = None,
    seed: int | None = None,
    progress: bool = False,
) -> AlignmentReport:
    """How alike input gradients and feature maps are across bit-widths (tables 3 and 12).

    For each batch and each bit-width, one eval-mode forward gives the input gradient
    ``d CE(f_b(x), y) / d x`` (summed over the batch, taken with respect to the images in
    [0, 1], before ``mean``/``std``) and the outputs of ``layers``. For every pair of
    bit-widths and every map, five per-sample similarities are averaged over samples:

    * ``cosine``: [`gradient_cosine`][triqdef.functional.gradient_cosine] of the raw maps,
      in [-1, 1] (the paper's "Cosine Sim.");
    * ``edge_iou``: hard Edge IoU, [`edge_iou`][triqdef.functional.edge_iou] (85th-percentile
      threshold), in [0, 1];
    * ``hog_cosine``: cosine of hard HOG descriptors, in [0, 1]:
      scikit-image's HOG (``hog(..., skimage_compatible=True)``, cell 4, block 2, 9 bins,
      L2-Hys) when the map is at least ``cell * block`` = 8 pixels high and wide.
      scikit-image refuses smaller maps, so those fall back to triqdef's own
      [`hog`][triqdef.functional.hog] rule: cells shrink to ``min(H, W) // 2`` pixels, and
      a map smaller than one block (``min(H, W) < 2``) is one cell; its gradients use
      replicated borders, so even 2 x 2 maps have a texture. Two maps with no gradient at
      all (all-zero descriptors) count as 1, like
      [`edge_iou`][triqdef.functional.edge_iou] counts two empty edge sets as 1. A map one
      pixel high or wide (e.g. a ``(B, D)`` vector) has gradients along one axis only, so
      every pixel votes for the same bin and the cosine would be 1 whatever the maps: both
      HOG metrics are ``nan`` there;
    * ``soft_dice``: SoftDice of the soft edges ``soft_binarize(sobel_edges(.))``
      (q 0.85, k 100), in [0, 1];
    * ``soft_hog``: cosine of ``soft_hog`` descriptors, in [0, 1].

    Hard HOG, Edge IoU and both soft metrics look at the same map: the channel mean,
    divided by its per-sample root-mean-square, i.e. what FDP and GPDP see
    ([`describe`][triqdef.losses.describe] with the wrapper's ``descriptor`` settings), so
    input gradients of order 1e-4 and feature maps of order 1 are on one scale.
    ``(B, N, D)`` and ``(B, D)`` outputs are viewed as one-channel maps. Identical maps
    give 1 everywhere except SoftDice, which is ``sum(s^2) / sum(s)`` < 1 for soft edges
    ``s`` that are not exactly 0 or 1 (about 0.9 in practice).

    Inputs are patched when ``patch`` is given: a ``(C, h, w)`` patch (or a bank
    ``(N, C, h, w)``, one drawn per image) pasted at uniformly random locations, or a
    callable ``patch(x, y) -> x_adv`` such as an attack (called with gradients on).
    Otherwise clean inputs are used. Weights, observers and BatchNorm statistics are not
    changed; modes and the active bit-width are restored.

    Args:
        wrapper: a [`TriQDefWrapper`][triqdef.TriQDefWrapper] (or a plain ``nn.Module`` at 32 bits,
            which needs explicit ``pairs=[(32, 32)]``).
        loader: iterable of ``(x, y)`` batches, images in [0, 1].
        bits: bit-widths whose unordered pairs are compared (default: all of the
            wrapper's, high to low).
        patch: ``None``, a patch tensor or a callable, see above.
        layers: layer names (``model.named_modules()``) whose outputs are compared
            (default: the wrapper's tapped ``layers``).
        max_batches: number of batches averaged over (default 1; ``None``: all).
        mean: per-channel mean subtracted before the model.
        std: per-channel standard deviation divided out before the model.
        pairs: explicit pairs instead of all pairs of ``bits``; may repeat a bit-width,
            e.g. ``(4, 4)`` as a self-similarity baseline.
        device: where to run: the model's device (the default), named as a
            ``torch.device``, a string or a CUDA index; the model is not moved.
        seed: seed of the random patch locations.
        progress: show a tqdm progress bar over batches.

    Returns:
        the [`AlignmentReport`][triqdef.evaluate.AlignmentReport].

    Raises:
        InputError: empty loader, malformed batch (including one on the meta device,
            images of another dtype than the model's parameters, labels outside its
            classes), fewer than one pair, ``bits`` and ``pairs`` both given, bad patch,
            a ``device`` this machine does not have or that is not the model's.
        ConfigError: a bit-width the wrapper does not have.
        LayerNotFoundError: a layer name that is not in the model.

    Shape:
        - x: ``(B, C, H, W)`` in [0, 1], y: ``(B,)`` per batch
        - patch: ``(C, h, w)`` or ``(N, C, h, w)``
    """
    fn = "alignment_report"
    ev = _Evaluated(fn, wrapper, mean, std, device)
    if pairs is not None:
        if bits is not None:
            raise InputError(f"{fn}: give bits or pairs, not both")
        try:
            raw_pairs = [tuple(p) for p in pairs]
        except TypeError:
            raise InputError(f"{fn}: pairs must be (bits, bits) tuples, got {pairs!r}") from None
        if any(len(p) != 2 for p in raw_pairs):
            raise InputError(f"{fn}: pairs must be (bits, bits) tuples, got {pairs!r}")
        pair_list = [(ev.check_bit(a), ev.check_bit(b)) for a, b in raw_pairs]
    else:
        chosen = ev.check_bits(bits, "bits")
        pair_list = [
            (chosen[i], chosen[j]) for i in range(len(chosen)) for j in range(i + 1, len(chosen))
        ]
    if not pair_list:
        raise InputError(
            f"{fn}: nothing to compare: give at least two bit-widths, or pairs=[(b, b)]"
        )
    if layers is None:
        names = tuple(ev.wrapper.layers) if ev.wrapper is not None else ()
    else:
        names = _check_names(ev.net, layers, "layers")
    max_batches = check_max_batches(max_batches)
    needed = list(dict.fromkeys(b for p in pair_list for b in p))
    maps = [INPUT_GRAD, *names]
    gen = torch.Generator(device=ev.device)
    if seed is not None:
        gen.manual_seed(int(seed))
    else:
        gen.seed()

    sums = {m: {k: torch.zeros(len(pair_list), device=ev.device) for k in METRICS} for m in maps}
    samples = 0
    taps = _LayerTaps(names)
    modules = dict(ev.net.named_modules())
    handles = []
    batches = contextlib.closing(_batches(loader, ev.device, max_batches, progress, fn, ev.dtype))
    with ev.session(), batches as stream:
        try:
            for name in names:
                hook = functools.partial(taps.hook, name)
                handles.append(modules[name].register_forward_hook(hook))
            for x, y in stream:
                if patch is not None:
                    x = _patched(ev, patch, x, y, gen)
                stats: dict[int, dict[str, _MapStats]] = {}
                for b in needed:
                    x_in = x.detach().requires_grad_(True)
                    with taps.capture(), torch.enable_grad():
                        logits = ev.logits(x_in, b)
                        if b == needed[0]:
                            check_label_range(fn, y, logits.shape[1])
                        loss = F.cross_entropy(logits.float(), y, reduction="sum")
                        (grad,) = torch.autograd.grad(loss, x_in)
                        outputs = taps.pop()
                    del logits, loss
                    raw = {INPUT_GRAD: grad, **outputs}
                    missing = [n for n in names if n not in raw]
                    if missing:
                        raise InputError(f"{fn}: layers {missing} did not run in the forward pass")
                    with torch.no_grad():
                        stats[b] = {m: _MapStats(raw[m], ev.descriptor) for m in maps}
                    del raw, outputs
                with torch.no_grad():
                    for k, (a, b) in enumerate(pair_list):
                        for m in maps:
                            for metric, v in stats[a][m].compare(stats[b][m]).items():
                                sums[m][metric][k] += v.float().sum()
                samples += y.shape[0]
        finally:
            for h in handles:
                h.remove()
    values = {m: {k: (sums[m][k] / samples).tolist() for k in METRICS} for m in maps}
    return AlignmentReport(
        pairs=pair_list,
        maps=maps,
        metrics=list(METRICS),
        values=values,
        samples=samples,
        patched=patch is not None,
    )

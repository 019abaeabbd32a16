"""One bit-width's forward of the TriQDef objective, and the sum of its terms."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import InputError, NonFiniteLossError
from .losses import describe, gradient_alignment, gradient_smoothness, pair_similarity, penalty

__all__ = [
    "Wrapper",
    "check_values",
    "combine",
    "dverge_term",
    "feature_sims",
    "needs_input_grad",
    "needs_raw_grad",
    "run_bit",
    "scaled",
    "sum_factor",
]

# ``o`` below is the [`TriQDefObjective`][triqdef.objective.TriQDefObjective] (its
# settings and last terms), ``w`` the wrapper it runs (through `Wrapper`).


class Wrapper(Protocol):
    """What the objective uses of a [`TriQDefWrapper`][triqdef.TriQDefWrapper]: public
    members only."""

    model: nn.Module
    layers: tuple[str, ...]
    active_bits: tuple[int, ...]

    def at_bits(self, bits: int) -> AbstractContextManager[Any]: ...
    def capture_features(self) -> AbstractContextManager[dict[str, Tensor]]: ...
    def mixed_batch(self, n_clean: int, n_total: int) -> AbstractContextManager[None]: ...
    def frozen_observers(self) -> AbstractContextManager[None]: ...
    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...
    def buffers(self, recurse: bool = True) -> Iterator[Tensor]: ...
    def modules(self) -> Iterator[nn.Module]: ...


def check_values(logits: Tensor, x: Tensor, y_mixed: Tensor, x_mixed: Tensor, n_clean: int):
    c = logits.shape[1]
    ok = torch.isfinite(x).all() & torch.isfinite(x_mixed[n_clean:]).all()
    ok = ok & (y_mixed >= 0).all() & (y_mixed < c).all()
    if not bool(ok):  # the one host synchronisation of the input checks
        raise InputError("loss: " + explain_bad_values(x, y_mixed, x_mixed[n_clean:], c))


def explain_bad_values(x: Tensor, y: Tensor, x_adv: Tensor, num_classes: int) -> str:
    if not torch.isfinite(x).all():
        return "x contains NaN or Inf"
    if not torch.isfinite(x_adv).all():
        return "the patch (or the patched images) contains NaN or Inf"
    bad = y[(y < 0) | (y >= num_classes)]
    label = int(bad[0]) if bad.numel() else int(y.max())
    lo, hi = int(y.min()), int(y.max())
    return (
        f"label {label} is outside the model's {num_classes} classes; labels must be class "
        f"indices in [0, {num_classes}), got values in [{lo}, {hi}]"
    )


# --- one bit-width ---------------------------------------------------------------------------
def run_bit(
    o,
    w: Wrapper,
    bits: int,
    x_in: Tensor,
    y: Tensor,
    n_clean: int,
    graph: bool,
    check: Tensor | None = None,
    penalties: bool = True,
):
    """Forward at ``bits``; returns (logits, CE clean, CE adv, feature descriptors, gradient
    descriptors, raw input gradient of the patched rows). With ``graph=False`` the input
    gradient is taken without a double-backward graph (values only). ``check=x`` validates
    values and labels right after the forward. ``penalties=False`` (a bit-width outside the
    ``penalty_bits`` sample) runs a plain forward: no taps, no input gradient, no
    descriptors. The raw gradient is None unless ``lambda_cos`` or ``lambda_smooth`` is on."""
    fdp, gpdp = penalties and o.lambda_fdp != 0, penalties and o.lambda_gpdp != 0
    raw = penalties and needs_raw_grad(o)
    no_taps: AbstractContextManager[dict[str, Tensor]] = contextlib.nullcontext({})
    with w.at_bits(bits), w.capture_features() if fdp else no_taps as feats:
        with w.mixed_batch(n_clean, x_in.shape[0]):  # bn_rows="clean" reads it
            logits = w.model(x_in)
    if check is not None:
        check_values(logits, check, y, x_in, n_clean)
    zero = logits.new_zeros(())
    n_adv = logits.shape[0] - n_clean
    ce_clean = F.cross_entropy(logits[:n_clean], y[:n_clean]) if n_clean else zero
    ce_adv = F.cross_entropy(logits[n_clean:], y[n_clean:]) if n_adv else zero
    f_desc = []
    if fdp and n_adv:
        f_desc = [describe(feats[name][n_clean:], o.descriptor) for name in w.layers]
    g_desc = g_raw = None
    if (gpdp or raw) and n_adv:
        ce_sum = F.cross_entropy(logits[n_clean:], y[n_clean:], reduction="sum")
        (g,) = torch.autograd.grad(ce_sum, x_in, create_graph=graph)
        if gpdp:
            g_desc = describe(g[n_clean:], o.descriptor)
        if raw:
            g_raw = g[n_clean:]
    return logits, ce_clean, ce_adv, f_desc, g_desc, g_raw


def feature_sims(f_desc, partners=None, alpha=0.5, beta=1.0) -> list[Tensor]:
    """(K, K) similarity per tapped layer from per-bit descriptor lists ``[bit][layer]``."""
    n_layers = len(f_desc[0]) if f_desc else 0
    out = []
    for layer in range(n_layers):
        a = [d[layer] for d in f_desc]
        b = None if partners is None else [d[layer] for d in partners]
        out.append(pair_similarity(a, b, alpha, beta))
    return out


# --- DVERGE: cross-bit distilled-feature training (an option, off by default) ---------------
DVERGE_EPS, DVERGE_STEP, DVERGE_STEPS = 0.07, 0.007, 10  # Yang et al. (2020), CIFAR-10


@contextlib.contextmanager
def _bn_eval(w: Wrapper) -> Iterator[None]:
    """BatchNorm layers in eval mode inside the block (their statistics are only read)."""
    bns = [m for m in w.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    modes = [m.training for m in bns]
    try:
        for m in bns:
            m.train(False)
        yield
    finally:
        for m, mode in zip(bns, modes):
            m.train(mode)


def _distill(w: Wrapper, bits: int, layer: str, x: Tensor, x_s: Tensor) -> Tensor:
    """DVERGE's feature distillation at ``bits``: ``z`` within ``DVERGE_EPS`` (L-inf) of
    ``x_s`` whose ``layer`` features match those of ``x``, by ``DVERGE_STEPS`` signed
    gradient steps from ``x_s``. The caller freezes observers and BatchNorm statistics;
    the model's parameters get no gradient. Returns ``z`` detached, shape of ``x``."""
    n = x.shape[0]
    with torch.enable_grad(), w.at_bits(bits):
        with torch.no_grad(), w.capture_features() as feats, w.mixed_batch(n, n):
            w.model(x)
        target = feats[layer].detach()
        z = x_s.detach().clone()
        for _ in range(DVERGE_STEPS):
            z.requires_grad_(True)
            with w.capture_features() as feats, w.mixed_batch(n, n):
                w.model(z)
            dist = (feats[layer] - target).pow(2).sum()
            (g,) = torch.autograd.grad(dist, z)
            z = z.detach() - DVERGE_STEP * g.sign()
            z = torch.min(torch.max(z, x_s - DVERGE_EPS), x_s + DVERGE_EPS).clamp(0, 1)
    return z.detach()


def dverge_term(w: Wrapper, sample: tuple[int, ...], x: Tensor, y: Tensor) -> Tensor:
    """DVERGE's vulnerability-diversity loss across the bit-widths of ``sample``.

    Each image ``x[k]`` is paired with another one of the batch, ``x_s = x[k + 1]``
    (label ``y_s``); for each bit-width ``i`` of the sample, ``z_i`` looks like ``x_s``
    but has the features of ``x[k]`` at ``i`` (at one tapped layer, drawn per call).
    Every other bit-width ``j`` is trained to classify ``z_i`` as ``y_s``, so that a
    feature bit-width ``i`` is fooled by does not fool ``j``. The mean cross-entropy over
    the ordered pairs ``(i, j)``. ``x`` (B, C, H, W) are clean images in [0, 1], ``y``
    (B,) their labels; needs ``B >= 2``, two bit-widths in ``sample`` and tapped layers.

    The term only reads observers and BatchNorm statistics (BatchNorm runs in eval mode
    for its forwards): the distilled images never enter the running estimates.
    """
    layer = w.layers[int(torch.randint(len(w.layers), (), device="cpu"))]
    x, x_s, y_s = x.detach(), x.detach().roll(-1, 0), y.roll(-1, 0)
    losses = []
    n = x.shape[0]
    with w.frozen_observers(), _bn_eval(w):
        for i in sample:
            z = _distill(w, i, layer, x, x_s)
            for j in sample:
                if j != i:
                    with w.at_bits(j), w.mixed_batch(n, n):
                        losses.append(F.cross_entropy(w.model(z), y_s))
    return torch.stack(losses).mean()


def uses_dverge(o, w: Wrapper, n_clean: int, k: int) -> bool:
    """DVERGE runs when weighted, with tapped layers, two clean rows and two bit-widths."""
    return o.lambda_dverge != 0 and bool(w.layers) and n_clean >= 2 and k >= 2


def needs_raw_grad(o) -> bool:
    """The gradient-diversity terms (GAL/TRS-style) read the raw input gradient."""
    return o.lambda_cos != 0 or o.lambda_smooth != 0


def needs_input_grad(o) -> bool:
    return o.lambda_gpdp != 0 or needs_raw_grad(o)


def sum_factor(o, k: int, m: int) -> float | None:
    """Factor that makes the sampled ordered-pair sum unbiased: ``K (K-1) / (m (m-1))``.

    None when nothing is sampled (``m == K``) or with ``pairs="mean"``, whose mean over
    the sampled pairs is already unbiased.
    """
    if m >= k or o.pairs != "sum":
        return None
    return k * (k - 1) / (m * (m - 1))


def scaled(value: Tensor, factor: float | None) -> Tensor:
    return value if factor is None else value * factor


def combine(
    o, w, bits, sample, ce_clean, ce_adv, f_desc, g_desc, g_raw, n_adv, dverge=None
) -> Tensor:
    """The total and its terms; ``f_desc`` / ``g_desc`` / ``g_raw`` hold the bit-widths of
    ``sample``; ``dverge`` is the DVERGE term when it ran."""
    k = len(sample)
    factor = sum_factor(o, len(bits), k)
    clean = torch.stack(list(ce_clean.values())).mean()
    adv = torch.stack(list(ce_adv.values())).mean()
    total = clean + o.lambda_adv * adv
    # "total" first; its final value is set below
    terms: dict[str, Tensor] = {"total": total, "clean": clean, "adv": adv}
    for b in bits:
        terms[f"clean/{b}"], terms[f"adv/{b}"] = ce_clean[b], ce_adv[b]
    sims: dict[str, Tensor] = {}
    if o.lambda_fdp != 0 and n_adv and w.layers:
        layer_sims = feature_sims(f_desc, None, o.alpha, o.beta)
        # sums of tensors: one per layer of `w.layers`, which is not empty
        fdp = scaled(cast(Tensor, sum(penalty(s, o.pairs) for s in layer_sims)), factor)
        total = total + o.lambda_fdp * fdp
        terms["fdp"] = fdp
        sims["fdp"] = cast(Tensor, sum(layer_sims))
    if o.lambda_gpdp != 0 and n_adv:
        sim = pair_similarity(g_desc, None, o.alpha, o.beta)
        gpdp = scaled(penalty(sim, o.pairs), factor)
        total = total + o.lambda_gpdp * gpdp
        terms["gpdp"] = gpdp
        sims["gpdp"] = sim
    if o.lambda_cos != 0 and n_adv:
        sim = gradient_alignment(g_raw)
        cos = scaled(penalty(sim, o.pairs), factor)
        total = total + o.lambda_cos * cos
        terms["cos"] = cos
        sims["cos"] = sim
    if o.lambda_smooth != 0 and n_adv:  # a mean over the sample: unbiased, no factor
        smooth = torch.stack([gradient_smoothness(g) for g in g_raw]).mean()
        total = total + o.lambda_smooth * smooth
        terms["smooth"] = smooth
    if dverge is not None:
        total = total + o.lambda_dverge * dverge
        terms["dverge"] = dverge
    for name, sim in sims.items():
        for i in range(k):
            for j in range(i + 1, k):
                terms[f"{name}/{sample[i]}-{sample[j]}"] = sim[i, j]
    if len(sample) < len(bits):  # penalty_bits drew a subset: 1 = in the sample, 0 = not
        for b in bits:
            terms[f"penalty_bits/{b}"] = total.new_ones(()) if b in sample else total.new_zeros(())
    terms["total"] = total
    o.last_terms = {name: t.detach() for name, t in terms.items()}
    if o.check_finite and not bool(torch.isfinite(total)):
        # name the most specific culprit: a per-bit term before the aggregates
        order = sorted((n for n in terms if n != "total"), key=lambda n: "/" not in n)
        bad = next((n for n in order if not torch.isfinite(terms[n]).all()), "total")
        where = f" at {bad.split('/')[1]} bits" if bad.count("/") and "-" not in bad else ""
        raise NonFiniteLossError(
            f"loss: the {bad.split('/')[0]!r} term{where} is not finite "
            f"({float(terms[bad].detach())}); weights, observers and BatchNorm statistics "
            "are unchanged"
        )
    return total

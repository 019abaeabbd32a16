"""The TriQDef objective behind ``wrapper.loss(x, y, patch)``.

``L = L_clean + lambda_adv * L_adv + lambda_fdp * L_FDP + lambda_gpdp * L_GPDP``
over the wrapper's active bit-widths (paper section 3, Algorithms 1 and 2), plus the
optional GAL/TRS-style gradient-diversity terms ``lambda_cos * L_cos +
lambda_smooth * L_smooth`` (both 0 by default).

The batch: the last ``round(rho * B)`` samples (at least one, and at least one
left clean when ``0 < rho < 1``) are patched; the other samples stay clean. A
batch of one sample is used twice, once clean and once patched. Each bit-width
runs **one** forward over the mixed batch; ``L_clean`` is the cross-entropy of the
clean rows and ``L_adv`` of the patched rows, each averaged over bit-widths. FDP
and GPDP (and the gradient-diversity terms) look at the patched rows only (see
:mod:`triqdef.losses`).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .attacks.patching import (
    PatchSource,
    apply_patch,
    check_dtype,
    is_label_dtype,
    label_dtype_error,
    model_dtype,
)
from .errors import InputError, NonFiniteLossError
from .losses import (
    Descriptors,
    describe,
    gradient_alignment,
    gradient_smoothness,
    pair_similarity,
    penalty,
)

if TYPE_CHECKING:
    from .wrapper import TriQDefWrapper

__all__ = ["triqdef_loss"]


# --- input checks ------------------------------------------------------------------------
def _check_grad_mode() -> None:
    """The loss differentiates through the model; ``torch.inference_mode`` forbids that."""
    if torch.is_inference_mode_enabled():
        raise InputError(
            "loss: called under torch.inference_mode(), but the TriQDef loss needs autograd "
            "(it is a training objective, and GPDP takes input gradients even to compute "
            "its value); call it outside inference_mode. Under torch.no_grad() it returns "
            "the loss value without a graph; for accuracy use triqdef.evaluate.clean_accuracy"
        )


def _check_inputs(w: TriQDefWrapper, x, y, patch) -> tuple[Tensor, Tensor]:
    """Validate the call; returns ``x`` and ``y`` ready for use (labels as int64)."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim != 4:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise InputError(f"loss: x must be a floating (B, C, H, W) tensor, got {got}")
    if x.shape[0] == 0 or x.numel() == 0:
        raise InputError(f"loss: x is empty, shape {tuple(x.shape)}")
    if not isinstance(y, Tensor) or not is_label_dtype(y.dtype):
        raise label_dtype_error("loss: y", y)
    if y.shape != (x.shape[0],):
        raise InputError(f"loss: y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    param = next(w.model.parameters(), None)
    for name, t in (("x", x), ("y", y)):
        if param is not None and t.device != param.device:
            raise InputError(f"loss: {name} is on {t.device} but the model is on {param.device}")
    check_dtype(x, model_dtype(w.model), "x", "loss: ")
    _check_patch(x, patch)
    # tensors made under inference_mode cannot be saved for backward: plain copies
    x = x.clone() if x.is_inference() else x
    return x, (y.clone() if y.is_inference() else y).long()


def _check_patch(x: Tensor, patch) -> None:
    if patch is None or isinstance(patch, PatchSource):
        return
    if not isinstance(patch, Tensor):
        raise InputError(
            "loss: patch must be None, a (C, h, w) or (N, C, h, w) tensor, or a patch source "
            f"(callable(x, y, wrapper) -> x_adv), got {type(patch).__name__}"
        )
    if patch.ndim not in (3, 4) or not patch.is_floating_point() or patch.numel() == 0:
        raise InputError(
            f"loss: patch must be a floating (C, h, w) or (N, C, h, w) tensor, got "
            f"{patch.dtype} {tuple(patch.shape)}"
        )
    if patch.device != x.device:
        raise InputError(f"loss: patch is on {patch.device} but x is on {x.device}")
    if patch.shape[-3] != x.shape[1]:
        raise InputError(f"loss: patch has {patch.shape[-3]} channels, x has {x.shape[1]}")
    if patch.shape[-2] > x.shape[2] or patch.shape[-1] > x.shape[3]:
        raise InputError(
            f"loss: patch {tuple(patch.shape[-2:])} is larger than the images {tuple(x.shape[2:])}"
        )


def _explain_bad_values(x: Tensor, y: Tensor, x_adv: Tensor, num_classes: int) -> str:
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


# --- state that a failed call must not change ---------------------------------------------
class _Snapshot:
    """Copies of every buffer of the wrapper (observers, BN statistics), restorable in place."""

    def __init__(self, w: TriQDefWrapper) -> None:
        self.saved = [(b, b.clone()) for b in w.buffers()]
        self.kinds = [(q, list(q._kind_cache)) for q in w.quantizers.values()]

    def restore(self) -> None:
        with torch.no_grad():
            for b, v in self.saved:
                b.copy_(v)
        for q, kinds in self.kinds:
            q._kind_cache = kinds


def _rng_states(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_states(states, device: torch.device) -> None:
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state(states[1], device)


# --- the batch -------------------------------------------------------------------------------
def _mix(w: TriQDefWrapper, x: Tensor, y: Tensor, patch) -> tuple[Tensor, Tensor, int]:
    """Mixed batch ``[clean rows; patched rows]``, its labels and the number of clean rows."""
    b = x.shape[0]
    if w.rho == 0:
        return x, y, b
    if b == 1:
        src_x, src_y, clean_x, clean_y = x, y, x, y
    else:
        n_adv = b if w.rho == 1 else min(max(round(w.rho * b), 1), b - 1)
        cut = b - n_adv
        src_x, src_y, clean_x, clean_y = x[cut:], y[cut:], x[:cut], y[:cut]
    if patch is None:
        patch = w.patch_source
    if isinstance(patch, Tensor):
        if patch.ndim == 4 and patch.shape[0] != src_x.shape[0]:
            pick = torch.randint(0, patch.shape[0], (src_x.shape[0],), device=patch.device)
            patch = patch[pick]
        x_adv = apply_patch(src_x, patch)
    else:
        x_adv = patch(src_x, src_y, w)
        if not isinstance(x_adv, Tensor) or x_adv.shape != src_x.shape:
            got = tuple(x_adv.shape) if isinstance(x_adv, Tensor) else type(x_adv).__name__
            raise InputError(
                f"loss: the patch source returned {got}, expected images of shape "
                f"{tuple(src_x.shape)}"
            )
        x_adv = x_adv.to(x.dtype)
    return torch.cat([clean_x, x_adv]), torch.cat([clean_y, src_y]), clean_x.shape[0]


# --- one bit-width ---------------------------------------------------------------------------
@contextlib.contextmanager
def _rows(w: TriQDefWrapper, n_clean: int, n_total: int):
    """Tell the hooks that the batch's first ``n_clean`` of ``n_total`` rows are clean."""
    previous = w._ctx.rows
    w._ctx.rows = (n_clean, n_total)
    try:
        yield
    finally:
        w._ctx.rows = previous


def _run_bit(
    w: TriQDefWrapper,
    bits: int,
    x_in: Tensor,
    y: Tensor,
    n_clean: int,
    graph: bool,
    check=None,
    penalties: bool = True,
):
    """Forward at ``bits``; returns (logits, CE clean, CE adv, feature descriptors, gradient
    descriptors, raw input gradient of the patched rows). With ``graph=False`` the input
    gradient is taken without a double-backward graph (values only). ``check=x`` validates
    values and labels right after the forward. ``penalties=False`` (a bit-width outside the
    ``penalty_bits`` sample) runs a plain forward: no taps, no input gradient, no
    descriptors. The raw gradient is None unless ``lambda_cos`` or ``lambda_smooth`` is on."""
    fdp, gpdp = penalties and w.lambda_fdp != 0, penalties and w.lambda_gpdp != 0
    raw = penalties and _needs_raw_grad(w)
    with w.at_bits(bits), w._taps.capture() if fdp else contextlib.nullcontext():
        with _rows(w, n_clean, x_in.shape[0]):  # bn_rows="clean" reads it
            logits = w.model(x_in)
        feats = w._taps.pop() if fdp else {}
    if check is not None:
        _check_values(logits, check, y, x_in, n_clean)
    zero = logits.new_zeros(())
    n_adv = logits.shape[0] - n_clean
    ce_clean = F.cross_entropy(logits[:n_clean], y[:n_clean]) if n_clean else zero
    ce_adv = F.cross_entropy(logits[n_clean:], y[n_clean:]) if n_adv else zero
    f_desc = []
    if fdp and n_adv:
        f_desc = [describe(feats[name][n_clean:], w.descriptor) for name in w.layers]
    g_desc = g_raw = None
    if (gpdp or raw) and n_adv:
        ce_sum = F.cross_entropy(logits[n_clean:], y[n_clean:], reduction="sum")
        (g,) = torch.autograd.grad(ce_sum, x_in, create_graph=graph)
        if gpdp:
            g_desc = describe(g[n_clean:], w.descriptor)
        if raw:
            g_raw = g[n_clean:]
    return logits, ce_clean, ce_adv, f_desc, g_desc, g_raw


def _feature_sims(f_desc, partners=None, alpha=0.5, beta=1.0) -> list[Tensor]:
    """(K, K) similarity per tapped layer from per-bit descriptor lists ``[bit][layer]``."""
    n_layers = len(f_desc[0]) if f_desc else 0
    out = []
    for layer in range(n_layers):
        a = [d[layer] for d in f_desc]
        b = None if partners is None else [d[layer] for d in partners]
        out.append(pair_similarity(a, b, alpha, beta))
    return out


class _Replay(torch.autograd.Function):
    """Memory-bounded backward: re-run one bit-width at a time, partners detached.

    The replay's tensors (the mixed batch, its labels, the detached descriptors) are
    saved with ``ctx.save_for_backward``, so autograd owns their lifetime like any
    node's: freed after a backward, kept by ``retain_graph=True`` (a second backward
    replays again and gives the same gradients), and a second backward without it
    raises PyTorch's own "backward through the graph a second time" error.
    """

    @staticmethod
    def forward(ctx, value, replay, saved, *tensors):
        ctx.replay = replay
        ctx.save_for_backward(*saved)
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad_out):
        grads = ctx.replay.gradients(grad_out, ctx.saved_tensors)
        return (None, None, None, *grads)


class _ReplayState:
    """What the replay needs besides its saved tensors (held by the autograd node)."""

    def __init__(self, w, bits, sample, n_clean, rng, params, x_index):
        self.w, self.bits, self.n_clean = w, bits, n_clean
        self.sample = sample  # the penalty_bits draw of the forward, reused here
        self.rng = rng
        self.params, self.x_index = params, x_index  # x_index: gradient slot of the batch
        self.layout: tuple[int, ...] = ()

    def pack(self, x_mixed, y, f_desc, g_desc, g_raw) -> list[Tensor | None]:
        """Flatten the tensors to save (descriptors as their ``edges`` and ``hog``);
        descriptors and raw gradients cover the sampled bit-widths only."""
        self.layout = tuple(len(d) for d in f_desc)
        flat = [x_mixed.detach(), y]
        for d in [d for per_bit in f_desc for d in per_bit] + list(g_desc):
            flat += [None, None] if d is None else [d.edges, d.hog]
        return flat + list(g_raw)

    def unpack(self, saved) -> tuple:
        """Inverse of :meth:`pack`: ``(x, y, f_desc, g_desc, g_raw)``."""
        x, y, rest = saved[0], saved[1], list(saved[2:])

        def take(n: int) -> list:
            nonlocal rest
            out, rest = rest[:n], rest[n:]
            return out

        def desc(pair: list) -> Descriptors | None:
            return None if pair[0] is None else Descriptors(pair[0], pair[1])

        f_desc = [[desc(take(2)) for _ in range(n)] for n in self.layout]
        g_desc = [desc(take(2)) for _ in self.sample]
        return x, y, f_desc, g_desc, take(len(self.sample))

    def gradients(self, grad_out: Tensor, saved) -> list[Tensor | None]:
        w, k = self.w, len(self.bits)
        x_saved, y, f_all, g_all, raw_all = self.unpack(saved)
        device = x_saved.device
        needs_x = self.x_index is not None or _needs_input_grad(w)
        factor = _sum_factor(w, k, len(self.sample))
        params = self.params
        n_slots = len(params) + (self.x_index is not None)
        grads: list[Tensor | None] = [None] * n_slots
        snapshot = _Snapshot(w)
        outer_rng = _rng_states(device)
        w._ctx.observe = False
        try:
            with torch.enable_grad():
                for i, bits in enumerate(self.bits):
                    _set_rng_states(self.rng[i], device)
                    s = self.sample.index(bits) if bits in self.sample else None
                    x_in = x_saved.detach()
                    x_in.requires_grad_(needs_x if s is not None else self.x_index is not None)
                    _, ce_clean, ce_adv, f_desc, g_desc, g_raw = _run_bit(
                        w, bits, x_in, y, self.n_clean, graph=True, penalties=s is not None
                    )
                    loss = (ce_clean + w.lambda_adv * ce_adv) / k
                    if f_desc:
                        mine = [f_desc if j == s else d for j, d in enumerate(f_all)]
                        for sim in _feature_sims(mine, f_all, w.alpha, w.beta):
                            pen = _scaled(penalty(sim, w.pairs, only=s), factor)
                            loss = loss + w.lambda_fdp * pen
                    if g_desc is not None:
                        mine = [g_desc if j == s else d for j, d in enumerate(g_all)]
                        sim = pair_similarity(mine, g_all, w.alpha, w.beta)
                        pen = _scaled(penalty(sim, w.pairs, only=s), factor)
                        loss = loss + w.lambda_gpdp * pen
                    if g_raw is not None:
                        if w.lambda_cos != 0:
                            mine = [g_raw if j == s else d for j, d in enumerate(raw_all)]
                            sim = gradient_alignment(mine, raw_all)
                            pen = _scaled(penalty(sim, w.pairs, only=s), factor)
                            loss = loss + w.lambda_cos * pen
                        if w.lambda_smooth != 0:  # a mean over the sample: 1/m of it each
                            smooth = gradient_smoothness(g_raw) / len(self.sample)
                            loss = loss + w.lambda_smooth * smooth
                    inputs = params + ([x_in] if self.x_index is not None else [])
                    got = torch.autograd.grad(loss * grad_out, inputs, allow_unused=True)
                    got = list(got)
                    if self.x_index is not None:
                        got.insert(self.x_index, got.pop())
                    for j, g in enumerate(got):
                        if g is not None:
                            grads[j] = g if grads[j] is None else grads[j] + g
        finally:
            w._ctx.observe = True
            snapshot.restore()  # BN running statistics moved once, in the forward pass
            _set_rng_states(outer_rng, device)
        return grads


def triqdef_loss(w: TriQDefWrapper, x: Tensor, y: Tensor, patch=None) -> Tensor:
    """See :meth:`TriQDefWrapper.loss`.

    Under ``torch.no_grad()`` the loss is computed as in training (observers, BatchNorm
    statistics and ``loss_terms`` move; GPDP still takes its input gradients) and
    returned without a graph, in either backward mode. Under ``torch.inference_mode()``
    it raises [`InputError`][triqdef.errors.InputError] before anything changes.
    """
    w._check_attached()
    _check_grad_mode()
    x, y = _check_inputs(w, x, y, patch)
    value_only = not torch.is_grad_enabled()
    bits = w.active_bits
    sample = _draw_penalty_bits(w, bits)
    snapshot = _Snapshot(w)
    try:
        x_mixed, y_mixed, n_clean = _mix(w, x, y, patch)
        if w.memory_bounded:
            loss = _memory_bounded(w, bits, sample, x, x_mixed, y_mixed, n_clean, value_only)
        else:
            loss = _exact(w, bits, sample, x, x_mixed, y_mixed, n_clean, value_only)
    except BaseException:
        snapshot.restore()
        raise
    if w._recent is not None:  # a bounded window of recent inputs, for BACT calibration
        w._recent.append(x.detach())
    return loss


def _check_values(logits, x, y_mixed, x_mixed, n_clean) -> None:
    c = logits.shape[1]
    ok = torch.isfinite(x).all() & torch.isfinite(x_mixed[n_clean:]).all()
    ok = ok & (y_mixed >= 0).all() & (y_mixed < c).all()
    if not bool(ok):  # the one host synchronisation of the input checks
        raise InputError("loss: " + _explain_bad_values(x, y_mixed, x_mixed[n_clean:], c))


def _needs_raw_grad(w) -> bool:
    """The gradient-diversity terms (GAL/TRS-style) read the raw input gradient."""
    return w.lambda_cos != 0 or w.lambda_smooth != 0


def _needs_input_grad(w) -> bool:
    return w.lambda_gpdp != 0 or _needs_raw_grad(w)


# --- penalty_bits: the sampled pair penalty -------------------------------------------------
def _draw_penalty_bits(w: TriQDefWrapper, bits: tuple[int, ...]) -> tuple[int, ...]:
    """The active bit-widths whose pairs enter FDP and GPDP in this call.

    All of ``bits`` (and no random number drawn) when ``w.penalty_bits`` is None or at
    least ``len(bits)``, or when no term that reads the sample is on (FDP with tapped
    layers, GPDP, ``lambda_cos``, ``lambda_smooth``: e.g. the QAT and multi-bit
    baselines); otherwise ``penalty_bits`` of them, uniformly without replacement,
    from torch's global CPU generator (so identically seeded DDP ranks draw the same),
    kept in the order of ``bits``.
    """
    m = w.penalty_bits
    if m is None or m >= len(bits) or not _uses_sample(w):
        return bits
    picked = sorted(torch.randperm(len(bits), device="cpu")[:m].tolist())
    return tuple(bits[i] for i in picked)


def _uses_sample(w: TriQDefWrapper) -> bool:
    """Some term is computed over the penalty_bits sample (so drawing one matters)."""
    return bool(w.lambda_fdp != 0 and w.layers) or _needs_input_grad(w)


def _sum_factor(w: TriQDefWrapper, k: int, m: int) -> float | None:
    """Factor that makes the sampled ordered-pair sum unbiased: ``K (K-1) / (m (m-1))``.

    None when nothing is sampled (``m == K``) or with ``pairs="mean"``, whose mean over
    the sampled pairs is already unbiased.
    """
    if m >= k or w.pairs != "sum":
        return None
    return k * (k - 1) / (m * (m - 1))


def _scaled(value: Tensor, factor: float | None) -> Tensor:
    return value if factor is None else value * factor


def _exact(w, bits, sample, x, x_mixed, y_mixed, n_clean, value_only=False) -> Tensor:
    gpdp = _needs_input_grad(w)
    x_in = x_mixed
    if gpdp and not x_in.requires_grad:
        x_in = x_in.detach().requires_grad_()
    ce_clean, ce_adv, f_desc, g_desc, g_raw = {}, {}, [], [], []
    grad_ctx = torch.enable_grad() if gpdp else contextlib.nullcontext()
    with grad_ctx:
        for i, b in enumerate(bits):
            on = b in sample  # outside the penalty_bits sample: a plain forward
            _, ce_clean[b], ce_adv[b], fd, gd, gr = _run_bit(
                w,
                b,
                x_in if on else x_mixed,
                y_mixed,
                n_clean,
                graph=not value_only,  # under no_grad: values, no double-backward graph
                check=x if i == 0 else None,
                penalties=on,
            )
            if on:
                f_desc.append(fd)
                g_desc.append(gd)
                g_raw.append(gr)
        n_adv = x_mixed.shape[0] - n_clean
        total = _combine(w, bits, sample, ce_clean, ce_adv, f_desc, g_desc, g_raw, n_adv)
    return total.detach() if value_only else total


def _combine(w, bits, sample, ce_clean, ce_adv, f_desc, g_desc, g_raw, n_adv) -> Tensor:
    """The total and its terms; ``f_desc`` / ``g_desc`` / ``g_raw`` hold the bit-widths of
    ``sample``."""
    k = len(sample)
    factor = _sum_factor(w, len(bits), k)
    clean = torch.stack(list(ce_clean.values())).mean()
    adv = torch.stack(list(ce_adv.values())).mean()
    total = clean + w.lambda_adv * adv
    terms = {"total": None, "clean": clean, "adv": adv}
    for b in bits:
        terms[f"clean/{b}"], terms[f"adv/{b}"] = ce_clean[b], ce_adv[b]
    sims = {}
    if w.lambda_fdp != 0 and n_adv and w.layers:
        layer_sims = _feature_sims(f_desc, None, w.alpha, w.beta)
        fdp = _scaled(sum(penalty(s, w.pairs) for s in layer_sims), factor)
        total = total + w.lambda_fdp * fdp
        terms["fdp"] = fdp
        sims["fdp"] = sum(layer_sims)
    if w.lambda_gpdp != 0 and n_adv:
        sim = pair_similarity(g_desc, None, w.alpha, w.beta)
        gpdp = _scaled(penalty(sim, w.pairs), factor)
        total = total + w.lambda_gpdp * gpdp
        terms["gpdp"] = gpdp
        sims["gpdp"] = sim
    if w.lambda_cos != 0 and n_adv:
        sim = gradient_alignment(g_raw)
        cos = _scaled(penalty(sim, w.pairs), factor)
        total = total + w.lambda_cos * cos
        terms["cos"] = cos
        sims["cos"] = sim
    if w.lambda_smooth != 0 and n_adv:  # a mean over the sample: unbiased, no factor
        smooth = torch.stack([gradient_smoothness(g) for g in g_raw]).mean()
        total = total + w.lambda_smooth * smooth
        terms["smooth"] = smooth
    for name, sim in sims.items():
        for i in range(k):
            for j in range(i + 1, k):
                terms[f"{name}/{sample[i]}-{sample[j]}"] = sim[i, j]
    if len(sample) < len(bits):  # penalty_bits drew a subset: 1 = in the sample, 0 = not
        for b in bits:
            terms[f"penalty_bits/{b}"] = total.new_ones(()) if b in sample else total.new_zeros(())
    terms["total"] = total
    w._last_terms = {name: t.detach() for name, t in terms.items()}
    if w.check_finite and not bool(torch.isfinite(total)):
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


def _memory_bounded(w, bits, sample, x, x_mixed, y_mixed, n_clean, value_only=False) -> Tensor:
    device = x_mixed.device
    ce_clean, ce_adv, f_desc, g_desc, g_raw, rng = {}, {}, [], [], [], []
    for i, b in enumerate(bits):
        rng.append(_rng_states(device))
        on = b in sample  # outside the penalty_bits sample: a plain forward
        gpdp = on and _needs_input_grad(w)
        x_in = x_mixed.detach().requires_grad_(gpdp)
        with torch.enable_grad() if gpdp else torch.no_grad():
            logits, c, a, fd, gd, gr = _run_bit(
                w,
                b,
                x_in,
                y_mixed,
                n_clean,
                graph=False,
                check=x if i == 0 else None,
                penalties=on,
            )
        ce_clean[b], ce_adv[b] = c.detach(), a.detach()
        if on:
            f_desc.append([d.detach() for d in fd])
            g_desc.append(gd.detach() if gd is not None else None)
            g_raw.append(gr.detach() if gr is not None else None)
        del logits, c, a, fd, gd, gr, x_in
    n_adv = x_mixed.shape[0] - n_clean
    value = _combine(w, bits, sample, ce_clean, ce_adv, f_desc, g_desc, g_raw, n_adv)
    if value_only:  # under no_grad: nothing will replay
        return value
    params = [p for p in w.parameters() if p.requires_grad]
    tensors = params + ([x_mixed] if x_mixed.requires_grad else [])
    x_index = len(params) if x_mixed.requires_grad else None
    replay = _ReplayState(w, bits, sample, n_clean, rng, params, x_index)
    saved = replay.pack(x_mixed, y_mixed, f_desc, g_desc, g_raw)
    return _Replay.apply(value, replay, saved, *tensors)

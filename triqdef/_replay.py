"""The memory-bounded TriQDef loss: its backward replays one bit-width at a time."""

from __future__ import annotations

import torch
from torch import Tensor

from ._terms import combine, feature_sims, needs_input_grad, run_bit, scaled, sum_factor
from .losses import Descriptors, gradient_alignment, gradient_smoothness, pair_similarity, penalty
from .quant import _Snapshot

__all__ = ["memory_bounded_loss"]


def _rng_states(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_states(states, device: torch.device) -> None:
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state(states[1], device)


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

    def __init__(self, o, w, bits, sample, n_clean, rng, params, x_index):
        self.o, self.w, self.bits, self.n_clean = o, w, bits, n_clean
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
        """Inverse of `pack`: ``(x, y, f_desc, g_desc, g_raw)``."""
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
        o, w, k = self.o, self.w, len(self.bits)
        x_saved, y, f_all, g_all, raw_all = self.unpack(saved)
        device = x_saved.device
        needs_x = self.x_index is not None or needs_input_grad(o)
        factor = sum_factor(o, k, len(self.sample))
        params = self.params
        n_slots = len(params) + (self.x_index is not None)
        grads: list[Tensor | None] = [None] * n_slots
        snapshot = _Snapshot(w)
        outer_rng = _rng_states(device)
        try:
            with w.frozen_observers(), torch.enable_grad():
                for i, bits in enumerate(self.bits):
                    _set_rng_states(self.rng[i], device)
                    s = self.sample.index(bits) if bits in self.sample else None
                    x_in = x_saved.detach()
                    x_in.requires_grad_(needs_x if s is not None else self.x_index is not None)
                    _, ce_clean, ce_adv, f_desc, g_desc, g_raw = run_bit(
                        o, w, bits, x_in, y, self.n_clean, graph=True, penalties=s is not None
                    )
                    loss = (ce_clean + o.lambda_adv * ce_adv) / k
                    if f_desc:
                        mine = [f_desc if j == s else d for j, d in enumerate(f_all)]
                        for sim in feature_sims(mine, f_all, o.alpha, o.beta):
                            pen = scaled(penalty(sim, o.pairs, only=s), factor)
                            loss = loss + o.lambda_fdp * pen
                    if g_desc is not None:
                        mine = [g_desc if j == s else d for j, d in enumerate(g_all)]
                        sim = pair_similarity(mine, g_all, o.alpha, o.beta)
                        pen = scaled(penalty(sim, o.pairs, only=s), factor)
                        loss = loss + o.lambda_gpdp * pen
                    if g_raw is not None:
                        if o.lambda_cos != 0:
                            mine = [g_raw if j == s else d for j, d in enumerate(raw_all)]
                            sim = gradient_alignment(mine, raw_all)
                            pen = scaled(penalty(sim, o.pairs, only=s), factor)
                            loss = loss + o.lambda_cos * pen
                        if o.lambda_smooth != 0:  # a mean over the sample: 1/m of it each
                            smooth = gradient_smoothness(g_raw) / len(self.sample)
                            loss = loss + o.lambda_smooth * smooth
                    inputs = params + ([x_in] if self.x_index is not None else [])
                    got = torch.autograd.grad(loss * grad_out, inputs, allow_unused=True)
                    got = list(got)
                    if self.x_index is not None:
                        got.insert(self.x_index, got.pop())
                    for j, g in enumerate(got):
                        if g is not None:
                            grads[j] = g if grads[j] is None else grads[j] + g
        finally:
            snapshot.restore()  # BN running statistics moved once, in the forward pass
            _set_rng_states(outer_rng, device)
        return grads


def memory_bounded_loss(
    o, w, bits, sample, x, x_mixed, y_mixed, n_clean, value_only=False
) -> Tensor:
    """The loss's value from one forward per bit-width without a double-backward graph;
    its backward replays each bit-width with the others' descriptors detached (the same
    gradients as the exact loss, one double-backward graph alive at a time)."""
    device = x_mixed.device
    ce_clean, ce_adv, f_desc, g_desc, g_raw, rng = {}, {}, [], [], [], []
    for i, b in enumerate(bits):
        rng.append(_rng_states(device))
        on = b in sample  # outside the penalty_bits sample: a plain forward
        gpdp = on and needs_input_grad(o)
        x_in = x_mixed.detach().requires_grad_(gpdp)
        with torch.enable_grad() if gpdp else torch.no_grad():
            logits, c, a, fd, gd, gr = run_bit(
                o,
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
    value = combine(o, w, bits, sample, ce_clean, ce_adv, f_desc, g_desc, g_raw, n_adv)
    if value_only:  # under no_grad: nothing will replay
        return value
    params = [p for p in w.parameters() if p.requires_grad]
    tensors = params + ([x_mixed] if x_mixed.requires_grad else [])
    x_index = len(params) if x_mixed.requires_grad else None
    replay = _ReplayState(o, w, bits, sample, n_clean, rng, params, x_index)
    saved = replay.pack(x_mixed, y_mixed, f_desc, g_desc, g_raw)
    return _Replay.apply(value, replay, saved, *tensors)

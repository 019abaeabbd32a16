"""`TriQDefWrapper`: one shared backbone at several bit-widths, trained by the TriQDef loss."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ._checks import check_feature_inputs, check_names
from ._multibit import MultiBitModel
from ._statedict import check_state_dict
from .errors import ConfigError
from .losses import DescriptorConfig
from .objective import TriQDefObjective
from .patches import PatchSource

__all__ = ["TriQDefWrapper", "DEFAULT_BITS", "check_state_dict"]

DEFAULT_BITS = (32, 8, 5, 4, 2)

_check_names = check_names  # imported from here by triqdef.evaluate


def _fdp_off_message(model: nn.Module, lambda_fdp: float) -> str:
    """The warning for FDP weighted but tapping nothing, with layers worth tapping."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    head = linears[-1] if linears else None  # the final classifier, not worth tapping

    def is_head(name: str) -> bool:
        return head is not None and (head == name or head.startswith(name + "."))

    names = [n for n, _ in model.named_children() if not is_head(n)]
    if not names:  # a flat model: any named module
        names = [n for n, _ in model.named_modules() if n and not is_head(n)]
    hint = f"e.g. layers={names[:5]}" if names else "layers=[...]"
    return (
        f"lambda_fdp={lambda_fdp} but layers=(): the Feature Disalignment Penalty is off. "
        f"Tap early-middle layers, {hint}, or pass lambda_fdp=0 to say FDP is meant to be off"
    )


def _setting(name: str) -> Any:
    """A wrapper attribute that reads and sets the objective's setting ``name``."""

    def get(self: TriQDefWrapper) -> Any:
        return getattr(self._objective, name)

    def put(self: TriQDefWrapper, value: Any) -> None:
        setattr(self._objective, name, value)

    return property(get, put, doc=f"The objective's ``{name}`` (see the constructor).")


class TriQDefWrapper(MultiBitModel):
    """Run one model at several bit-widths with one shared set of weights.

    Hooks are attached to the model you pass (no copy, no edit of its class):

    * every ``nn.Conv1d/2d/3d`` and ``nn.Linear`` (and ``nn.MultiheadAttention``'s
      projections) gets its weight fake-quantized per output channel and its input
      fake-quantized per tensor at the active bit-width (see
      [`triqdef.quant`][triqdef.quant]);
      a weight computed by ``torch.nn.utils.parametrize`` (e.g.
      ``torch.nn.utils.parametrizations.weight_norm`` or ``spectral_norm``) or by the
      older ``torch.nn.utils.weight_norm`` / ``spectral_norm`` is quantized as computed,
      and gradients reach the underlying parameters;
    * every BatchNorm layer keeps one set of running statistics per bit-width;
    * the layers named in ``layers`` are tapped for the perceptual penalties.

    At 32 bits no hook does anything: the output is bit-for-bit the bare model's.

    Args:
        model: any ``nn.Module``.
        bits: the bit-widths to support, each in [2, 32]; sorted high to low.
        layers: names (from ``model.named_modules()``) whose outputs are tapped.
        exclude: names of layers kept in full precision (a container excludes
            everything inside it).
        per_bit_bn: keep BatchNorm running statistics per bit-width (default).
            With ``False`` every bit-width shares the model's own statistics.
        momentum: weight of a new batch in the activation observers' moving average.
        lambda_adv: weight of the cross-entropy on patched inputs.
        lambda_fdp: weight of the Feature Disalignment Penalty (0 turns it off).
        lambda_gpdp: weight of the Gradient Perceptual Dissonance Penalty (0 turns it off).
        alpha: weight of the edge SoftDice inside both penalties.
        beta: weight of the HOG cosine inside both penalties.
        rho: share of each batch that is patched, in [0, 1].
        pairs: ``"mean"`` over unordered bit-width pairs (default) or ``"sum"``
            over ordered pairs (the paper's literal formula).
        patch_source: patches used when ``loss`` gets ``patch=None``; default
            [`RandomPatch`][triqdef.patches.RandomPatch] (uniform noise).
        memory_bounded: compute the loss's gradient one bit-width at a time, so only
            one double-backward graph is alive (see
            [`loss`][triqdef.TriQDefWrapper.loss]).
        check_finite: raise [`NonFiniteLossError`][triqdef.errors.NonFiniteLossError] instead of
            returning a NaN/Inf loss (one host synchronisation per call).
        descriptor: settings of the perceptual descriptors (quantile, sharpness, HOG).
        penalty_bits: an int ``m >= 2`` (default 2) or ``None`` (FDP and GPDP over
            every pair of active bit-widths: the exact objective). With ``m``, each
            [`loss`][triqdef.TriQDefWrapper.loss] call draws ``m`` of the ``K`` active
            bit-widths uniformly without replacement and computes FDP and GPDP (and ``lambda_cos`` /
            ``lambda_smooth``) over that sample only; only those ``m`` bit-widths
            build a double-backward graph, the others run a plain forward for their
            cross-entropy, which stays over all ``K``. The estimate is unbiased:
            ``pairs="mean"`` averages the sampled pairs, ``pairs="sum"`` scales their
            ordered sum by ``K (K-1) / (m (m-1))``. With ``m >= K`` (e.g. the default
            with two active bit-widths), or when none of those penalties is on, every
            bit-width is used and the result is exactly that of ``None``, with no
            random number drawn. The default 2 held the defence within seed noise
            while training 1.65x faster than ``None`` (see docs/objective.md). The
            draw uses torch's global CPU generator (``torch.randperm``): seed it with
            ``torch.manual_seed`` to reproduce it, and seed every DDP rank identically
            so that all ranks draw the same bit-widths. A validated attribute:
            assigning an invalid value raises [`ConfigError`][triqdef.errors.ConfigError]
            and keeps the old one.
        bn_rows: where [`loss`][triqdef.TriQDefWrapper.loss] takes BatchNorm running
            statistics from: ``"all"`` (default) the whole mixed batch, ``"clean"``
            its clean rows only, so that evaluation on clean data is not normalised
            with statistics of patched images. Either way the forward normalises with
            the whole batch's statistics, and a forward outside the loss uses every
            row. Applies to every bit-width's statistics (the model's own at 32 bits)
            and to BatchNorm with ``momentum=None``; needs BatchNorm inputs whose first
            dimension is the batch.
        input_bits: the fewest bits the model's own input is quantized to (default
            8; ``None``: no floor, the input is quantized at the active bit-width like
            any other layer input). A layer that reads the model's input tensor itself
            (the first convolution, usually) quantizes it at ``max(bits, input_bits)``
            bits, and not at all at 32; its weights and every other layer stay at the
            active bit-width. The paper quantizes activations after nonlinearities; a
            raw image at 2 bits (4 grey levels) is not its setting. A layer that reads
            a tensor computed from the input (e.g. normalised) is not affected.
            Honoured by [`export`][triqdef.TriQDefWrapper.export] and
            [`triqdef.save`][triqdef.io.save] / [`triqdef.load`][triqdef.io.load].
            It composes with ``min_bits`` and ``act_bits`` as one more floor: that
            layer's input grid is ``max(its activation bit-width, input_bits)``.
        min_bits: per-layer precision floors, ``{layer name or pattern: bits}``
            (default ``None``: none). A named layer is never quantized below that
            bit-width: at the active bit-width ``b`` its weights and inputs run at
            ``max(b, floor)`` bits (32 bits stays the identity for every layer; a floor
            of 32 keeps the layer in full precision while it keeps its observers). A
            name is a module of the model and covers the quantized layers inside it;
            a key with ``*``, ``?`` or ``[`` is an ``fnmatch`` pattern over the
            quantized layers' names (``"layer1.*"``); a layer matched twice takes the
            higher floor. Values are ints in [2, 32], not necessarily in ``bits``: the
            layer keeps the active bit-width's observer row (it sees the inputs of the
            model running at ``b``) and reads its scale on the finer grid, as
            ``input_bits`` does. Resolved to ``{quantized layer: floor}`` in
            ``wrapper.min_bits``. Honoured by ``export``, ``triqdef.save`` /
            ``load``, ``triqdef.save_quantized`` and ``triqdef.export_onnx``.
        act_bits: the bit-width of the layer inputs (activations) when it is not the
            weights' (default ``None``: the same as the weights, as the paper does).
            An int is a floor for every layer input: ``act_bits=8`` with
            ``bits=(32, 8, 4, 2)`` runs W8A8, W4A8 and W2A8. A mapping
            ``{active bit-width: activation bits}`` sets them one by one, above or
            below the weights' (``{4: 8}``: W4A8 at 4 bits, every other bit-width as
            it is; ``{8: 4}``: W8A4). A layer's input grid is then
            ``max(act_bits at b, its min_bits floor)``, and ``input_bits`` floors the
            model's own input on top. Observers as for ``min_bits``. Honoured like
            ``min_bits``.
        quantizer: ``"minmax"`` (default): scales read off the weights' per-channel
            maxima and the observers' moving ranges. ``"lsq"``: learned step sizes
            (LSQ, Esser et al. 2020), one per (layer, bit-width), per output channel
            for weights (``quantizers[<layer>].weight_log_steps``) and per tensor for
            inputs (``quantizers[<layer>].act_log_step``); they are parameters of the
            wrapper (``wrapper.parameters()`` yields them), held as logarithms so that
            they stay positive and Adam moves them by relative amounts (see
            [`lsq_step`][triqdef.quant.lsq_step]), trained with LSQ's gradient scale
            ``1 / sqrt(N * Qp)``, and initialised when a bit-width first sees data from
            the observer (see [`LayerQuantizer`][triqdef.quant.LayerQuantizer]). Keep
            them out of weight decay (a decay pulls a log step towards a step of 1).
            ``export``, ``save_quantized`` and ``export_onnx`` freeze them as scales.
        lambda_cos: weight of the gradient-alignment penalty (GAL/TRS-style, experimental;
            default 0: off, the objective is bit for bit the one without it): the mean
            over pairs of (sampled) active bit-widths of ``|cos|`` between the raw input
            gradients of the patched rows' cross-entropy, per sample (flattened over
            ``C*H*W``), averaged over samples; in [0, 1] with ``pairs="mean"``. Follows
            ``pairs`` and ``penalty_bits`` like FDP and GPDP. Costs GPDP's double backward
            (shared with it when both are on). See docs/objective.md.
        lambda_smooth: weight of the TRS smoothness term (experimental; default 0: off):
            the mean over the (sampled) active bit-widths of the per-sample squared L2
            norm of the same input gradients (w.r.t. images in [0, 1]), averaged over
            samples. Its scale depends on the model and data: about 1.4 to 2.1 for an
            untrained ``SmallCNN(width=16)`` on Fashion-MNIST (cross-entropy about 2.5
            per term), about 0.7 to 1.4 over the first 300 Adam steps (see
            docs/objective.md). Independent of ``pairs``.
        lambda_dverge: weight of a DVERGE-style term (Yang et al., 2020; experimental;
            default 0: off). Per call, one tapped layer is drawn; for each bit-width
            ``i`` of the ``penalty_bits`` sample, the clean rows' paired images
            ``x_s = x.roll(-1)`` are moved within 0.07 (L-inf, 10 signed steps of
            0.007) until their features at ``i`` match those of ``x``, and every other
            sampled bit-width is trained to give them ``x_s``'s label (mean
            cross-entropy over the ordered pairs). Observers and BatchNorm statistics are
            only read. Needs ``layers``; not with ``memory_bounded``. Costs about ten
            forward/backward passes of the clean rows per sampled bit-width.

    Raises:
        ConfigError: an argument is not valid, or a layer to quantize holds its weight
            in a way the quantizer cannot swap (the message names it), or a
            ``min_bits`` name holds no quantized layer; nothing is attached to the model.
        LayerNotFoundError: a name in ``layers``, ``exclude`` or ``min_bits`` is not a
            module of the model, or a ``min_bits`` pattern matches no quantized layer;
            the message lists the closest names.

    Warns:
        UserWarning: ``lambda_fdp > 0`` but ``layers`` is empty, so FDP is off; the
            message names layers worth tapping.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        ...                     nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
        >>> w = TriQDefWrapper(net, bits=(32, 4), layers=["2"])
        >>> _ = w(torch.rand(8, 1, 8, 8))            # 32 bits: the bare model
        >>> with w.at_bits(4):
        ...     logits = w(torch.rand(8, 1, 8, 8))   # training mode: observers update
        >>> logits.shape
        torch.Size([8, 10])
        >>> w.detach()

        Per-layer precision: the first convolution and the classifier never below 8
        bits, and 8-bit activations everywhere (W4A8 at 4 bits):

        >>> w = TriQDefWrapper(net, bits=(32, 8, 4), layers=["2"],
        ...                    min_bits={"0": 8, "4": 8}, act_bits=8)
        >>> w.min_bits
        {'0': 8, '4': 8}
        >>> w.detach()
    """

    def __init__(
        self,
        model: nn.Module,
        bits: Sequence[int] = DEFAULT_BITS,
        layers: Sequence[str] = (),
        exclude: Sequence[str] = (),
        *,
        per_bit_bn: bool = True,
        momentum: float = 0.1,
        lambda_adv: float = 1.0,
        lambda_fdp: float = 0.8,
        lambda_gpdp: float = 0.5,
        alpha: float = 0.5,
        beta: float = 1.0,
        rho: float = 0.5,
        pairs: str = "mean",
        patch_source: PatchSource | None = None,
        memory_bounded: bool = False,
        check_finite: bool = True,
        descriptor: DescriptorConfig | None = None,
        penalty_bits: int | None = 2,
        bn_rows: str = "all",
        input_bits: int | None = 8,
        lambda_cos: float = 0.0,
        lambda_smooth: float = 0.0,
        lambda_dverge: float = 0.0,
        min_bits: Mapping[str, int] | None = None,
        act_bits: int | Mapping[int, int] | None = None,
        quantizer: str = "minmax",
    ) -> None:
        bits, layers, exclude = MultiBitModel._check_model_args(
            model, bits, layers, exclude, momentum
        )
        objective = TriQDefObjective(
            lambda_adv=lambda_adv,
            lambda_fdp=lambda_fdp,
            lambda_gpdp=lambda_gpdp,
            alpha=alpha,
            beta=beta,
            rho=rho,
            pairs=pairs,
            patch_source=patch_source,
            memory_bounded=memory_bounded,
            check_finite=check_finite,
            descriptor=descriptor,
            penalty_bits=penalty_bits,
            lambda_cos=lambda_cos,
            lambda_smooth=lambda_smooth,
            lambda_dverge=lambda_dverge,
        )
        if objective.lambda_dverge > 0 and not layers:
            raise ConfigError(
                f"lambda_dverge={lambda_dverge} needs tapped layers (it distils the features "
                "of one of them): pass layers=[...], e.g. the outputs of the model's blocks"
            )
        super().__init__(
            model,
            bits,
            layers,
            exclude,
            per_bit_bn=per_bit_bn,
            momentum=momentum,
            bn_rows=bn_rows,
            input_bits=input_bits,
            min_bits=min_bits,
            act_bits=act_bits,
            quantizer=quantizer,
        )
        self._objective = objective
        if isinstance(objective.patch_source, nn.Module):  # a submodule, as it always was
            self._modules["patch_source"] = objective.patch_source
        if objective.lambda_fdp > 0 and not layers:
            warnings.warn(_fdp_off_message(model, objective.lambda_fdp), UserWarning, stacklevel=2)

    # --- the objective -----------------------------------------------------------------
    lambda_adv = _setting("lambda_adv")
    lambda_fdp = _setting("lambda_fdp")
    lambda_gpdp = _setting("lambda_gpdp")
    lambda_cos = _setting("lambda_cos")
    lambda_smooth = _setting("lambda_smooth")

    @property
    def lambda_dverge(self) -> float:
        """The objective's ``lambda_dverge`` (see the constructor); setting a value > 0
        needs tapped ``layers`` and ``memory_bounded=False``, else
        [`ConfigError`][triqdef.errors.ConfigError] and the old value is kept."""
        return self._objective.lambda_dverge

    @lambda_dverge.setter
    def lambda_dverge(self, value: float) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            if not self.layers:
                raise ConfigError(
                    f"lambda_dverge={value} needs tapped layers (it distils the features of "
                    "one of them); this wrapper has layers=()"
                )
        self._objective.lambda_dverge = value

    alpha = _setting("alpha")
    beta = _setting("beta")
    rho = _setting("rho")
    pairs = _setting("pairs")
    patch_source = _setting("patch_source")
    memory_bounded = _setting("memory_bounded")
    check_finite = _setting("check_finite")
    descriptor = _setting("descriptor")

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "patch_source" and isinstance(value, nn.Module):
            # nn.Module.__setattr__ would register it without telling the objective
            self._objective.patch_source = value
            self._modules["patch_source"] = value
            return
        super().__setattr__(name, value)

    @property
    def objective(self) -> TriQDefObjective:
        """The [`TriQDefObjective`][triqdef.objective.TriQDefObjective] that
        [`loss`][triqdef.TriQDefWrapper.loss] computes: its settings (also readable and
        assignable as this wrapper's attributes of the same names), last terms and
        recent inputs."""
        return self._objective

    def forward(self, x, y: torch.Tensor | None = None, patch=None, **kwargs):
        """Run the model at the active bit-width, or return the TriQDef loss.

        ``wrapper(x)`` returns the model's output at the active bit-width;
        ``wrapper(x, y, patch)`` returns ``wrapper.loss(x, y, patch)``, so that
        ``DistributedDataParallel(wrapper)(x, y, patch)`` synchronises the loss's
        gradients.
        """
        self._check_attached()
        if y is None:
            if patch is not None:
                raise ConfigError("wrapper(x, patch=...) needs labels: call wrapper(x, y, patch)")
            return self.model(x, **kwargs)
        return self.loss(x, y, patch)

    # --- what a forward records ----------------------------------------------------------
    def features(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Run the model at the active bit-width and return the tapped outputs.

        In training mode the observers learn from this forward as from any other
        (a batch holding NaN or Inf is skipped by every observer it reaches).

        Returns:
            ``{layer name: output}`` for every name in ``layers``; nothing is kept
            after the call.

        Raises:
            InputError: the first argument is not a tensor, or a tensor argument is not
                on the model's device or (floating, outside autocast) not of its dtype.
        """
        self._check_attached()
        check_feature_inputs(self.model, args, kwargs)
        with self._taps.capture():
            self.model(*args, **kwargs)
            return self._taps.pop()

    @contextlib.contextmanager
    def capture_features(self) -> Iterator[dict[str, torch.Tensor]]:
        """Context manager: tap the ``layers`` during the forwards run inside the block.

        Yields a dict that is empty inside the block and holds ``{layer name: output}``
        of the forward(s) once the block ends without error; nothing is kept by the
        wrapper afterwards. Unlike [`features`][triqdef.TriQDefWrapper.features], the
        caller runs the model (and keeps its output).
        """
        out: dict[str, torch.Tensor] = {}
        with self._taps.capture():
            yield out
            out.update(self._taps.pop())

    @contextlib.contextmanager
    def mixed_batch(self, n_clean: int, n_total: int) -> Iterator[None]:
        """Context manager: the forwards inside the block run a loss batch whose first
        ``n_clean`` of ``n_total`` rows are clean.

        Inside it, BatchNorm with ``bn_rows="clean"`` updates its running statistics
        from the clean rows only, and the model's output is reduced to its ``(B, K)``
        logits (a tuple, mapping or ``(B, K, 1, 1)`` output; see
        [`loss`][triqdef.TriQDefWrapper.loss]). The objective runs each bit-width's
        forward inside it.
        """
        previous = self._ctx.rows
        self._ctx.rows = (n_clean, n_total)
        try:
            yield
        finally:
            self._ctx.rows = previous

    @contextlib.contextmanager
    def frozen_observers(self) -> Iterator[None]:
        """Context manager: inside the block no activation observer learns, even in training
        mode, and BatchNorm with ``bn_rows="clean"`` moves no statistics (e.g. while a
        memory-bounded backward replays a forward)."""
        previous = self._ctx.observe
        self._ctx.observe = False
        try:
            yield
        finally:
            self._ctx.observe = previous

    @property
    def penalty_bits(self) -> int | None:
        """How many active bit-widths each [`loss`][triqdef.TriQDefWrapper.loss] call samples
        for FDP and GPDP.

        Default 2; ``None``: all of them (the exact objective). Assignable between
        steps (e.g. ``wrapper.penalty_bits = None`` for a final exact phase); a value
        other than ``None`` or an int ``>= 2`` raises
        [`ConfigError`][triqdef.errors.ConfigError] and leaves the previous value.
        """
        return self._objective.penalty_bits

    @penalty_bits.setter
    def penalty_bits(self, m: int | None) -> None:
        self._objective.penalty_bits = m

    def set_active_bits(self, bits: Iterable[int]) -> TriQDefWrapper:
        """Choose the bit-widths that [`loss`][triqdef.TriQDefWrapper.loss] trains (a subset of
        ``bits``)."""
        try:
            chosen = tuple(sorted(set(bits), reverse=True))
        except TypeError:
            raise ConfigError(f"active bits must be a set of bit-widths, got {bits!r}") from None
        unknown: list[object] = [b for b in chosen if isinstance(b, bool) or not isinstance(b, int)]
        unknown += [b for b in chosen if b not in self.bits]
        if not chosen or unknown:
            raise ConfigError(
                f"active bits must be a non-empty subset of {self.bits}, got {tuple(bits)}"
            )
        self.active_bits = chosen
        return self

    def loss(
        self, x: torch.Tensor, y: torch.Tensor, patch: torch.Tensor | PatchSource | None = None
    ) -> torch.Tensor:
        """The TriQDef training loss over the active bit-widths.

        ``L = L_clean + lambda_adv * L_adv + lambda_fdp * L_FDP + lambda_gpdp * L_GPDP``

        The last ``round(rho * B)`` samples are patched (``x * (1 - M) + P * M``),
        the rest stay clean; each active bit-width runs one forward over that
        mixed batch. ``L_clean`` / ``L_adv`` are the cross-entropies of the clean /
        patched rows averaged over bit-widths; FDP compares the tapped ``layers``
        and GPDP the input gradients of the patched rows across bit-width pairs
        (see [`triqdef.losses`][triqdef.losses] and `triqdef.objective`). Penalties with
        weight 0 cost nothing: no taps, no double backward. With ``lambda_cos`` /
        ``lambda_smooth`` > 0 the loss adds ``lambda_cos * L_cos + lambda_smooth *
        L_smooth`` (GAL/TRS-style gradient diversity, computed from the same input
        gradients as GPDP), and with ``lambda_dverge`` > 0 ``lambda_dverge * L_dverge``
        (DVERGE-style cross-bit distilled features, on the clean rows).

        With ``memory_bounded=True`` the returned loss's backward re-runs one
        bit-width at a time with the other bit-widths' descriptors detached, which
        gives the same gradients with one double-backward graph alive at a time,
        at the price of a second forward pass per bit-width; ``backward(retain_graph=True)``
        works in both modes (a second backward accumulates the same gradients again).

        Under ``torch.no_grad()`` the loss is computed as in training (observers,
        BatchNorm statistics and [`loss_terms`][triqdef.TriQDefWrapper.loss_terms] move)
        and returned without a graph; under ``torch.inference_mode()`` it raises
        ``InputError`` before anything changes.

        With ``penalty_bits=m`` (fewer than the active bit-widths), the penalties are
        an unbiased estimate over the pairs of ``m`` bit-widths drawn for this call
        (the cross-entropy terms stay over every active bit-width); the memory-bounded
        backward reuses the same draw.

        The model may return its logits ``(B, K)`` directly, or inside a tuple or
        namedtuple (the first item is used: torchvision's ``GoogLeNetOutputs`` and
        ``InceptionOutputs`` give their main logits, the auxiliary ones are ignored),
        inside a mapping (its ``"logits"`` entry, e.g. a Hugging Face ``ModelOutput``,
        else its ``"out"`` entry), or as ``(B, K, 1, 1)`` (squeezed). ``wrapper(x)``
        still returns what the model returns.

        Args:
            x: images ``(B, C, H, W)`` on the model's device.
            y: class indices ``(B,)`` of any integer dtype (used as int64).
            patch: ``None`` (the wrapper's ``patch_source``), one patch ``(C, h, w)``
                placed at a random location per sample, a batch ``(N, C, h, w)``
                (one drawn per patched sample), or a patch source
                ``callable(x, y, wrapper) -> x_adv``.

        Returns:
            Scalar loss. [`loss_terms`][triqdef.TriQDefWrapper.loss_terms] gives its
            breakdown.

        Raises:
            InputError: bad shapes, devices, labels out of range or not integers,
                images of another dtype than the model's parameters (outside
                autocast), NaN/Inf in ``x`` or the patch, a model output that holds no
                ``(B, K)`` logits (e.g. ``(B, K, H, W)`` segmentation scores), or a call
                under ``torch.inference_mode()``; nothing is changed.
            NonFiniteLossError: a term is NaN/Inf; nothing is changed.
            ConcurrentUseError: another thread holds the bit-width (see
                [`at_bits`][triqdef.TriQDefWrapper.at_bits]); nothing is changed.
        """
        with self._guard.hold("loss", self._bits):
            self._check_attached()
            return self._objective(self, x, y, patch)

    def loss_terms(self) -> dict[str, float]:
        """Breakdown of the last [`loss`][triqdef.TriQDefWrapper.loss] as plain floats
        (synchronises only when called).

        Keys: ``total``, ``clean``, ``adv``, ``clean/<b>``, ``adv/<b>`` per bit-width,
        ``fdp``, ``gpdp``, ``cos``, ``smooth`` (when on) and ``fdp/<b_i>-<b_j>``,
        ``gpdp/<b_i>-<b_j>``, ``cos/<b_i>-<b_j>``: the similarity of each pair (summed
        over tapped layers for FDP; the sample-mean ``|cos|`` of the input gradients
        for ``cos``). When
        ``penalty_bits`` drew a subset of the active bit-widths, only the sampled pairs
        appear, and ``penalty_bits/<b>`` is 1.0 for each sampled bit-width and 0.0
        for the others (its running mean is the inclusion rate, ``m / K``).
        """
        return self._objective.terms()

    def keep_recent_inputs(self, n: int | None) -> None:
        """Keep the inputs ``x`` of the last ``n`` successful [`loss`][triqdef.TriQDefWrapper.loss]
        calls (``None``, the default: keep none); [`BACTSchedule`][triqdef.BACTSchedule]
        calibrates on them when it has no loader. Starts an empty window.

        Raises:
            ConfigError: ``n`` is neither ``None`` nor a positive int.
        """
        self._objective.keep_recent(n)

    def recent_inputs(self) -> list[torch.Tensor]:
        """The inputs kept by [`keep_recent_inputs`][triqdef.TriQDefWrapper.keep_recent_inputs],
        oldest first (detached; empty when none are kept)."""
        return self._objective.recent()

    @property
    def _recent(self):  # the objective's window (None: none kept), for tests
        return self._objective._recent

    @property
    def _last_terms(self) -> dict[str, torch.Tensor]:  # the last loss's terms, unreduced
        return self._objective.last_terms

    def extra_repr(self) -> str:
        return (
            f"bits={self.bits}, current_bits={self._bits}, active_bits={self.active_bits}, "
            f"layers={list(self.layers)}, exclude={list(self.exclude)}, "
            f"per_bit_bn={self.per_bit_bn}, bn_rows={self.bn_rows!r}, "
            f"input_bits={self.input_bits}, lambda_adv={self.lambda_adv}, "
            f"lambda_fdp={self.lambda_fdp}, lambda_gpdp={self.lambda_gpdp}, alpha={self.alpha}, "
            f"beta={self.beta}, rho={self.rho}, pairs={self.pairs!r}, "
            f"penalty_bits={self.penalty_bits}"
            + (f", min_bits={self.min_bits}" if self.min_bits else "")
            + (f", act_bits={self.act_bits}" if self.act_bits is not None else "")
            + (f", quantizer={self.quantizer!r}" if self.quantizer != "minmax" else "")
            + (f", lambda_cos={self.lambda_cos}" if self.lambda_cos else "")
            + (f", lambda_smooth={self.lambda_smooth}" if self.lambda_smooth else "")
            + (f", lambda_dverge={self.lambda_dverge}" if self.lambda_dverge else "")
            + (", memory_bounded=True" if self.memory_bounded else "")
            + (", detached" if self._detached else "")
        )

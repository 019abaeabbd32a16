"""The evaluation's results: transfer matrices and alignment reports, as tables and JSON."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from .plot import alignment_heatmap, transfer_heatmap

__all__ = ["AlignmentReport", "INPUT_GRAD", "METRICS", "TransferMatrix"]

METRICS = ("cosine", "edge_iou", "hog_cosine", "soft_dice", "soft_hog")
"""Metric keys of [`AlignmentReport`][triqdef.evaluate.AlignmentReport], in report order."""
_METRIC_LABELS = {
    "cosine": "Cosine",
    "edge_iou": "Edge IoU",
    "hog_cosine": "HOG cosine",
    "soft_dice": "SoftDice",
    "soft_hog": "SoftHOG cosine",
}
INPUT_GRAD = "input_grad"
"""Name of the input-gradient map in [`AlignmentReport`][triqdef.evaluate.AlignmentReport]
(the others are layer names)."""
_REDUCTIONS = ("pooled", "mean", "max", "diagonal")


def _fmt_pct(value: float, digits: int) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.{digits}f}"


def _fmt(value: float, digits: int) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _rate(successes: int, eligible: int) -> float:
    return successes / eligible if eligible else float("nan")


def _json_float(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def _from_json_float(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def _bits_label(b: int) -> str:
    return f"{b}-bit"


def _pair_label(pair: tuple[int, int]) -> str:
    return f"{pair[0]}<->{pair[1]}"


@dataclass
class TransferMatrix:
    """ASR of patches crafted at each source bit-width, evaluated at each target bit-width.

    Cell ``asr[i][j]`` is the ASR (as defined in `triqdef.evaluate`) at ``target_bits[j]``
    of the patched images an attack produced against ``source_bits[i]``; the diagonal
    (``source == target``) is the direct, white-box ASR. ``noise_floor[j]`` is the ASR at
    ``target_bits[j]`` of uniform-noise patches of the same size at the same locations
    (pooled over the source rows): an attack is only as strong as its margin over it.

    Attributes:
        source_bits: rows.
        target_bits: columns.
        asr: ``[len(source_bits)][len(target_bits)]`` ASR in [0, 1] (``nan``: no eligible
            sample).
        counts: ``(successes, eligible)`` per cell.
        noise_floor: noise-patch ASR per target bit-width.
        noise_counts: ``(successes, eligible)`` of the noise patches per target bit-width.
        attack: attack name (the attack's ``name`` attribute, else its class name).
        targeted: whether the ASR is targeted.
        target: the target class of a targeted attack with one target, else ``None``.
        samples: number of images evaluated.

    Example:
        >>> m = TransferMatrix([32, 4], [32, 4], [[0.9, 0.5], [0.6, 0.8]],
        ...                    [[(9, 10), (5, 10)], [(6, 10), (8, 10)]], [0.1, 0.2],
        ...                    [(2, 20), (4, 20)], attack="LAVAN", samples=10)
        >>> print(m.to_markdown())
        | LAVAN ASR (%): source \\ target | 32-bit | 4-bit |
        |---|---|---|
        | 32-bit | 90.0 | 50.0 |
        | 4-bit | 60.0 | 80.0 |
        | noise floor | 10.0 | 20.0 |
        >>> m.diagonal()
        [0.9, 0.8]
    """

    source_bits: list[int]
    target_bits: list[int]
    asr: list[list[float]]
    counts: list[list[tuple[int, int]]]
    noise_floor: list[float]
    noise_counts: list[tuple[int, int]]
    attack: str = "attack"
    targeted: bool = False
    target: int | None = None
    samples: int = 0

    def asr_at(self, source: int, target: int) -> float:
        """ASR of patches crafted at ``source`` bits, evaluated at ``target`` bits.

        Args:
            source: a bit-width in ``source_bits``.
            target: a bit-width in ``target_bits``.

        Returns:
            the ASR in [0, 1] (``nan`` when no sample was eligible).
        """
        try:
            return self.asr[self.source_bits.index(source)][self.target_bits.index(target)]
        except ValueError:
            raise InputError(
                f"no cell ({source}, {target}): sources {self.source_bits}, "
                f"targets {self.target_bits}"
            ) from None

    def diagonal(self) -> list[float]:
        """Direct (white-box) ASR: source == target, for every source also among the targets.

        Returns:
            one ASR per such bit-width, in the order of ``source_bits``.
        """
        return [self.asr_at(s, s) for s in self.source_bits if s in self.target_bits]

    def per_target(self, reduce: str = "pooled") -> list[float]:
        """One ASR per target bit-width, reduced over the source rows.

        Args:
            reduce: ``"pooled"`` (successes and eligible samples summed over sources:
                the ASR of a patch from a random source bit-width), ``"mean"`` (mean of
                the rows, ``nan`` cells skipped), ``"max"`` (worst-case source) or
                ``"diagonal"`` (the source equal to the target; ``nan`` if absent).

        Returns:
            one value per entry of ``target_bits``.
        """
        if reduce not in _REDUCTIONS:
            raise InputError(f"reduce must be one of {_REDUCTIONS}, got {reduce!r}")
        out = []
        for j, t in enumerate(self.target_bits):
            column = [row[j] for row in self.asr]
            finite = [v for v in column if not math.isnan(v)]
            if reduce == "pooled":
                s = sum(row[j][0] for row in self.counts)
                e = sum(row[j][1] for row in self.counts)
                out.append(_rate(s, e))
            elif reduce == "mean":
                out.append(sum(finite) / len(finite) if finite else float("nan"))
            elif reduce == "max":
                out.append(max(finite) if finite else float("nan"))
            else:
                out.append(self.asr_at(t, t) if t in self.source_bits else float("nan"))
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``nan`` becomes ``None``); ``from_dict`` inverts it.

        Returns:
            plain ``dict`` of lists, ints, floats, strings, booleans and ``None``.
        """
        return {
            "attack": self.attack,
            "targeted": bool(self.targeted),
            "target": self.target,
            "samples": int(self.samples),
            "source_bits": [int(b) for b in self.source_bits],
            "target_bits": [int(b) for b in self.target_bits],
            "asr": [[_json_float(v) for v in row] for row in self.asr],
            "counts": [[[int(s), int(e)] for s, e in row] for row in self.counts],
            "noise_floor": [_json_float(v) for v in self.noise_floor],
            "noise_counts": [[int(s), int(e)] for s, e in self.noise_counts],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TransferMatrix:
        """Rebuild a matrix from ``to_dict`` output (e.g. read back from JSON).

        Args:
            d: the dict.

        Returns:
            the [`TransferMatrix`][triqdef.evaluate.TransferMatrix].
        """
        return cls(
            source_bits=list(d["source_bits"]),
            target_bits=list(d["target_bits"]),
            asr=[[_from_json_float(v) for v in row] for row in d["asr"]],
            counts=[[(int(s), int(e)) for s, e in row] for row in d["counts"]],
            noise_floor=[_from_json_float(v) for v in d["noise_floor"]],
            noise_counts=[(int(s), int(e)) for s, e in d["noise_counts"]],
            attack=d.get("attack", "attack"),
            targeted=bool(d.get("targeted", False)),
            target=d.get("target"),
            samples=int(d.get("samples", 0)),
        )

    def to_markdown(self, digits: int = 1) -> str:
        """A markdown table: one column per target bit-width, one row per source bit-width.

        Values are ASR in percent with ``digits`` decimals (``n/a`` without eligible
        samples); the last row is the noise floor.

        Args:
            digits: decimals.

        Returns:
            the table, ``len(source_bits) + 3`` lines.
        """
        kind = "targeted " if self.targeted else ""
        head = [f"{self.attack} {kind}ASR (%): source \\ target"]
        head += [_bits_label(t) for t in self.target_bits]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for s, row in zip(self.source_bits, self.asr):
            cells = [_bits_label(s)] + [_fmt_pct(v, digits) for v in row]
            lines.append("| " + " | ".join(cells) + " |")
        cells = ["noise floor"] + [_fmt_pct(v, digits) for v in self.noise_floor]
        lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def heatmap(self, path: str | os.PathLike, title: str | None = None) -> Path:
        """Write the matrix (and the noise-floor row below a line) as a PNG heatmap.

        Uses matplotlib's Agg canvas directly (no pyplot, no global backend change).

        Args:
            path: output file; ``.png`` is written whatever the suffix.
            title: figure title (default: the attack name).

        Returns:
            the path written.

        Raises:
            ImportError: matplotlib is not installed (``pip install matplotlib``).
        """
        values = [[100 * v for v in row] for row in self.asr] + [
            [100 * v for v in self.noise_floor]
        ]
        kind = "targeted " if self.targeted else ""
        return transfer_heatmap(
            path,
            values,
            [_bits_label(s) for s in self.source_bits] + ["noise"],
            [_bits_label(t) for t in self.target_bits],
            title if title is not None else f"{self.attack} {kind}ASR (%)",
        )


@dataclass
class AlignmentReport:
    """Similarity of input gradients and feature maps between bit-widths (tables 3, 12).

    ``values[map][metric][k]`` is the mean over samples of ``metric`` between the two
    bit-widths of ``pairs[k]``, for ``map`` = ``"input_grad"`` (the input gradient of the
    cross-entropy) or a layer name (that layer's output). Ranges: ``cosine`` in [-1, 1];
    ``edge_iou``, ``hog_cosine``, ``soft_dice`` and ``soft_hog`` in [0, 1]; the two HOG
    metrics are ``nan`` (``None`` in JSON, ``n/a`` in tables) for maps one pixel high or
    wide. See [`alignment_report`][triqdef.evaluate.alignment_report] for the definitions.

    Attributes:
        pairs: the compared bit-width pairs.
        maps: ``"input_grad"`` followed by the layer names.
        metrics: metric keys ([`METRICS`][triqdef.evaluate.METRICS]).
        values: ``{map: {metric: [value per pair]}}``.
        samples: number of images averaged over.
        patched: whether the inputs were patched.

    Example:
        >>> r = AlignmentReport([(32, 4)], ["input_grad"], ["cosine"],
        ...                     {"input_grad": {"cosine": [0.05]}}, samples=8)
        >>> r.value("input_grad", "cosine", (4, 32))
        0.05
        >>> print(r.to_markdown())
        | map | metric | 32<->4 |
        |---|---|---|
        | input_grad | Cosine | 0.050 |
    """

    pairs: list[tuple[int, int]]
    maps: list[str]
    metrics: list[str]
    values: dict[str, dict[str, list[float]]]
    samples: int = 0
    patched: bool = False
    labels: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.pairs = [(int(a), int(b)) for a, b in self.pairs]
        self.labels = [_pair_label(p) for p in self.pairs]

    def value(self, map: str, metric: str, pair: tuple[int, int]) -> float:
        """One value; ``pair`` may be given in either order (every metric is symmetric).

        Args:
            map: ``"input_grad"`` or a layer name.
            metric: a key of [`METRICS`][triqdef.evaluate.METRICS].
            pair: two bit-widths.

        Returns:
            the sample mean.
        """
        a, b = pair
        for k, p in enumerate(self.pairs):
            if p in ((a, b), (b, a)):
                return self.values[map][metric][k]
        raise InputError(f"pair {pair} is not in this report's pairs {self.pairs}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; ``from_dict`` inverts it.

        Returns:
            plain ``dict`` with ``pairs`` as ``[a, b]`` lists and ``labels`` like ``"32<->4"``.
        """
        return {
            "pairs": [[a, b] for a, b in self.pairs],
            "labels": list(self.labels),
            "maps": list(self.maps),
            "metrics": list(self.metrics),
            "values": {
                m: {k: [_json_float(v) for v in vs] for k, vs in per.items()}
                for m, per in self.values.items()
            },
            "samples": int(self.samples),
            "patched": bool(self.patched),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AlignmentReport:
        """Rebuild a report from [`to_dict`][triqdef.evaluate.AlignmentReport.to_dict] output.

        Args:
            d: the dict.

        Returns:
            the [`AlignmentReport`][triqdef.evaluate.AlignmentReport].
        """
        return cls(
            pairs=[tuple(p) for p in d["pairs"]],
            maps=list(d["maps"]),
            metrics=list(d["metrics"]),
            values={
                m: {k: [_from_json_float(v) for v in vs] for k, vs in per.items()}
                for m, per in d["values"].items()
            },
            samples=int(d.get("samples", 0)),
            patched=bool(d.get("patched", False)),
        )

    def to_markdown(self, digits: int = 3) -> str:
        """A markdown table: one row per (map, metric), one column per pair like ``32<->4``.

        Args:
            digits: decimals.

        Returns:
            the table, ``len(maps) * len(metrics) + 2`` lines.
        """
        head = ["map", "metric"] + self.labels
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m in self.maps:
            for k in self.metrics:
                cells = [m, _METRIC_LABELS.get(k, k)]
                cells += [_fmt(v, digits) for v in self.values[m][k]]
                lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def heatmap(self, path: str | os.PathLike, title: str | None = None) -> Path:
        """Write one heatmap per map (rows = metrics, columns = pairs) to a PNG.

        Args:
            path: output file (PNG).
            title: figure title.

        Returns:
            the path written.

        Raises:
            ImportError: matplotlib is not installed (``pip install matplotlib``).
        """
        grids = {m: [self.values[m][k] for k in self.metrics] for m in self.maps}
        return alignment_heatmap(
            path,
            [("input gradient" if m == INPUT_GRAD else f"layer {m}", grids[m]) for m in self.maps],
            [_METRIC_LABELS.get(k, k) for k in self.metrics],
            self.labels,
            [[[_fmt(v, 2) for v in row] for row in grids[m]] for m in self.maps],
            title,
        )

"""Evaluation: clean accuracy, cross-bit transfer of patch attacks, alignment reports.

Attack success rate (ASR), the number every table of the paper reports, is defined
here once and used everywhere:

* **untargeted ASR** = among samples correctly classified when clean (at the target
  bit-width), the share misclassified when patched;
* **targeted ASR** = among samples whose label is not the target, the share predicted
  as the target.

A sample whose logits hold NaN or Inf is never a success for the model: it is not
correct when clean (so not eligible), and it counts as an attack success when patched.
Clean accuracy likewise never counts such a sample as correct.

Samples outside these sets (*ineligible*) count neither as successes nor as failures,
so a model that is wrong on clean images gets no credit for it. A cell with no
eligible sample has ASR ``nan`` (``None`` in JSON, ``n/a`` in tables).

What lives here:

* [`clean_accuracy`][triqdef.evaluate.clean_accuracy]: accuracy per bit-width;
* [`asr_counts`][triqdef.evaluate.asr_counts] (on logits) and
  [`attack_success_rate`][triqdef.evaluate.attack_success_rate] (on images);
* [`transfer_matrix`][triqdef.evaluate.transfer_matrix] ->
  [`TransferMatrix`][triqdef.evaluate.TransferMatrix]: patches crafted at each *source*
  bit-width, evaluated at each *target* bit-width, with a *noise floor*: the ASR, at each
  target bit-width, of uniform-noise patches of the same size pasted at the same
  locations as the attack's (what any occluding patch achieves without optimisation);
* [`asr_by_condition`][triqdef.evaluate.asr_by_condition]: one row per evaluation
  condition, e.g. seen and unseen patches (paper tables 2 and 5);
* [`alignment_report`][triqdef.evaluate.alignment_report] ->
  [`AlignmentReport`][triqdef.evaluate.AlignmentReport]: how similar input gradients
  and feature maps are across bit-widths (paper tables 3 and 12).

The package's modules: `session` (the model under evaluation: eval mode, bit-widths,
normalisation, device, validated batches), `asr` (accuracy and attack success),
`alignment` (cross-bit alignment), `reports` (the result classes and their tables)
and `plot` (their heatmaps).

**Seen and unseen.** A condition is *unseen* when its patch size, its location region
or the bit-width the patch was generated at was not used to build the training pool
(paper table 5, "Unseen" rows); every other condition is *seen*. Which condition is
which is decided by the caller (e.g. the reproduction script), not here.

Every function runs the model in eval mode (BatchNorm statistics and quantizer
observers never move), without gradients except where an attack or an input gradient
needs them, and restores each module's train/eval flag and the wrapper's active
bit-width on exit, also when an error is raised. Weights are never written.

Example:
    >>> import torch
    >>> logits_clean = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    >>> logits_adv = torch.tensor([[0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])
    >>> y = torch.tensor([0, 0, 0])   # the third sample is already wrong: not eligible
    >>> asr_counts(logits_clean, logits_adv, y)
    (1, 2)
    >>> asr_counts(logits_clean, logits_adv, y, target=1)  # targeted: label != 1
    (2, 3)
"""

from __future__ import annotations

from .alignment import alignment_report
from .asr import asr_by_condition, asr_counts, attack_success_rate, clean_accuracy, transfer_matrix
from .reports import INPUT_GRAD, METRICS, AlignmentReport, TransferMatrix

__all__ = [
    "AlignmentReport",
    "INPUT_GRAD",
    "METRICS",
    "TransferMatrix",
    "alignment_report",
    "asr_by_condition",
    "asr_counts",
    "attack_success_rate",
    "clean_accuracy",
    "transfer_matrix",
]

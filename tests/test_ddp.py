"""DistributedDataParallel: 2 CPU processes (gloo) give the gradients of one process on
the concatenated batch, GPDP's double backward included, in both loss modes.

Exactness needs every loss term to be a per-sample mean, so the setup is: no BatchNorm,
``rho=1`` (every row patched, so ``L_clean`` is 0 and every term averages over the
same rows), a deterministic patch source, observers calibrated on the same batch in
every process and ``eval()`` during the loss so nothing is estimated from local data.
Then ``L(concat) = mean over ranks of L(shard)``, which is what DDP's gradient average
computes. Tolerance: float64, ``rtol=1e-10, atol=1e-12``.

Buffers (observers, per-bit BatchNorm statistics) are not averaged by DDP: with the
default ``broadcast_buffers=True`` rank 0's buffers are copied to every rank at the
start of each forward. So right after a train-mode step each rank holds the
statistics of its own shard; they agree again after the next forward.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import ddp_worker
import pytest
import torch

HERE = Path(__file__).parent
RTOL, ATOL = 1e-10, 1e-12


def _launch(out: Path, memory_bounded: bool) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        # --standalone: the launcher's own rendezvous store binds port 0 (the kernel picks a
        # free port, nothing to race for) and the workers reuse that store, so parallel
        # runs (pytest -n) cannot collide the way "find a free port, then pass it" can
        "--standalone",
        "--nproc_per_node",
        "2",
        str(HERE / "ddp_worker.py"),
        str(out),
        "1" if memory_bounded else "0",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]


def _single_process_grads(memory_bounded: bool) -> tuple[dict, torch.Tensor]:
    w = ddp_worker.make_wrapper(memory_bounded)
    w.eval()
    x, y = ddp_worker.global_batch()
    loss = w.loss(x, y)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in w.named_parameters()}, loss.detach()


@pytest.mark.parametrize("memory_bounded", [False, True], ids=["exact", "memory_bounded"])
def test_ddp_matches_one_process_on_the_concatenated_batch(tmp_path, memory_bounded):
    _launch(tmp_path, memory_bounded)
    ref, ref_loss = _single_process_grads(memory_bounded)
    got = torch.load(tmp_path / "grads.pt")
    assert got["grads"].keys() == ref.keys()
    for name, g in ref.items():
        assert g.abs().max() > 0, name  # every parameter really gets a gradient
        torch.testing.assert_close(got["grads"][name], g, rtol=RTOL, atol=ATOL, msg=name)
    # the GPDP/FDP terms are on and contribute: the gradient differs without them
    w = ddp_worker.make_wrapper(memory_bounded)
    w.lambda_gpdp = w.lambda_fdp = 0.0
    w.eval()
    w.loss(*ddp_worker.global_batch()).backward()
    assert any(not torch.allclose(p.grad, ref[n]) for n, p in w.named_parameters())
    assert torch.isfinite(ref_loss)

    # --- train mode: buffers are rank 0's, broadcast at the start of each forward ------------
    r0 = torch.load(tmp_path / "buffers0.pt")
    r1 = torch.load(tmp_path / "buffers1.pt")
    for name in r0["params"]:  # weights stay in sync (gradients are averaged)
        torch.testing.assert_close(r0["params"][name], r1["params"][name], rtol=0, atol=0)
    observers = [k for k in r0["after_train"] if k.endswith(("act_min", "act_max"))]
    assert observers
    # right after the train-mode step each rank holds its own shard's observer update ...
    assert any(not torch.equal(r0["after_train"][k], r1["after_train"][k]) for k in observers)
    # ... and the next forward copies rank 0's buffers to every rank (no averaging)
    for k in r0["after_eval"]:
        assert torch.equal(r0["after_eval"][k], r1["after_eval"][k]), k
        assert torch.equal(r0["after_eval"][k], r0["after_train"][k]), k

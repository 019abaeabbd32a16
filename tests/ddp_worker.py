"""Worker for tests/test_ddp.py, launched with ``python -m torch.distributed.run``.

Every process builds the same float64 model (no BatchNorm), wraps it, calibrates
its observers on the same batch and takes its shard of a fixed global batch.

Phase ``grad``: one TriQDef loss/backward in eval mode (observers frozen) through
``DistributedDataParallel``; rank 0 writes the averaged parameter gradients.

Phase ``train``: one loss/backward in train mode (observers update from each
rank's own shard), then one in eval mode (observers frozen). Every rank writes
its buffers after each step, so the test can see what DDP's buffer broadcast does.

Usage: ``ddp_worker.py OUT_DIR MEMORY_BOUNDED``
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn

from triqdef import TriQDefWrapper
from triqdef.attacks import apply_patch

BITS = (32, 8, 4, 2)
GLOBAL_BATCH = 8
LAYERS = ("1", "3")


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 5),
    ).double()


class FixedPatch:
    """Deterministic patch source: one fixed patch pasted at one fixed location."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(3)
        self.patch = torch.rand(1, 3, 3, generator=g, dtype=torch.float64)

    def __call__(self, x, y, wrapper):
        loc = torch.tensor([[2, 3]]).expand(x.shape[0], 2)
        return apply_patch(x, self.patch, locations=loc)


def make_wrapper(memory_bounded: bool) -> TriQDefWrapper:
    w = TriQDefWrapper(
        make_net(),
        bits=BITS,
        layers=list(LAYERS),
        rho=1.0,
        patch_source=FixedPatch(),
        memory_bounded=memory_bounded,
    )
    w.calibrate([calib_batch()])
    return w


def calib_batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.rand(6, 1, 10, 10, generator=g, dtype=torch.float64)


def global_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(GLOBAL_BATCH, 1, 10, 10, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (GLOBAL_BATCH,), generator=g)
    return x, y


def shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    n = t.shape[0] // world
    return t[rank * n : (rank + 1) * n]


def buffers(w: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in w.named_buffers()}


def main(out: Path, memory_bounded: bool) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        # --- phase grad: eval mode, frozen observers --------------------------------------
        w = make_wrapper(memory_bounded)
        ddp = nn.parallel.DistributedDataParallel(w)
        ddp.eval()
        x, y = global_batch()
        loss = ddp(shard(x, rank, world), shard(y, rank, world), None)
        loss.backward()
        if rank == 0:
            grads = {n: p.grad.detach().clone() for n, p in w.named_parameters()}
            torch.save({"grads": grads, "loss": loss.detach()}, out / "grads.pt")

        # --- phase train: one train-mode step, then one eval-mode step ----------------------
        w = make_wrapper(memory_bounded)
        ddp = nn.parallel.DistributedDataParallel(w)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        x, y = global_batch(seed=5)
        ddp.train()
        opt.zero_grad()
        ddp(shard(x, rank, world), shard(y, rank, world), None).backward()
        opt.step()
        after_train = buffers(w)
        ddp.eval()
        opt.zero_grad()
        ddp(shard(x, rank, world), shard(y, rank, world), None).backward()
        opt.step()
        after_eval = buffers(w)
        params = {n: p.detach().clone() for n, p in w.named_parameters()}
        torch.save(
            {"after_train": after_train, "after_eval": after_eval, "params": params},
            out / f"buffers{rank}.pt",
        )
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    # Results are on disk and every rank passed the barrier. Leave without tearing the
    # gloo group down: its teardown has aborted (std::terminate) under heavy CPU load.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] == "1")

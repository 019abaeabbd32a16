"""Cost of the TriQDef objective on CPU (issue: objective benchmark).

CIFAR ResNet-20, 32x32 inputs, batch 32 and 128, bits (32, 8, 5, 4, 2), taps on
layer1..layer3, random 6x6 patches on half the batch. Every figure is a ratio
measured in one run, so machine noise cancels:

(a) TriQDef step / multi-bit CE step: the same wrapper and the same clean and
    patched forward passes, with ``lambda_fdp = lambda_gpdp = 0`` for the
    baseline (a step = loss + backward + SGD update); TriQDef exact, memory-bounded,
    and with ``penalty_bits=2`` (FDP and GPDP over one random pair of bit-widths per
    step, the other three bit-widths cross-entropy only), for each batch size;
(b) share of the TriQDef step spent in the descriptors (Sobel, quantile,
    soft binarization, SoftDice, SoftHOG): those functions are timed forward
    and backward on the step's own maps (every tapped feature and input
    gradient, every bit-width) and divided by the step time;
(c) peak resident memory of one step above the resident memory before it,
    exact vs memory-bounded mode, for 2..5 active bit-widths, at the largest batch
    (each in a fresh subprocess whose large allocations are mmap-backed, so freed
    tensors leave the process and the resident size follows the live tensors).

    python benchmarks/objective.py [--steps 3] [--batch 32 128] [--threads 1] [--skip-memory]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time

import torch

from triqdef import TriQDefWrapper
from triqdef.functional import _sobel_edges, _soft_binarize, soft_hog
from triqdef.losses import pair_similarity, penalty
from triqdef.models import resnet20

LAYERS = ["layer1", "layer2", "layer3"]
BITS = (32, 8, 5, 4, 2)


def make(batch: int, bits=BITS, **kw):
    torch.manual_seed(0)
    kw.setdefault("penalty_bits", None)  # the exact objective unless a row samples
    w = TriQDefWrapper(resnet20(), bits=bits, layers=LAYERS, **kw)
    opt = torch.optim.SGD(w.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    return w, opt, x, y


def floor_loss(w, x, y) -> torch.Tensor:
    """The cheapest exact input-gradient penalty: multi-bit CE plus ||dCE/dx||^2 of the
    patched rows, on the same mixed batch and bits, no descriptors."""
    n = x.shape[0] // 2
    xm = x.clone().requires_grad_()
    total = 0
    for b in w.active_bits:
        with w.at_bits(b):
            logits = w(xm)
        ce = torch.nn.functional.cross_entropy(logits, y)
        adv = torch.nn.functional.cross_entropy(logits[n:], y[n:], reduction="sum")
        (g,) = torch.autograd.grad(adv, xm, create_graph=True)
        total = total + ce + g[n:].square().sum()
    return total


def step(w, opt, x, y, floor: bool = False) -> float:
    t = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    (floor_loss(w, x, y) if floor else w.loss(x, y)).backward()
    opt.step()
    return time.perf_counter() - t


def time_steps(w, opt, x, y, steps: int, floor: bool = False) -> float:
    step(w, opt, x, y, floor)  # warm-up: observers, allocator
    return statistics.median(step(w, opt, x, y, floor) for _ in range(steps))


def descriptor_stage_times(w, x, y, repeats: int = 3) -> dict[str, float]:
    """Forward+backward time of each descriptor stage on the maps of one TriQDef step."""
    maps = []
    rows = slice(x.shape[0] - round(w.rho * x.shape[0]), None)
    for b in w.active_bits:
        with w.at_bits(b):
            xin = x.clone().requires_grad_()
            feats = w.features(xin)
        maps += [f[rows].detach() for f in feats.values()]
        with w.at_bits(b):
            xin = x.clone().requires_grad_()
            loss = torch.nn.functional.cross_entropy(w(xin)[rows], y[rows], reduction="sum")
            (g,) = torch.autograd.grad(loss, xin)
        maps.append(g[rows].detach())

    def run(stage: str) -> float:
        best = float("inf")
        for _ in range(repeats):
            inputs = [m.mean(1, keepdim=True).requires_grad_() for m in maps]
            t = time.perf_counter()
            outs = []
            for m in inputs:
                if stage == "sobel":
                    outs.append(_sobel_edges(m, 1e-6))
                elif stage == "quantile+binarize":
                    outs.append(_soft_binarize(m, 0.85, 100.0))
                elif stage == "softhog":
                    outs.append(soft_hog(m))
            if stage == "softdice+cosine":
                per_bit = len(maps) // len(w.active_bits)
                from triqdef.losses import Descriptors

                total = 0
                for j in range(per_bit):
                    ds = [
                        Descriptors(inputs[i].flatten(1), inputs[i].flatten(1))
                        for i in range(j, len(inputs), per_bit)
                    ]
                    total = total + penalty(pair_similarity(ds))
                total.backward()
            else:
                sum(o.sum() for o in outs).backward()
            best = min(best, time.perf_counter() - t)
        return best

    return {s: run(s) for s in ("sobel", "quantile+binarize", "softdice+cosine", "softhog")}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def memory_child(bits: int, memory_bounded: bool, batch: int) -> None:
    """Peak RSS during one step above the RSS just before it, sampled every millisecond."""
    active = BITS[:bits]
    w, opt, x, y = make(batch, bits=active, memory_bounded=memory_bounded)
    step(w, opt, x, y)  # the model, optimizer state and allocator caches exist now
    opt.zero_grad(set_to_none=True)
    base = _rss_mib()
    peak, done = [base], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.001)

    thread = threading.Thread(target=sample)
    thread.start()
    step(w, opt, x, y)
    done.set()
    thread.join()
    print(json.dumps({"base_mib": base, "peak_mib": peak[0]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child[0], bool(args.memory_child[1]), args.batch[0])
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for batch in args.batch:
        time_rows(batch, args.steps)
    if args.skip_memory:
        return
    memory_rows(max(args.batch), args.threads)


def time_rows(batch: int, steps: int) -> None:
    """(a) and (b) at one batch size; every ratio is against this batch's CE step."""
    w, opt, x, y = make(batch)
    t_triqdef = time_steps(w, opt, x, y, steps)
    w.lambda_fdp = w.lambda_gpdp = 0.0
    t_ce = time_steps(w, opt, x, y, steps)
    w.lambda_fdp, w.lambda_gpdp = 0.8, 0.5
    w.memory_bounded = True
    t_bounded = time_steps(w, opt, x, y, steps)
    w.penalty_bits = 2
    t_sampled_bounded = time_steps(w, opt, x, y, steps)
    w.memory_bounded = False
    t_sampled = time_steps(w, opt, x, y, steps)
    w.penalty_bits = None
    t_floor = time_steps(w, opt, x, y, steps, floor=True)
    print(f"batch {batch}")
    print("(a) step time (median of", steps, "steps)")
    rows = [
        ("TriQDef, exact", t_triqdef),
        ("TriQDef, memory-bounded", t_bounded),
        ("TriQDef, penalty_bits=2", t_sampled),
        ("  penalty_bits=2, bounded", t_sampled_bounded),
        ("floor: CE + |input grad|^2", t_floor),
    ]
    print(f"    {'multi-bit CE (penalties off)':<30}{t_ce:7.3f} s")
    for name, t in rows:
        print(f"    {name:<30}{t:7.3f} s   ratio {t / t_ce:.2f}")

    stages = descriptor_stage_times(w, x, y)
    share = sum(stages.values()) / t_triqdef
    print("(b) descriptor stages, forward+backward on one step's maps")
    for name, t in stages.items():
        print(f"    {name:<20} {t * 1000:8.1f} ms  {100 * t / t_triqdef:5.1f}% of the step")
    print(f"    total                {sum(stages.values()) * 1000:8.1f} ms  {100 * share:5.1f}%")


def memory_rows(batch: int, threads: int | None) -> None:
    print(f"(c) peak RSS above the model's steady state (fresh process per row), batch {batch}")
    print("    bits  exact MiB  bounded MiB  bounded/exact")
    for k in (2, 3, 4, 5):
        res = []
        for mb in (0, 1):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--memory-child",
                    str(k),
                    str(mb),
                    "--batch",
                    str(batch),
                    *([] if threads is None else ["--threads", str(threads)]),
                ],
                capture_output=True,
                text=True,
                check=True,
                # large blocks via mmap: freed memory leaves the process, RSS tracks live tensors
                env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            res.append(r["peak_mib"] - r["base_mib"])
        print(f"    {k:>4}  {res[0]:9.0f}  {res[1]:11.0f}  {res[1] / max(res[0], 1):13.2f}")


if __name__ == "__main__":
    main()

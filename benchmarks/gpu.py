"""GPU throughput and peak memory of one training step (CIFAR ResNet-56, batch 256).

Rows (all on the same GPU, in one process, so the ratios are comparable):

- ``qat-1bit``: single-bit QAT, 4 bits, clean cross-entropy only;
- ``ce-5bit``: the multi-bit CE step, bits (32, 8, 5, 4, 2), half the batch
  patched, penalties off;
- ``triqdef``: the full objective, 5 bit-widths, exact gradients;
- ``triqdef-bounded``: the same, ``memory_bounded=True``;

each eager and, with ``--compile``, with ``torch.compile`` applied to the
model after the wrapper attached its hooks. A row that fails prints its error.

    python benchmarks/gpu.py [--batch 256] [--steps 20] [--compile] [--json out.json]

The paper's table 17 (A100) is the anchor: QAT 2200 img/s and 4.2 GB, TriQDef
1490 img/s and 4.9 GB.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from triqdef import TriQDefWrapper
from triqdef.models import resnet56

LAYERS = ["layer1", "layer2", "layer3"]


def build(name: str, compiled: bool):
    torch.manual_seed(0)
    model = resnet56().cuda()
    if name == "qat-1bit":
        w = TriQDefWrapper(model, bits=(4,), layers=LAYERS, rho=0.0, lambda_fdp=0, lambda_gpdp=0)
    elif name == "ce-5bit":
        w = TriQDefWrapper(model, layers=LAYERS, lambda_fdp=0, lambda_gpdp=0)
    else:
        w = TriQDefWrapper(model, layers=LAYERS, memory_bounded=name == "triqdef-bounded")
    if compiled:
        w.model = torch.compile(model)  # hooks attached first, compiled after
    opt = torch.optim.SGD(w.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    return w, opt


def run(name: str, compiled: bool, batch: int, steps: int) -> dict:
    w, opt = build(name, compiled)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.rand(batch, 3, 32, 32, device="cuda", generator=g)
    y = torch.randint(0, 10, (batch,), device="cuda", generator=g)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        w.loss(x, y).backward()
        opt.step()

    for _ in range(3):  # warm-up: observers, cuDNN autotuning, compilation
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / steps
    return {
        "row": name,
        "compiled": compiled,
        "images_per_s": batch / dt,
        "step_s": dt,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch}")
    results = []
    for compiled in (False, True) if args.compile else (False,):
        for name in ("qat-1bit", "ce-5bit", "triqdef", "triqdef-bounded"):
            try:
                r = run(name, compiled, args.batch, args.steps)
                print(
                    f"{name:<16} {'compiled' if compiled else 'eager':<9}"
                    f"{r['images_per_s']:9.0f} img/s {r['step_s'] * 1000:8.1f} ms/step"
                    f"{r['peak_gib']:7.2f} GiB"
                )
            except Exception as exc:  # report and go on: one failing row must not hide others
                r = {"row": name, "compiled": compiled, "error": f"{type(exc).__name__}: {exc}"}
                mode = "compiled" if compiled else "eager"
                print(f"{name:<16} {mode:<9} FAILED {r['error'][:300]}")
            results.append(r)
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()

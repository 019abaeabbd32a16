"""GPU throughput and peak memory of one training step (CIFAR ResNet-56, batch 256).

Rows (all on the same GPU, in one process, so the ratios are comparable):

- ``qat-1bit``: single-bit QAT, 4 bits, clean cross-entropy only;
- ``ce-5bit``: the multi-bit CE step, bits (32, 8, 5, 4, 2), half the batch
  patched, penalties off;
- ``triqdef``: the full objective, 5 bit-widths, exact gradients (``penalty_bits=None``);
- ``triqdef-bounded``: the same, ``memory_bounded=True``;
- ``triqdef-pb2``: the default objective, penalties over one sampled pair
  (``penalty_bits=2``): the row the paper's 1490 img/s is compared with;
- ``triqdef-pb2-bf16`` / ``triqdef-pb2-cl``: the same under bf16 autocast / with the
  model and batch in channels_last;

each eager and/or (``--mode compiled|both``) with ``torch.compile`` applied to
the model after the wrapper attached its hooks. A row that fails prints its error.
After the rows, the script times the per-call state snapshot that ``loss`` takes
(so a failed call can restore observers and BN statistics) against the
``triqdef`` step, and the same step with ``check_finite=False`` (one host
synchronisation fewer).

    python benchmarks/gpu.py [--batch 256] [--steps 20] [--mode eager|compiled|both]
                             [--json out.json]

``--device cpu --model resnet20 --batch 2 --steps 1`` is the smoke test the
suite runs, so the script is known to work before a GPU session spends time on it.

The paper's table 17 (A100) is the anchor: QAT 2200 img/s and 4.2 GB, TriQDef
1490 img/s and 4.9 GB.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from triqdef import TriQDefWrapper
from triqdef.models import resnet20, resnet56
from triqdef.quant import _Snapshot

LAYERS = ["layer1", "layer2", "layer3"]
ROWS = (
    "qat-1bit",
    "ce-5bit",
    "triqdef",
    "triqdef-bounded",
    "triqdef-pb2",
    "triqdef-pb2-bf16",
    "triqdef-pb2-cl",
)
MODELS = {"resnet56": resnet56, "resnet20": resnet20}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(name: str, compiled: bool, model_name: str, device: torch.device, **kw):
    torch.manual_seed(0)
    model = MODELS[model_name]().to(device)
    if name == "qat-1bit":
        w = TriQDefWrapper(model, bits=(4,), layers=LAYERS, rho=0.0, lambda_fdp=0, lambda_gpdp=0)
    elif name == "ce-5bit":
        w = TriQDefWrapper(model, layers=LAYERS, lambda_fdp=0, lambda_gpdp=0)
    elif name.startswith("triqdef-pb2"):
        w = TriQDefWrapper(model, layers=LAYERS, penalty_bits=2, **kw)
    else:
        kw = {"penalty_bits": None, **kw}  # the exact objective (the default samples 2)
        w = TriQDefWrapper(model, layers=LAYERS, memory_bounded=name == "triqdef-bounded", **kw)
    if compiled:
        w.model = torch.compile(model)  # hooks attached first, compiled after
    opt = torch.optim.SGD(w.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    return w, opt


def _timed(fn, steps: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` after 3 warm-up calls (observers, autotuning, compilation)."""
    for _ in range(3):
        fn()
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - t) / steps


def run(name, compiled, batch, steps, model_name="resnet56", device="cuda", **kw) -> dict:
    device = torch.device(device)
    w, opt = build(name, compiled, model_name, device, **kw)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(batch, 3, 32, 32, device=device, generator=g)
    y = torch.randint(0, 10, (batch,), device=device, generator=g)
    if name.endswith("-cl"):
        w.model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    bf16 = name.endswith("-bf16")

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = w.loss(x, y)
        loss.backward()
        opt.step()

    if device.type == "cuda":
        step()  # allocate before resetting the peak, as a training loop would
        torch.cuda.reset_peak_memory_stats(device)
    dt = _timed(step, steps, device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    out = {"row": name, "compiled": compiled, "images_per_s": batch / dt, "step_s": dt}
    out["peak_gib"] = peak
    if name == "triqdef" and not compiled and not kw:
        # the per-call snapshot of every buffer, timed on its own
        out["snapshot_s"] = _timed(lambda: _Snapshot(w), max(steps, 20), device)
        out["buffers"] = sum(1 for _ in w.buffers())
    return out


def _line(r: dict) -> str:
    mode = "compiled" if r["compiled"] else "eager"
    if "error" in r:
        return f"{r['row']:<18} {mode:<9} FAILED {r['error'][:300]}"
    peak = "" if r["peak_gib"] is None else f"{r['peak_gib']:7.2f} GiB"
    return (
        f"{r['row']:<18} {mode:<9}{r['images_per_s']:9.0f} img/s "
        f"{r['step_s'] * 1000:8.1f} ms/step{peak}"
    )


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--mode", default="eager", choices=["eager", "compiled", "both"], help="torch.compile?"
    )
    parser.add_argument("--json", default=None)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="resnet56", choices=list(MODELS))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}, torch {torch.__version__}, {args.model}, batch {args.batch}")
    results = []
    plan = []
    if args.mode in ("eager", "both"):
        plan += [(row, False, {}) for row in ROWS]
        plan.insert(3, ("triqdef", False, {"check_finite": False}))
    if args.mode in ("compiled", "both"):
        plan += [(row, True, {}) for row in ROWS]
    for row, compiled, kw in plan:
        try:
            r = run(row, compiled, args.batch, args.steps, args.model, device, **kw)
        except Exception as exc:  # report and go on: one failing row must not hide others
            r = {"row": row, "compiled": compiled, "error": f"{type(exc).__name__}: {exc}"}
        if kw:
            r["row"] = "triqdef-unchecked"
        print(_line(r), flush=True)
        results.append(r)
        if args.json:  # after every row: a run stopped at a time limit keeps what it measured
            _dump(args.json, name, results)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    full = next((r for r in results if "snapshot_s" in r), None)
    if full is not None:
        print(
            f"snapshot of {full['buffers']} buffers: {full['snapshot_s'] * 1000:.3f} ms, "
            f"{full['snapshot_s'] / full['step_s']:.1%} of the triqdef step"
        )
    if args.json:
        _dump(args.json, name, results)
    return results


def _dump(path: str, device_name: str, results: list[dict]) -> None:
    with open(path, "w") as f:
        record = {"device": device_name, "torch": torch.__version__, "results": results}
        json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()

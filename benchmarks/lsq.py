"""Clean 2-bit accuracy of a SmallCNN trained with min/max scales and with LSQ step sizes.

For each seed, both runs start from the same initial weights and see the same batches,
and train the same way: quantization-aware training at 2 bits only (plain
cross-entropy, Adam with a cosine decay of the learning rate), on the digits data of
[`triqdef.data.digits`][triqdef.data.digits] (scikit-learn's 8x8 digits upscaled to
28x28: 1,438 training and 359 test images, no download). The only difference is
``TriQDefWrapper(..., quantizer=...)``: ``"minmax"`` (scales from the weights' maxima
and the observers' moving ranges) or ``"lsq"`` (learned step sizes, initialised from
the same observers). The script prints the test accuracy of each at 2 bits (eval mode)
per seed and averaged over the seeds (one seed's figure moves by several points with
the last few batches: 2-bit training is noisy) and, for LSQ, how far the step sizes
moved from their initial values.

    python benchmarks/lsq.py [--steps 300] [--batch 64] [--lr 3e-3] [--width 16]
                             [--seeds 0 1 2] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from triqdef import TriQDefWrapper
from triqdef.data import digits
from triqdef.models import SmallCNN


def _steps(wrapper: TriQDefWrapper) -> torch.Tensor:
    """Every learned step size of the wrapper (held as logarithms), flattened (LSQ only)."""
    logs = [p.detach().reshape(-1) for n, p in wrapper.named_parameters() if "log_step" in n]
    return torch.cat(logs).exp()


def train(quantizer: str, seed: int, args, train_x, train_y, test_x, test_y) -> dict:
    """Train one 2-bit SmallCNN with ``quantizer``; its test accuracy and step-size motion."""
    torch.manual_seed(seed)
    wrapper = TriQDefWrapper(
        SmallCNN(width=args.width), bits=[32, 2], lambda_fdp=0, quantizer=quantizer
    )
    wrapper.train().set_bits(2)
    opt = torch.optim.Adam(wrapper.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(args.steps, 1))
    order = torch.Generator().manual_seed(seed)
    n, start, steps0 = train_x.shape[0], time.perf_counter(), None
    for step in range(args.steps):
        idx = torch.randint(0, n, (args.batch,), generator=order)
        loss = F.cross_entropy(wrapper(train_x[idx]), train_y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        if step == 0 and quantizer == "lsq":
            steps0 = _steps(wrapper).clone()  # initialised by the first forward
    seconds = time.perf_counter() - start
    wrapper.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, test_x.shape[0], 256):
            logits = wrapper(test_x[i : i + 256])
            correct += int((logits.argmax(1) == test_y[i : i + 256]).sum())
    out = {
        "quantizer": quantizer,
        "seed": seed,
        "accuracy_2bit": correct / test_x.shape[0],
        "final_loss": loss.item(),
        "seconds": round(seconds, 1),
    }
    if steps0 is not None:
        now = _steps(wrapper)
        out["steps_min"] = float(now.min())
        out["steps_median_relative_change"] = float(((now - steps0).abs() / steps0).median())
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    train_set, test_set = digits(train=True), digits(train=False)
    data = (train_set.data, train_set.targets, test_set.data, test_set.targets)
    rows = [train(q, seed, args, *data) for seed in args.seeds for q in ("minmax", "lsq")]
    for r in rows:
        extra = (
            f", step sizes: min {r['steps_min']:.3g}, median relative change "
            f"{r['steps_median_relative_change']:.2f}"
            if "steps_min" in r
            else ""
        )
        print(
            f"seed {r['seed']} {r['quantizer']:>6}: clean 2-bit accuracy "
            f"{100 * r['accuracy_2bit']:.1f}% (final loss {r['final_loss']:.3f}, "
            f"{r['seconds']} s{extra})"
        )
    mean = {}
    for q in ("minmax", "lsq"):
        accs = [r["accuracy_2bit"] for r in rows if r["quantizer"] == q]
        mean[q] = sum(accs) / len(accs)
        print(f"mean over seeds {args.seeds} {q:>6}: {100 * mean[q]:.1f}%")
    out = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "width": args.width}
    out.update(seeds=args.seeds, rows=rows, mean_accuracy_2bit=mean)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()

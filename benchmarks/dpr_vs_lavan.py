"""DPR against LAVAN at the same patch area (issue #16: DPR's ASR at least LAVAN's).

Trains the reference ``SmallCNN`` briefly on Fashion-MNIST (or scikit-learn digits
when its files are not found, or with ``--dataset digits``), keeps the first
``--images`` test images it classifies correctly, and attacks those same images
with both attacks, untargeted, at each ``--sizes`` patch side: LAVAN pastes an
``s x s`` square, DPR a deformable shape of exactly ``s * s`` pixels inside its
box. Both run ``--steps`` steps of the same texture step size (sign-gradient),
one restart, random locations from their own seeds. The noise floor (a uniform
noise ``s x s`` square at random locations) is printed next to them.

ASR = the share of the (correctly classified) images misclassified when patched.
Only the attack success rates are reported; nothing here is timed.

Run::

    .venv/bin/python benchmarks/dpr_vs_lavan.py [--dataset auto|fashion-mnist|digits]
        [--sizes 4 6] [--images 256] [--steps 50] [--train-steps 600] [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from triqdef.attacks import LAVAN, RandomPatch
from triqdef.attacks.dpr import DPR
from triqdef.data import load_dataset
from triqdef.models import SmallCNN


def train(
    dataset: str, steps: int, seed: int
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, str]:
    """A SmallCNN trained for ``steps`` Adam steps (batch 128) and the test split."""
    torch.manual_seed(seed)
    x_train, y_train, name = load_dataset(dataset, train=True)
    x_test, y_test, _ = load_dataset(name, train=False)
    net = SmallCNN()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    done = 0
    net.train()
    while done < steps:
        for idx in torch.randperm(len(y_train), generator=g).split(128):
            opt.zero_grad()
            F.cross_entropy(net(x_train[idx]), y_train[idx]).backward()
            opt.step()
            done += 1
            if done == steps:
                break
    return net.eval(), x_test, y_test, name


def asr(net: torch.nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (net(x_adv).argmax(1) != y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="auto")
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 6])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--step-size", type=float, default=0.05)
    parser.add_argument("--train-steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    net, x_test, y_test, name = train(args.dataset, args.train_steps, 0)
    with torch.no_grad():
        ok = net(x_test).argmax(1) == y_test
    print(
        f"SmallCNN on {name}: {args.train_steps} Adam steps, clean test accuracy "
        f"{ok.float().mean().item():.3f}; attacking the first {args.images} correctly "
        f"classified test images, {args.steps} steps, step size {args.step_size}, "
        f"seeds {args.seeds}"
    )
    x, y = x_test[ok][: args.images], y_test[ok][: args.images]
    print("| patch (pixels) | noise | LAVAN | DPR | DPR - LAVAN (pp) |")
    print("|---|---|---|---|---|")
    for s in args.sizes:
        runs: dict[str, list[float]] = {"noise": [], "lavan": [], "dpr": []}
        for seed in args.seeds:
            noise = RandomPatch(s, generator=torch.Generator().manual_seed(seed))
            runs["noise"].append(asr(net, noise(x), y))
            lavan = LAVAN(net, s, steps=args.steps, step_size=args.step_size, seed=seed)
            runs["lavan"].append(asr(net, lavan(x, y), y))
            dpr = DPR(net, s, steps=args.steps, step_size=args.step_size, seed=seed)
            x_adv = dpr(x, y)
            assert dpr.mask is not None and int(dpr.mask.sum(dim=(1, 2, 3)).max()) <= s * s
            runs["dpr"].append(asr(net, x_adv, y))
        mean = {k: statistics.mean(v) for k, v in runs.items()}
        print(
            f"| {s}x{s} ({s * s}) | {100 * mean['noise']:.1f} | {100 * mean['lavan']:.1f} | "
            f"{100 * mean['dpr']:.1f} | {100 * (mean['dpr'] - mean['lavan']):+.1f} |"
        )


if __name__ == "__main__":
    main()

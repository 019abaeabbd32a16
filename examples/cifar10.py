"""The paper's CIFAR-10 setting: ResNet-56, 6x6 patches, 200 epochs, SGD 0.1.

For users with a GPU. SGD with momentum 0.9 and weight decay 1e-4, learning
rate 0.1 divided by 10 at 50% and 75% of training, batch 128 (paper section
4.1), bits (32, 8, 5, 4, 2) staged by BACT, FDP on layer1..layer3.

Patches: ``--pool FILE`` trains on an offline pool (the paper's default; build
one with ``triqdef.attacks.PatchPool.build`` on a full-precision model and
``pool.save``); without it, 6x6 patches are crafted on the fly
(``OnTheFlyPatch``, the paper's adaptive variant).

    python examples/cifar10.py --device cuda                # the real run
    python examples/cifar10.py --synthetic --max-steps 3    # a smoke run, no data needed

``--synthetic`` uses random images of CIFAR-10's shape (3x32x32, 10 classes),
so the script can be checked without the dataset.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import triqdef
from triqdef.attacks import OnTheFlyPatch, PatchPool
from triqdef.models import resnet56


def loaders(args):
    if args.synthetic:
        g = torch.Generator().manual_seed(0)
        x = torch.rand(args.batch_size * 4, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (len(x),), generator=g)
        data = torch.utils.data.TensorDataset(x, y)
        return torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True)
    import torchvision
    import torchvision.transforms as T

    augment = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor()])
    train = torchvision.datasets.CIFAR10(args.root, train=True, download=True, transform=augment)
    return torch.utils.data.DataLoader(
        train, batch_size=args.batch_size, shuffle=True, num_workers=4, drop_last=True
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--root", default=str(Path.home() / ".cache" / "cifar10"))
    p.add_argument("--pool", default=None, help="an offline patch pool (.safetensors)")
    p.add_argument("--synthetic", action="store_true", help="random CIFAR-shaped input")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--out", default="runs/cifar10.safetensors")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    model = resnet56().to(args.device)
    wrapper = triqdef.TriQDefWrapper(model, layers=["layer1", "layer2", "layer3"])
    patch = PatchPool.load(args.pool) if args.pool else OnTheFlyPatch(None, 6)
    optimizer = torch.optim.SGD(wrapper.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    milestones = [args.epochs // 2, args.epochs * 3 // 4]
    lr_schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    bact = triqdef.BACTSchedule(wrapper, total=args.epochs)
    print(wrapper.extra_repr())
    print(bact)

    data = loaders(args)
    step, start = 0, time.monotonic()
    for epoch in range(args.epochs):
        wrapper.train()
        for x, y in data:
            x, y = x.to(args.device, non_blocking=True), y.to(args.device, non_blocking=True)
            loss = wrapper.loss(x, y, patch=patch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step % 50 == 0 or args.max_steps:
                print(
                    f"epoch {epoch} step {step} loss {loss.item():.3f} "
                    f"bits {wrapper.active_bits} ({time.monotonic() - start:.0f} s)"
                )
            if args.max_steps and step >= args.max_steps:
                break
        if args.max_steps and step >= args.max_steps:
            break
        lr_schedule.step()
        bact.step()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    triqdef.save(wrapper, args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()

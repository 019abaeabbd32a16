"""Quickstart: train one shared backbone at five bit-widths, then test each bit-width.

Trains a small CNN wrapped in ``TriQDefWrapper`` for about a minute on
Fashion-MNIST (or scikit-learn's digits when Fashion-MNIST is not installed)
with the cross-entropy of every bit-width summed each step, then prints the
clean test accuracy of the same weights at 32, 8, 5, 4 and 2 bits.

    python examples/quickstart.py [--seconds 60] [--data auto|fashion-mnist|digits]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from triqdef import TriQDefWrapper
from triqdef.data import dataset
from triqdef.models import SmallCNN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="training time budget")
    parser.add_argument("--data", default="auto", help="auto, fashion-mnist or digits")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    train_set = dataset(args.data, train=True)
    test_set = dataset(train_set.name, train=False)  # the same dataset as the training one
    print(f"data: {train_set.name} ({len(train_set)} train / {len(test_set)} test images)")
    gen = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, generator=gen)
    test_loader = DataLoader(test_set, batch_size=1000)

    model = SmallCNN(in_channels=1, num_classes=10, width=16)
    wrapper = TriQDefWrapper(model, bits=(32, 8, 5, 4, 2), layers=["block1", "block2"])
    optimizer = torch.optim.Adam(wrapper.parameters(), lr=3e-3)

    start, step, epoch = time.monotonic(), 0, 0
    wrapper.train()
    while time.monotonic() - start < args.seconds:
        epoch += 1
        for xb, yb in train_loader:
            loss = 0.0
            for bits in wrapper.bits:  # one shared set of weights, five bit-widths
                with wrapper.at_bits(bits):
                    loss = loss + F.cross_entropy(wrapper(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            (loss / len(wrapper.bits)).backward()
            optimizer.step()
            step += 1
            if time.monotonic() - start >= args.seconds:
                break
    elapsed = time.monotonic() - start
    print(f"trained {step} steps ({epoch} epoch(s) started) in {elapsed:.0f} s")

    wrapper.eval()
    print("clean test accuracy per bit-width:")
    with torch.no_grad():
        for bits in wrapper.bits:
            correct = 0
            with wrapper.at_bits(bits):
                for xb, yb in test_loader:
                    correct += (wrapper(xb).argmax(1) == yb).sum().item()
            print(f"  {bits:>2} bits: {100.0 * correct / len(test_set):5.1f}%")


if __name__ == "__main__":
    main()

"""A plain PyTorch training loop: the "before" of examples/train_after.py.

python examples/train_before.py [--epochs 2] [--steps-per-epoch 30]
"""

import argparse

import torch

import triqdef.data
import triqdef.models


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps-per-epoch", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    train_set = triqdef.data.dataset("auto", train=True)  # Fashion-MNIST, else digits
    loader = torch.utils.data.DataLoader(train_set, batch_size=64, shuffle=True)
    model = triqdef.models.SmallCNN(width=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    for epoch in range(args.epochs):
        model.train()
        for _, (x, y) in zip(range(args.steps_per_epoch), loader):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(f"epoch {epoch}: loss {loss.item():.3f}")


if __name__ == "__main__":
    main()

"""examples/train_before.py with TriQDef: three added lines and a changed loss line.

python examples/train_after.py [--epochs 2] [--steps-per-epoch 30]
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
    model = triqdef.TriQDefWrapper(model, layers=["block1", "block2"])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = triqdef.BACTSchedule(model, total=args.epochs)

    for epoch in range(args.epochs):
        model.train()
        for _, (x, y) in zip(range(args.steps_per_epoch), loader):
            loss = model.loss(x, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(f"epoch {epoch}: loss {loss.item():.3f}")
        schedule.step()


if __name__ == "__main__":
    main()

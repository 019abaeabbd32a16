"""A plain Hugging Face accelerate training loop; examples/accelerate_train.py adds TriQDef.

python examples/accelerate_plain.py [--epochs 2] [--steps-per-epoch 30] [--out model.pt] [--cpu]
"""

import argparse

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

import triqdef.data
import triqdef.models


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps-per-epoch", type=int, default=30)
    parser.add_argument("--out", default="model.pt")
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=args.cpu)
    train_set = triqdef.data.dataset("auto", train=True)
    loader = DataLoader(train_set, batch_size=64, shuffle=True)
    model = triqdef.models.SmallCNN(width=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    for epoch in range(args.epochs):
        model.train()
        for _, (x, y) in zip(range(args.steps_per_epoch), loader):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            accelerator.backward(loss)
            optimizer.step()
        accelerator.print(f"epoch {epoch}: loss {loss.item():.3f}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        torch.save(accelerator.unwrap_model(model).state_dict(), args.out)


if __name__ == "__main__":
    main()

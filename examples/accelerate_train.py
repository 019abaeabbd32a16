"""examples/accelerate_plain.py with TriQDef: wrap, schedule, ``model(x, y)`` is the loss.

``accelerator.prepare`` wraps the TriQDefWrapper like any module (in
DistributedDataParallel on several processes, whose forward ``wrapper(x, y)``
returns the loss, so gradients synchronise); ``triqdef.save`` takes the unwrapped
wrapper.

python examples/accelerate_train.py [--epochs 2] [--steps-per-epoch 30] [--cpu]
    [--out model.safetensors]
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
    parser.add_argument("--out", default="model.safetensors")
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=args.cpu)
    train_set = triqdef.data.dataset("auto", train=True)
    loader = DataLoader(train_set, batch_size=64, shuffle=True)
    model = triqdef.models.SmallCNN(width=16)
    model = triqdef.TriQDefWrapper(model, layers=["block1", "block2"])
    schedule = triqdef.BACTSchedule(model, total=args.epochs)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    for epoch in range(args.epochs):
        model.train()
        for _, (x, y) in zip(range(args.steps_per_epoch), loader):
            loss = model(x, y)
            optimizer.zero_grad()
            accelerator.backward(loss)
            optimizer.step()
        accelerator.print(f"epoch {epoch}: loss {loss.item():.3f}")
        schedule.step()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        triqdef.save(accelerator.unwrap_model(model), args.out)


if __name__ == "__main__":
    main()

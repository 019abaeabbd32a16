"""A plain Lightning training script; examples/lightning_train.py is the same with TriQDef.

python examples/lightning_plain.py [--epochs 2] [--steps-per-epoch 30] [--fast-dev-run]
"""

import argparse

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

import triqdef.data
import triqdef.models


class Classifier(pl.LightningModule):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.model(x), y)
        self.log("loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self.model(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps-per-epoch", type=int, default=30)
    parser.add_argument("--fast-dev-run", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    train_set = triqdef.data.dataset("auto", train=True)
    val_set = triqdef.data.dataset(train_set.name, train=False)
    train = DataLoader(train_set, batch_size=64, shuffle=True)
    val = DataLoader(val_set, batch_size=256)
    model = triqdef.models.SmallCNN(width=16)
    callbacks: list[pl.Callback] = []
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        limit_train_batches=args.steps_per_epoch,
        limit_val_batches=4,
        callbacks=callbacks,
        fast_dev_run=args.fast_dev_run,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Classifier(model), train, val)
    print({k: round(float(v), 4) for k, v in trainer.callback_metrics.items()})


if __name__ == "__main__":
    main()

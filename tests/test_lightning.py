"""The Lightning callback: finding the wrapper, stepping, logging, checkpoints."""

from __future__ import annotations

import difflib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from triqdef import BACTSchedule, TriQDefWrapper  # noqa: E402
from triqdef.errors import ConfigError  # noqa: E402
from triqdef.integrations.lightning import TriQDefCallback  # noqa: E402

BITS = (32, 8, 4, 2)

# Lightning's advice about tiny CPU runs (few workers, non-resumable loaders, no val loader)
pytestmark = [
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    pytest.mark.filterwarnings("ignore:`isinstance.treespec, LeafSpec.` is deprecated"),
]


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 3),
    )


class Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = TriQDefWrapper(_net(), bits=BITS, layers=["2"])

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.model.loss(x, y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.model(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _loader(n: int = 16, seed: int = 0) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    data = torch.utils.data.TensorDataset(
        torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)
    )
    return torch.utils.data.DataLoader(data, batch_size=8)


def _trainer(tmp_path, callback, **kwargs) -> pl.Trainer:
    kwargs.setdefault("enable_checkpointing", False)
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        **kwargs,
    )


def test_the_wrapper_must_be_there_exactly_once():
    with pytest.raises(ConfigError, match="found 0"):
        TriQDefCallback.find_wrapper(nn.Linear(2, 2))
    two = nn.ModuleList([TriQDefWrapper(_net(), bits=BITS, lambda_fdp=0) for _ in range(2)])
    with pytest.raises(ConfigError, match="found 2"):
        TriQDefCallback.find_wrapper(two)
    m = Module()
    assert TriQDefCallback.find_wrapper(m) is m.model


def test_bad_arguments_raise_config_errors():
    with pytest.raises(ConfigError, match="step_every"):
        TriQDefCallback(step_every="batch")
    with pytest.raises(ConfigError, match="total"):
        TriQDefCallback(total=0)
    with pytest.raises(ConfigError, match="schedule"):
        TriQDefCallback(schedule="nope")  # type: ignore[arg-type]
    m = Module()
    with pytest.raises(ConfigError, match="with schedule= given"):
        TriQDefCallback(BACTSchedule(m.model, total=4), total=4)
    with pytest.raises(ConfigError, match="log_terms"):
        TriQDefCallback(log_terms=1)  # type: ignore[arg-type]


def test_accuracy_bits_must_be_the_wrappers(tmp_path):
    cb = TriQDefCallback(accuracy_bits=(32, 3))
    with pytest.raises(ConfigError, match=r"accuracy_bits \[3\]"):
        _trainer(tmp_path, cb, fast_dev_run=True).fit(Module(), _loader())
    with pytest.raises(ConfigError, match="calib_batches"):
        TriQDefCallback(calib_batches=0)


def test_a_schedule_of_another_wrapper_is_refused(tmp_path):
    other = TriQDefWrapper(_net(), bits=BITS, lambda_fdp=0)
    cb = TriQDefCallback(BACTSchedule(other, total=4))
    with pytest.raises(ConfigError, match="another TriQDefWrapper"):
        _trainer(tmp_path, cb, fast_dev_run=True).fit(Module(), _loader())


def test_fast_dev_run_steps_logs_terms_and_per_bit_accuracy(tmp_path):
    m = Module()
    cb = TriQDefCallback(step_every="step", milestones=(1, 1), calib_batches=1)
    trainer = _trainer(tmp_path, cb, fast_dev_run=True)
    trainer.fit(m, _loader(), _loader(seed=1))
    assert cb.schedule is not None and cb.schedule.steps == 1
    assert m.model.active_bits == BITS  # both stages joined at step 1, calibrated
    metrics = trainer.callback_metrics
    assert {"triqdef/total", "triqdef/clean", "triqdef/adv", "triqdef/stage"} <= set(metrics)
    assert {f"triqdef/val_acc/{b}" for b in BITS} <= set(metrics)
    assert all(0.0 <= float(metrics[f"triqdef/val_acc/{b}"]) <= 1.0 for b in BITS)


def test_per_bit_accuracy_matches_clean_accuracy(tmp_path):
    from triqdef.evaluate import clean_accuracy

    m = Module()
    cb = TriQDefCallback(step_every="step", milestones=(1, 1), calib_batches=1)
    trainer = _trainer(tmp_path, cb, max_steps=1, limit_val_batches=0)
    trainer.fit(m, _loader())
    val = _loader(n=24, seed=3)
    trainer = _trainer(tmp_path, cb)
    trainer.validate(m, val, verbose=False)
    expected = clean_accuracy(m.model, val)
    for b in BITS:
        assert float(trainer.callback_metrics[f"triqdef/val_acc/{b}"]) == pytest.approx(expected[b])


def test_uncalibrated_bits_are_skipped_and_accuracy_bits_chooses(tmp_path):
    m = Module()
    cb = TriQDefCallback(step_every="step", total=100, accuracy_bits=(32, 2))
    trainer = _trainer(tmp_path, cb, max_epochs=1, limit_train_batches=1)
    trainer.fit(m, _loader(), _loader(seed=1))
    assert m.model.active_bits == (32, 8)
    assert "triqdef/val_acc/32" in trainer.callback_metrics
    assert "triqdef/val_acc/2" not in trainer.callback_metrics  # 2 bits has not joined
    assert "triqdef/val_acc/8" not in trainer.callback_metrics  # not asked for


def test_epoch_mode_steps_once_per_epoch_with_default_total(tmp_path):
    m = Module()
    cb = TriQDefCallback(calib_batches=1)
    trainer = _trainer(tmp_path, cb, max_epochs=4, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(m, _loader(), _loader(seed=1))
    assert cb.schedule is not None
    assert cb.schedule.milestones == (1, 2)  # default milestones over total=max_epochs=4
    assert cb.schedule.steps == 4 and m.model.active_bits == BITS


def test_a_given_schedule_is_used_with_its_own_loader(tmp_path):
    m = Module()
    calib = [torch.rand(4, 1, 8, 8)]
    schedule = BACTSchedule(m.model, milestones=(1, 2), calib_loader=calib, calib_batches=1)
    cb = TriQDefCallback(schedule, step_every="step", log_accuracy=False)
    _trainer(tmp_path, cb, max_steps=2).fit(m, _loader())
    assert cb.schedule is schedule and schedule.steps == 2 and schedule.stage == 2


def _run(tmp_path, step_every, ckpt_path=None, save=None, **kwargs):
    m = Module()
    cb = TriQDefCallback(step_every=step_every, milestones=(2, 5), calib_batches=1)
    trainer = _trainer(tmp_path, cb, limit_val_batches=1, **kwargs)
    trainer.fit(m, _loader(n=32), _loader(seed=1), ckpt_path=ckpt_path)
    if save is not None:
        trainer.save_checkpoint(save)
    assert cb.schedule is not None
    return cb.schedule, m.model


def test_resuming_mid_stage_in_step_mode_matches_an_uninterrupted_run(tmp_path):
    ckpt = tmp_path / "mid.ckpt"
    first, _ = _run(tmp_path, "step", max_steps=3, save=ckpt)
    assert (first.steps, first.stage) == (3, 1)  # mid-stage: 4 bits joined at 2, 2 bits at 5
    state = torch.load(ckpt, weights_only=False)["callbacks"]
    (saved,) = [v for k, v in state.items() if "TriQDefCallback" in k]
    assert saved["schedule"]["steps"] == 3 and saved["steps_taken"] == 3

    resumed, w_resumed = _run(tmp_path, "step", ckpt_path=ckpt, max_steps=6)
    straight, w_straight = _run(tmp_path, "step", max_steps=6)
    assert resumed.state_dict() == straight.state_dict()
    assert (resumed.steps, resumed.stage) == (6, 2)
    assert w_resumed.active_bits == w_straight.active_bits == BITS


def test_resuming_in_epoch_mode_matches_an_uninterrupted_run(tmp_path):
    ckpt = tmp_path / "epoch.ckpt"
    kw = {"limit_train_batches": 1}
    first, w_first = _run(tmp_path, "epoch", max_epochs=3, save=ckpt, **kw)
    assert (first.steps, first.stage) == (3, 1) and w_first.active_bits == (32, 8, 4)
    resumed, w_resumed = _run(tmp_path, "epoch", ckpt_path=ckpt, max_epochs=5, **kw)
    straight, w_straight = _run(tmp_path, "epoch", max_epochs=5, **kw)
    assert resumed.state_dict() == straight.state_dict()
    assert (resumed.steps, resumed.stage) == (5, 2)
    assert w_resumed.active_bits == w_straight.active_bits == BITS


def test_a_checkpoint_from_before_the_epoch_end_step_catches_up():
    m = Module()
    cb = TriQDefCallback(milestones=(2, 5), calib_batches=1)
    cb.wrapper = m.model
    cb.schedule = BACTSchedule(m.model, milestones=(2, 5), calib_loader=[torch.rand(4, 1, 8, 8)])
    cb.load_state_dict(
        {"schedule": cb.schedule.state_dict(), "steps_taken": 0, "step_every": "epoch"}
    )

    class FakeTrainer:
        current_epoch = 3  # e.g. saved at validation end of epoch 2, before the step

    cb.on_train_epoch_start(FakeTrainer(), m)  # type: ignore[arg-type]
    assert (cb.schedule.steps, cb.schedule.stage) == (3, 1)


def test_a_state_for_another_unit_is_refused():
    cb = TriQDefCallback(step_every="step")
    with pytest.raises(ConfigError, match="stepped every 'epoch'"):
        cb.load_state_dict({"schedule": None, "steps_taken": 0, "step_every": "epoch"})
    with pytest.raises(ConfigError, match="not a state dict"):
        cb.load_state_dict({"steps": 1})


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _code(path: Path) -> list[str]:
    """Lines after the module docstring."""
    text = path.read_text()
    return text[text.index('"""', 3) + 3 :].splitlines()


def test_the_lightning_example_adds_only_the_triqdef_lines():
    plain, ours = _code(EXAMPLES / "lightning_plain.py"), _code(EXAMPLES / "lightning_train.py")
    added, removed = [], []
    for line in difflib.unified_diff(plain, ours, n=0, lineterm=""):
        if line.startswith("+") and not line.startswith("+++"):
            added.append(line[1:].strip())
        elif line.startswith("-") and not line.startswith("---"):
            removed.append(line[1:].strip())
    assert sorted(removed) == sorted(
        [
            "loss = torch.nn.functional.cross_entropy(self.model(x), y)",
            "callbacks: list[pl.Callback] = []",
        ]
    )
    assert sorted(added) == sorted(
        [
            "from triqdef.integrations.lightning import TriQDefCallback",
            "loss = self.model.loss(x, y)",
            'model = triqdef.TriQDefWrapper(model, layers=["block1", "block2"])',
            "callbacks: list[pl.Callback] = [TriQDefCallback(calib_batches=2)]",
        ]
    )


def test_the_lightning_example_runs_with_fast_dev_run(tmp_path):
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "lightning_train.py"), "--fast-dev-run"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        cwd=tmp_path,
    )
    assert "'triqdef/total'" in out.stdout and "'triqdef/val_acc/32'" in out.stdout

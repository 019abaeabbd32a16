"""The ``triqdef`` command line: ``info`` and ``eval`` on tiny saved wrappers, the
``reproduce`` wiring, complete ``--help`` texts, one-line errors with exit status 2."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import triqdef
from triqdef import cli, reproduce
from triqdef.data import digits
from triqdef.evaluate import TransferMatrix
from triqdef.models import SmallCNN, resnet20


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return digits(train=True).data[:64]


def _save(
    path: Path,
    images: torch.Tensor,
    calibrate: tuple[int, ...] = (4,),
    in_channels: int = 1,
    **kwargs,
):
    torch.manual_seed(0)
    w = triqdef.TriQDefWrapper(
        SmallCNN(in_channels=in_channels, width=4),
        bits=(32, 4, 2),
        layers=["block1"],
        **kwargs,
    )
    if calibrate:
        w.calibrate([images.expand(-1, in_channels, -1, -1)], bits=list(calibrate))
    triqdef.save(w, path)
    return w


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, images) -> tuple[Path, triqdef.TriQDefWrapper]:
    """A SmallCNN(width=4) wrapper at bits (32, 4, 2), calibrated at 4 bits only."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    return path, _save(path, images)


def _error(capsys, argv: list[str], match: str) -> str:
    """Run ``argv``; it must exit with status 2 and one line on stderr holding ``match``."""
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert match in last, err
    return err


def _one_line(err: str, command: str) -> None:
    assert len(err.splitlines()) == 1 and err.startswith(f"triqdef {command}: error: ")


# --- info ---------------------------------------------------------------------------------
def test_info_prints_bits_layers_calibration_and_format(tiny, capsys):
    path, _ = tiny
    assert cli.main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    lines = {line.split("  ")[0]: line.split("  ", 1)[1].strip() for line in out.splitlines()}
    assert lines["bits"] == "32, 4, 2"
    assert lines["calibrated bits"] == "32, 4"
    assert lines["layers (FDP taps)"] == "block1"
    assert lines["format version"] == triqdef.io.FORMAT_VERSION
    assert lines["kind"] == "wrapper" and lines["model"].startswith("SmallCNN")
    assert lines["input bits"] == "8" and lines["per-bit BatchNorm"] == "yes"


@pytest.mark.parametrize("calibrate", [(), (2,), (4, 2)])
def test_info_json_calibrated_bits_match_the_wrapper(tmp_path, images, capsys, calibrate):
    path = tmp_path / "w.safetensors"
    w = _save(path, images, calibrate, exclude=["head"], per_bit_bn=False, input_bits=None)
    cli.main(["info", str(path), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["calibrated_bits"] == list(w.calibrated_bits())
    assert info["bits"] == [32, 4, 2] and info["layers"] == ["block1"]
    assert info["exclude"] == ["head"] and info["per_bit_bn"] is False
    assert info["input_bits"] is None and info["readable"] is True
    assert info["quantized_layers"] == len(w.quantized_layers()) == 3
    assert info["size_bytes"] == path.stat().st_size


def test_info_reads_a_quantized_export(tmp_path, tiny, capsys):
    _, w = tiny
    path = tmp_path / "q.safetensors"
    triqdef.save_quantized(w, path, bits=4)
    cli.main(["info", str(path)])
    out = capsys.readouterr().out
    assert "quantized" in out and "exported bits      4" in out


def test_info_errors_are_one_line(tmp_path, capsys):
    _one_line(_error(capsys, ["info", str(tmp_path / "missing.safetensors")], "no such"), "info")
    _one_line(_error(capsys, ["info", str(tmp_path)], "directory"), "info")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    _one_line(_error(capsys, ["info", str(tmp_path / "junk.safetensors")], "corrupt"), "info")
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, other)
    _one_line(_error(capsys, ["info", str(other)], "not written by triqdef"), "info")


# --- eval ---------------------------------------------------------------------------------
TINY_ATTACK = ["--data", "digits", "--n-images", "12", "--steps", "2", "--patch-size", "4"]


@pytest.mark.parametrize("attack", ["lavan", "gap"])
def test_eval_writes_the_transfer_matrix(tiny, tmp_path, capsys, attack):
    path, _ = tiny
    png, js = tmp_path / "m.png", tmp_path / "m.json"
    argv = ["eval", str(path), *TINY_ATTACK, "--attack", attack, "--batch-size", "5"]
    assert cli.main([*argv, "--heatmap", str(png), "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert f"{attack.upper()}, 4x4 patches" in out and "| noise floor |" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m = TransferMatrix.from_dict(json.loads(js.read_text()))
    # the calibrated bit-widths only, by default; every cell a count of 12 images
    assert m.source_bits == m.target_bits == [32, 4] and m.samples == 12
    for row in m.counts:
        for succ, elig in row:
            assert 0 <= succ <= elig <= 12
    assert m.to_markdown() in out


def test_eval_source_and_target_bits_and_explicit_model(tiny, tmp_path, capsys):
    path, _ = tiny
    js = tmp_path / "m.json"
    argv = ["eval", str(path), *TINY_ATTACK, "--model", "smallcnn", "--json", str(js)]
    cli.main([*argv, "--source-bits", "4", "--target-bits", "32", "4", "4"])
    m = json.loads(js.read_text())
    assert m["source_bits"] == [4] and m["target_bits"] == [32, 4]


def test_eval_reads_the_model_from_the_checkpoint(tmp_path, images):
    torch.manual_seed(0)
    w = triqdef.TriQDefWrapper(resnet20(in_channels=1, num_classes=7), bits=(32, 8))
    triqdef.save(w, tmp_path / "r.safetensors")
    loaded = cli.load_wrapper(str(tmp_path / "r.safetensors"))
    assert isinstance(loaded.model, type(w.model)) and loaded.bits == (32, 8)
    assert loaded.model.fc.out_features == 7 and not loaded.training
    x = images[:4]
    with torch.no_grad():
        assert torch.equal(loaded(x), w.eval()(x))


def test_eval_errors_are_one_line_and_come_before_any_work(tiny, tmp_path, capsys):
    path, _ = tiny
    base = ["eval", str(path), *TINY_ATTACK]
    err = _error(capsys, [*base, "--source-bits", "2"], "never calibrated at 2 bits")
    _one_line(err, "eval")
    _one_line(_error(capsys, [*base, "--target-bits", "8"], "runs at bits 32, 4, 2"), "eval")
    _one_line(_error(capsys, [*base, "--model", "resnet20"], "not a resnet20"), "eval")
    missing = str(tmp_path / "no-dir" / "m.png")
    _one_line(_error(capsys, [*base, "--heatmap", missing], "does not exist"), "eval")
    nothing = str(tmp_path / "nothing.safetensors")
    _one_line(_error(capsys, ["eval", nothing, *TINY_ATTACK], "no such"), "eval")
    assert not (tmp_path / "no-dir").exists()


def test_eval_refuses_data_of_another_channel_count(tmp_path, images, capsys):
    path = tmp_path / "rgb.safetensors"
    _save(path, images, in_channels=3)
    _one_line(_error(capsys, ["eval", str(path), *TINY_ATTACK], "3-channel"), "eval")


@pytest.mark.parametrize(
    "argv, match",
    [
        (["eval", "x.safetensors", "--data", "mnist"], "invalid choice: 'mnist'"),
        (["eval", "x.safetensors", "--attack", "fgsm"], "invalid choice: 'fgsm'"),
        (["eval", "x.safetensors", "--n-images", "0"], "positive integer"),
        (["eval", "x.safetensors", "--step-size", "nan"], "positive finite number"),
        (["eval", "x.safetensors", "--source-bits", "1"], "bit-width (2..32)"),
        (["eval"], "CHECKPOINT"),
        (["info"], "CHECKPOINT"),
        (["train"], "invalid choice: 'train'"),
        ([], "COMMAND"),
        (["reproduce", "--data", "imagenet"], "invalid choice: 'imagenet'"),
        (["reproduce", "--seeds", "a"], "invalid int value"),
    ],
)
def test_bad_arguments_exit_with_status_2(argv, match, capsys):
    _error(capsys, argv, match)


# --- reproduce ----------------------------------------------------------------------------
def test_reproduce_takes_the_reproductions_options(monkeypatch):
    seen = {}
    monkeypatch.setattr(reproduce, "from_args", lambda args: seen.setdefault("args", args))
    argv = ["--data", "digits", "--size", "smoke", "--seeds", "0", "1", "--triqdef", "pairs=sum"]
    argv += ["--no-bn-refresh", "--out", "somewhere", "--methods", "multibit", "triqdef"]
    assert cli.main(["reproduce", *argv]) == 0
    mine = reproduce.build_parser().parse_args(argv)
    got = vars(seen["args"])
    assert {k: got[k] for k in vars(mine)} == vars(mine)
    assert got["seeds"] == [0, 1] and got["bn_refresh"] is False


def test_reproduce_errors_are_one_line(capsys):
    err = _error(capsys, ["reproduce", "--triqdef", "lambda_fpd=1"], "not a TriQDefWrapper")
    _one_line(err, "reproduce")


# --- help ---------------------------------------------------------------------------------
def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_every_option_has_a_help_text():
    for parser in _parsers(cli.build_parser()):
        assert parser.description, parser.prog
        for action in parser._actions:
            assert action.help and action.help != argparse.SUPPRESS, (parser.prog, action.dest)
            assert action.help.strip() == action.help


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["reproduce", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--data", "--full", "--methods", "--triqdef", "--merge", "--size"):
        assert option in out
    out = subprocess.run(
        [sys.executable, "-m", "triqdef", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert out.startswith("usage: triqdef")
    for command in ("reproduce", "eval", "info"):
        assert command in out


@pytest.mark.parametrize(
    "options",
    [{"quantizer": "lsq"}, {"min_bits": {"block1.0": 8}}, {"act_bits": 8}, {"act_bits": {4: 8}}],
)
def test_load_wrapper_and_info_keep_the_precision_options(tmp_path, images, capsys, options):
    torch.manual_seed(0)
    w = triqdef.TriQDefWrapper(SmallCNN(width=4), bits=(32, 8, 4), **options)
    w.calibrate([images[:8]])
    path = tmp_path / "p.safetensors"
    triqdef.save(w, path)
    loaded = cli.load_wrapper(str(path))
    assert loaded.quantizer == w.quantizer
    assert loaded.min_bits == w.min_bits and loaded.act_bits == w.act_bits
    x = images[:4]
    with torch.no_grad():
        for b in (8, 4):
            with w.at_bits(b), loaded.at_bits(b):
                assert torch.allclose(loaded(x), w.eval()(x), atol=1e-6)
    cli.main(["info", str(path), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["quantizer"] == w.quantizer
    assert info["min_bits"] == dict(w.min_bits)
    want = (
        w.act_bits
        if not isinstance(w.act_bits, dict)
        else {str(k): v for k, v in w.act_bits.items()}
    )
    assert info["act_bits"] == want

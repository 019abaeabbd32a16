"""Hostile checkpoints (issue #15, items 4-10): files, state dicts and schedule states that
do not fit raise an error of the triqdef family naming what is wrong, and change nothing.

Covers ``triqdef.load`` (dtypes, NaN/Inf observers and BatchNorm statistics, out-of-range
observer kinds, malformed metadata JSON, one read for metadata and tensors),
``triqdef.save`` (directories, NUL characters, unwritable targets: no file left behind),
``TriQDefWrapper.load_state_dict`` (everything checked before the first copy) and
``BACTSchedule`` (``load_state_dict`` validation, ``step`` advancing only once the
joining bit-widths are calibrated).
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time

import pytest
import torch
from hostile import BITS, assert_unchanged, images, labels, net, snapshot, trained
from safetensors import safe_open
from safetensors.torch import save_file

import triqdef
import triqdef._safetensors
from triqdef import BACTSchedule, TriQDefWrapper
from triqdef.errors import (
    CheckpointError,
    CheckpointFileError,
    ConfigError,
    InputError,
    TriQDefError,
)


def _saved(tmp_path, w=None, name="w.safetensors"):
    """A good checkpoint of ``w`` (default: a trained wrapper): its path, tensors, metadata."""
    w = trained() if w is None else w
    path = tmp_path / name
    triqdef.save(w, path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return path, tensors, meta


def _edited(t: torch.Tensor, index, value) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[index] = value
    return t


# --- item 4: tensors of a valid file that do not fit -----------------------------------------
NAN, INF = float("nan"), float("inf")
BAD_TENSORS = {
    "weight float16": ("model.0.weight", lambda t: t.half()),
    "weight int64": ("model.0.weight", lambda t: t.round().long()),
    "weight float64": ("model.0.weight", lambda t: t.double()),
    "observer min nan": ("quantizers.0.act_min", lambda t: _edited(t, 0, NAN)),
    "observer max inf": ("quantizers.3.act_max", lambda t: _edited(t, -1, INF)),
    "observer min -inf": ("quantizers.7.act_min", lambda t: _edited(t, 1, -INF)),
    "observer float16": ("quantizers.0.act_max", lambda t: t.half()),
    "act_kind 7": ("quantizers.0.act_kind", lambda t: _edited(t, 0, 7)),
    "act_kind 255": ("quantizers.7.act_kind", lambda t: _edited(t, 1, 255)),
    "act_kind float": ("quantizers.0.act_kind", lambda t: t.float()),
    "act_kind int64": ("quantizers.3.act_kind", lambda t: t.long()),
    "per-bit running_var negative": ("bn_stats.1.running_var", lambda t: _edited(t, 2, -1.0)),
    "per-bit running_mean nan": ("bn_stats.1.running_mean", lambda t: _edited(t, 0, NAN)),
    "per-bit running_var inf": ("bn_stats.1.running_var", lambda t: _edited(t, 0, INF)),
    "per-bit batch count negative": (
        "bn_stats.1.num_batches_tracked",
        lambda t: _edited(t, 0, -3),
    ),
    "model running_var negative": ("model.1.running_var", lambda t: _edited(t, 0, -0.5)),
    "model running_mean inf": ("model.1.running_mean", lambda t: _edited(t, 3, -INF)),
    "model batch count int32": ("model.1.num_batches_tracked", lambda t: t.int()),
}


@pytest.mark.parametrize("case", list(BAD_TENSORS))
def test_load_refuses_bad_tensors_and_changes_nothing(tmp_path, case):
    key, damage = BAD_TENSORS[case]
    path, tensors, meta = _saved(tmp_path)
    tensors[key] = damage(tensors[key])
    save_file(tensors, str(path), metadata=meta)  # metadata still valid
    w = trained()
    snap = snapshot(w)
    with pytest.raises(CheckpointError) as info:
        triqdef.load(w, path)
    message = str(info.value)
    assert key in message and str(path) in message
    assert_unchanged(w, snap)


def test_load_of_a_good_file_still_works_after_the_checks(tmp_path):
    source = trained()
    with torch.no_grad():
        source.model[0].weight.add_(1.0)  # something to see arrive
    path, _, _ = _saved(tmp_path, source)
    w = trained()
    triqdef.load(w, path)
    assert_unchanged(w, {**snapshot(w), "state": snapshot(source)["state"]})


# --- item 5: malformed JSON in the metadata ----------------------------------------------------
@pytest.mark.parametrize(
    "field", ["bits", "layers", "exclude", "per_bit_bn", "input_bits", "input_layers"]
)
def test_malformed_metadata_json_is_a_checkpoint_error(tmp_path, field):
    path, tensors, meta = _saved(tmp_path)
    meta[field] = meta[field][:-1] + "{,"  # e.g. '[32, 8, 4{,'
    save_file(tensors, str(path), metadata=meta)
    w = trained()
    snap = snapshot(w)
    with pytest.raises(CheckpointError) as info:
        triqdef.load(w, path)
    assert not isinstance(info.value, json.JSONDecodeError)
    assert field in str(info.value) and str(path) in str(info.value)
    assert_unchanged(w, snap)


# --- item 6: save to a directory, a NUL in the path, an unwritable target ----------------------
def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_save_to_a_directory_is_a_checkpoint_file_error(tmp_path):
    w = trained()
    snap = snapshot(w)
    (tmp_path / "sub").mkdir()
    before = _listing(tmp_path)
    for target in (tmp_path, tmp_path / "sub", str(tmp_path)):
        with pytest.raises(CheckpointFileError) as info:
            triqdef.save(w, target)
        assert isinstance(info.value, OSError) and isinstance(info.value, CheckpointError)
        assert info.value.errno == errno.EISDIR and str(target) in str(info.value)
        with pytest.raises(CheckpointFileError):
            triqdef.save_quantized(w, target, bits=4)
    assert _listing(tmp_path) == before and _listing(tmp_path / "sub") == []
    assert_unchanged(w, snap)


@pytest.mark.parametrize("fn", ["save", "load", "save_quantized"])
def test_nul_in_the_path_is_an_input_error(tmp_path, fn):
    w = trained()
    snap = snapshot(w)
    target = str(tmp_path / "w\x00.safetensors")
    call = {
        "save": lambda: triqdef.save(w, target),
        "load": lambda: triqdef.load(w, target),
        "save_quantized": lambda: triqdef.save_quantized(w, target, bits=4),
    }[fn]
    with pytest.raises(InputError, match="NUL") as info:
        call()
    assert isinstance(info.value, ValueError) and repr(target) in str(info.value)
    assert _listing(tmp_path) == []
    assert_unchanged(w, snap)


def test_missing_directory_is_a_checkpoint_file_error(tmp_path):
    target = tmp_path / "no" / "such" / "w.safetensors"
    with pytest.raises(CheckpointFileError) as info:
        triqdef.save(trained(), target)
    assert info.value.errno == errno.ENOENT and str(target) in str(info.value)
    assert _listing(tmp_path) == []


def _fail_mkstemp(code):
    def mkstemp(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return mkstemp


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS])
def test_unwritable_directory_is_a_checkpoint_file_error(tmp_path, monkeypatch, code):
    w = trained()
    snap = snapshot(w)
    target = tmp_path / "w.safetensors"
    monkeypatch.setattr(triqdef._safetensors.tempfile, "mkstemp", _fail_mkstemp(code))
    with pytest.raises(CheckpointFileError) as info:
        triqdef.save(w, target)
    assert isinstance(info.value, OSError) and info.value.errno == code
    assert str(target) in str(info.value) and "writable" in str(info.value)
    assert _listing(tmp_path) == []
    assert_unchanged(w, snap)


@pytest.mark.parametrize("stage", ["write", "rename"])
def test_failure_after_the_temporary_file_exists_leaves_nothing(tmp_path, monkeypatch, stage):
    w = trained()
    path, _, _ = _saved(tmp_path, w)
    good = path.read_bytes()
    real_replace = os.replace

    def save_file_ro(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)  # half a file, then the disk turns read-only
        raise OSError(errno.EROFS, "Read-only file system")

    def replace_fails(src, dst):
        if str(dst) == str(path):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_replace(src, dst)

    if stage == "write":
        monkeypatch.setattr(triqdef._safetensors, "save_file", save_file_ro)
    else:
        monkeypatch.setattr(triqdef.io.os, "replace", replace_fails)
    with pytest.raises(CheckpointFileError) as info:
        triqdef.save(w, path)
    monkeypatch.undo()
    assert isinstance(info.value, OSError) and str(path) in str(info.value)
    assert _listing(tmp_path) == ["w.safetensors"] and path.read_bytes() == good


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes anyway")
def test_read_only_directory_for_real(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(CheckpointFileError) as info:
            triqdef.save(trained(), folder / "w.safetensors")
        assert isinstance(info.value, OSError) and str(folder) in str(info.value)
        assert _listing(folder) == []
    finally:
        folder.chmod(0o755)


def test_load_of_a_directory_or_missing_file_is_also_an_os_error(tmp_path):
    w = trained()
    snap = snapshot(w)
    for target, code in ((tmp_path, errno.EISDIR), (tmp_path / "nope", errno.ENOENT)):
        with pytest.raises(CheckpointFileError) as info:
            triqdef.load(w, target)
        assert isinstance(info.value, OSError) and isinstance(info.value, ValueError)
        assert info.value.errno == code and str(target) in str(info.value)
    assert_unchanged(w, snap)


# --- item 7: load_state_dict checks everything before the first copy ---------------------------
def _zeros_with(w, key, value) -> dict:
    """Every entry zeroed (so a partial copy would show), one entry replaced by ``value``."""
    sd = {k: torch.zeros_like(v) for k, v in w.state_dict().items()}
    sd["model.1.running_var"] = torch.ones_like(sd["model.1.running_var"])
    sd["bn_stats.1.running_var"] = torch.ones_like(sd["bn_stats.1.running_var"])
    sd[key] = value
    return sd


BAD_STATE_DICTS = {
    "last value a list": lambda w: _zeros_with(w, "bn_stats.1.num_batches_tracked", [1, 1]),
    "last value None": lambda w: _zeros_with(w, "bn_stats.1.num_batches_tracked", None),
    "weight a list": lambda w: _zeros_with(w, "model.7.bias", [0.0] * 5),
    "weight int64": lambda w: _zeros_with(w, "model.7.bias", torch.zeros(5, dtype=torch.long)),
    "weight bool": lambda w: _zeros_with(w, "model.7.bias", torch.zeros(5, dtype=torch.bool)),
    "weight complex": lambda w: _zeros_with(w, "model.7.bias", torch.zeros(5, dtype=torch.cfloat)),
    "weight on meta": lambda w: _zeros_with(w, "model.7.bias", torch.zeros(5, device="meta")),
    "weight shape": lambda w: _zeros_with(w, "model.7.bias", torch.zeros(6)),
    "observer nan": lambda w: _zeros_with(w, "quantizers.7.act_max", torch.tensor([0.0, NAN])),
    "observer overflows float32": lambda w: _zeros_with(
        w, "quantizers.7.act_max", torch.tensor([0.0, 1e300], dtype=torch.float64)
    ),
    "act_kind 3": lambda w: _zeros_with(
        w, "quantizers.7.act_kind", torch.tensor([3, 0], dtype=torch.uint8)
    ),
    "act_kind negative int64": lambda w: _zeros_with(
        w, "quantizers.7.act_kind", torch.tensor([-1, 0])
    ),
    "act_kind float": lambda w: _zeros_with(w, "quantizers.7.act_kind", torch.tensor([1.0, 2.0])),
    "per-bit running_var negative": lambda w: _zeros_with(
        w, "bn_stats.1.running_var", -torch.ones(2, 4)
    ),
    "model running_mean nan": lambda w: _zeros_with(
        w, "model.1.running_mean", torch.full((4,), NAN)
    ),
    "batch count uint64": lambda w: _zeros_with(
        w, "model.1.num_batches_tracked", torch.tensor(2**63, dtype=torch.uint64)
    ),
    "batch count negative": lambda w: _zeros_with(
        w, "model.1.num_batches_tracked", torch.tensor(-1)
    ),
}


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("case", list(BAD_STATE_DICTS))
def test_load_state_dict_checks_everything_before_copying(case, strict):
    w = trained()
    snap = snapshot(w)
    with pytest.raises(CheckpointError):
        w.load_state_dict(BAD_STATE_DICTS[case](w), strict=strict)
    assert_unchanged(w, snap)


@pytest.mark.parametrize(
    "value", [None, 5, "state", [("model.0.weight", torch.zeros(4, 3, 3, 3))], {0: torch.ones(1)}]
)
def test_load_state_dict_of_a_non_mapping_is_an_input_error(value):
    w = trained()
    snap = snapshot(w)
    with pytest.raises(InputError) as info:
        w.load_state_dict(value)
    assert isinstance(info.value, TypeError)  # what nn.Module raises for a non-mapping
    assert_unchanged(w, snap)


def test_load_state_dict_keeps_torch_semantics():
    w = trained()
    # non-strict: a partial dict loads what it holds and reports the rest
    bias = torch.full((5,), 0.25)
    result = w.load_state_dict({"model.7.bias": bias, "extra": torch.ones(1)}, strict=False)
    assert torch.equal(w.model[7].bias, bias)
    assert result.unexpected_keys == ["extra"] and "model.0.weight" in result.missing_keys
    # strict with a whole state dict: nothing missing, nothing unexpected
    result = w.load_state_dict(w.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    # another float precision is cast, as nn.Module does; the wrapper keeps its dtype
    w.load_state_dict(
        {k: v.double() if v.is_floating_point() else v for k, v in w.state_dict().items()}
    )
    assert w.model[0].weight.dtype == torch.float32
    # assign=True keeps the given tensors: their dtype must be the wrapper's
    snap = snapshot(w)
    halves = {k: v.half() if v.is_floating_point() else v for k, v in w.state_dict().items()}
    with pytest.raises(CheckpointError, match="dtype"):
        w.load_state_dict(halves, assign=True)
    assert_unchanged(w, snap)
    fresh = {k: v.clone() + (1 if v.is_floating_point() else 0) for k, v in w.state_dict().items()}
    fresh = {k: v.clamp(min=0) if "running_var" in k else v for k, v in fresh.items()}
    w.load_state_dict(fresh, assign=True)
    assert w.model[0].weight.data_ptr() == fresh["model.0.weight"].data_ptr()


# --- item 8: metadata and tensors come from one read ---------------------------------------------
def test_concurrent_replacement_never_mixes_two_files(tmp_path):
    """A writer swaps two configurations' files under the same name while loads run: each
    load is either all of file A (layers ["2"]) or refused (file B has layers ["4"])."""
    a = trained()
    torch.manual_seed(1)
    b = TriQDefWrapper(net(), bits=BITS, layers=["4"])  # same tensors' keys, other weights
    b.loss(images(), labels()).backward()
    path = tmp_path / "w.safetensors"
    triqdef.save(a, path)
    data_a = path.read_bytes()
    triqdef.save(b, path)
    data_b = path.read_bytes()
    expected = snapshot(a)["state"]
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            tmp = tmp_path / f".swap{i % 2}"
            tmp.write_bytes(data_a if i % 2 == 0 else data_b)
            os.replace(tmp, path)  # atomic, like triqdef.save
            i += 1

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    target = trained()
    loaded = refused = 0
    deadline = time.monotonic() + 5.0  # ~2.5 s here; the old two-open load failed in it
    try:
        while time.monotonic() < deadline and loaded + refused < 1000:
            try:
                triqdef.load(target, path)
            except CheckpointError as exc:
                assert "layers" in str(exc), exc
                refused += 1
                continue
            loaded += 1
            state = target.state_dict()
            for k, v in expected.items():
                assert torch.equal(state[k], v), f"load {loaded}: {k} is not file A's"
    finally:
        stop.set()
        thread.join()
    assert loaded > 0 and refused > 0


# --- item 9: BACTSchedule.load_state_dict ------------------------------------------------
def _schedule_state(**changes) -> dict:
    state = {"steps": 3, "stage": 1, "stages": [[32, 8], [4]], "milestones": [2]}
    return {**state, **changes}


BAD_SCHEDULE_STATES = {
    "steps -5": _schedule_state(steps=-5),
    "steps True": _schedule_state(steps=True),
    "steps float": _schedule_state(steps=3.0),
    "steps None": _schedule_state(steps=None),
    "stage True": _schedule_state(stage=True),
    "stage -1": _schedule_state(stage=-1),
    "stage 2": _schedule_state(stage=2),
    "stage behind steps": _schedule_state(stage=0),
    "stage ahead of steps": _schedule_state(steps=1, stage=1),
    "stage at step 0": _schedule_state(steps=0, stage=1),
    "milestones int": _schedule_state(milestones=2),
    "milestones bool": _schedule_state(milestones=[True]),
    "milestones str": _schedule_state(milestones="2"),
    "milestones other": _schedule_state(milestones=[5]),
    "stages int": _schedule_state(stages=5),
    "stages flat": _schedule_state(stages=[32, 8, 4]),
    "stages other": _schedule_state(stages=[[32], [8, 4]]),
    "stages bool": _schedule_state(stages=[[32, 8], [True]]),
    "missing key": {k: v for k, v in _schedule_state().items() if k != "stage"},
    "unknown key": _schedule_state(extra=1),
    "not a dict": [("steps", 3)],
    "None": None,
}


@pytest.mark.parametrize("case", list(BAD_SCHEDULE_STATES))
def test_schedule_load_state_dict_validates_every_field(case):
    w = trained()
    s = BACTSchedule(w, milestones=(2,))
    snap, progress = snapshot(w), (s.steps, s.stage, s.active_bits)
    with pytest.raises(ConfigError):
        s.load_state_dict(BAD_SCHEDULE_STATES[case])
    assert (s.steps, s.stage, s.active_bits) == progress
    assert_unchanged(w, snap)


def test_schedule_load_state_dict_accepts_its_own_states():
    np = pytest.importorskip("numpy")
    w = trained()
    s = BACTSchedule(w, milestones=(2,))
    s.load_state_dict(_schedule_state())
    assert (s.steps, s.stage, s.active_bits, w.active_bits) == (3, 1, BITS, BITS)
    s.load_state_dict(_schedule_state(steps=np.int64(1), stage=np.int64(0)))
    assert (s.steps, s.stage, w.active_bits) == (1, 0, (32, 8))
    s.load_state_dict(BACTSchedule(trained(), milestones=(2,)).state_dict())
    assert (s.steps, s.stage) == (0, 0)


# --- item 10: step() advances only once the joining bit-widths are calibrated --------------------
class _FlakyLoader:
    """Raises on its first ``fails`` iterations, then yields three batches."""

    def __init__(self, fails: int = 1) -> None:
        self.fails = fails

    def __iter__(self):
        if self.fails:
            self.fails -= 1
            raise OSError("the calibration data went away")
        return iter([images(seed=i) for i in range(3)])


def _four_bit_batches(w) -> int:
    return int(w.bn_stats["1"].num_batches_tracked[w._ctx.qbits.index(4)])


def test_step_does_not_advance_when_the_calibration_source_raises():
    w = trained()
    s = BACTSchedule(w, milestones=(1,), calib_loader=_FlakyLoader())
    snap = snapshot(w)
    with pytest.raises(OSError, match="went away"):
        s.step()
    assert (s.steps, s.stage, s.active_bits) == (0, 0, (32, 8))
    assert_unchanged(w, snap)
    # the retry joins the 4 bits and calibrates them on the loader's three batches
    assert s.step() == (4,)
    assert (s.steps, s.stage, w.active_bits) == (1, 1, BITS)
    assert _four_bit_batches(w) == 3


def test_step_does_not_advance_when_calibrate_refuses_the_batches():
    w = trained()
    loader = [images()]
    loader[0][0, 0, 0, 0] = NAN
    s = BACTSchedule(w, milestones=(1,), calib_loader=loader)
    snap = snapshot(w)
    with pytest.raises(TriQDefError):
        s.step()
    assert (s.steps, s.stage, s.active_bits) == (0, 0, (32, 8))
    assert_unchanged(w, snap)
    loader[:] = [images(seed=i) for i in range(3)]
    assert s.step() == (4,) and _four_bit_batches(w) == 3
    assert s.step() == ()  # later steps join nothing more
    assert s.state_dict() == {"steps": 2, "stage": 1, "stages": [[32, 8], [4]], "milestones": [1]}


def test_a_saved_file_gets_the_mode_open_would_give_it(tmp_path):
    # the atomic write goes through a private temporary file (mode 0600); the result must
    # still be readable as any file the user creates
    mask = os.umask(0o022)
    try:
        path = tmp_path / "w.safetensors"
        triqdef.save(trained(), path)
        assert path.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(mask)

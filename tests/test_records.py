"""Crafted but correctly sealed records: a seal only proves a file is as its writer sealed it, so every loader
(trp.load, `trp eval/decompose/report/export`, `--init`, `--resume`) checks every field against a schema
before building anything. A bad field is one line `trp: error:` naming the file (CLI) or a ValueError naming
the file and the field (API), never a traceback, and never an allocation sized by the record rather than by
the file's own tensors."""
import contextlib
import copy
import math
import os
import sys
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import trp
from cli_helpers import TINY, run_cli
from trp.app import checkpoint as ckpt
from trp.app import cli
from trp.app import train as train_mod
from trp.deploy import export
from trp.deploy import io as trp_io

# the largest tensor a loader may create: the data of the largest option (digits at 64 x 64: 88 MB) fits,
# a record's 1e10 classes or ranks (or 1e6: 0.5 GB) does not
ALLOCATION_LIMIT = 128 * 2 ** 20


class AllocationGuard(TorchDispatchMode):
    """Fails on any tensor (off the meta device) larger than ALLOCATION_LIMIT bytes created inside."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.numel() * t.element_size() > \
                    ALLOCATION_LIMIT:
                raise AssertionError(f"{func} created a tensor of {tuple(t.shape)}: an allocation sized by the record")
        return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A real checkpoint and a decomposed trp.save file (tiny), loaded: what the crafted records start from."""
    out = tmp_path_factory.mktemp("run")
    assert cli.main(["train", *TINY, "--epochs", "1", "--no-report", "--out", str(out)]) == 0
    saved = ckpt.load_checkpoint(out / "checkpoint.pt")
    dense = train_mod.model_from_checkpoint(saved)
    compact = trp.decompose(dense, "channel", energy=0.8)
    trp.save(compact, out / "model.pt")
    return Sources(checkpoint=saved, model=torch.load(out / "model.pt", weights_only=True))


class Sources(dict):
    def __repr__(self):  # hypothesis prints its arguments: not megabytes of weights
        return "Sources(checkpoint, model)"


def seal_model_file(payload, path):
    """Writes a trp.save payload sealed as trp.save seals it (whatever it holds)."""
    payload = dict(payload)
    try:
        trp_io.seal(payload)
    except Exception:  # a record too broken to seal: the loaders must still refuse it cleanly
        payload["sha256"] = "0" * 64
    torch.save(payload, path)


@contextlib.contextmanager
def light_commands():
    """The loaders run for real; the long work after loading (training, decomposition, the report, the ONNX
    export and its latency) is replaced, so that an example costs a fraction of a second."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(train_mod.Run, "fit", lambda self, *a: self)
        m.setattr(sys.modules["trp.deploy.decompose"], "decompose", lambda model, *a, **k: copy.deepcopy(model))
        m.setattr(train_mod, "final_report", lambda *a, **k: {})
        m.setattr(export, "export_onnx", lambda *a, **k: {"bytes": 0, "errors": {}})
        m.setattr(export, "compare_ort", lambda *a, **k: (1.0, 1.0))
        yield


CHECKPOINT_COMMANDS = {
    "eval": lambda p, t: ["eval", p],
    "decompose": lambda p, t: ["decompose", p, "-o", os.path.join(t, "o.pt")],
    "report": lambda p, t: ["report", p, "--out", os.path.join(t, "rep")],
    "export": lambda p, t: ["export", p, "-o", os.path.join(t, "m.onnx")],
    "resume": lambda p, t: ["train", "--resume", p, "--out", os.path.join(t, "res"), "--no-report", "--no-progress"],
    "init": lambda p, t: ["train", *TINY, "--init", p, "--out", os.path.join(t, "init"), "--no-report"],
}
MODEL_COMMANDS = {
    "eval": lambda p, t: ["eval", p, "--image-size", "8", "--subset", "16"],
    "export": lambda p, t: ["export", p, "-o", os.path.join(t, "m.onnx")],
    "init": lambda p, t: ["train", *TINY, "--init", p, "--out", os.path.join(t, "init"), "--no-report"],
}


def check_command(capsys, args, path):
    """The command either works or ends with one line `trp: error:` naming the file."""
    with light_commands(), AllocationGuard():
        code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    if code == 0:
        return
    assert code == 2 and err.count("\n") == 1 and err.startswith("trp: error: "), (args, err)
    assert str(path) in err, (args, err)


def check_load(path):
    """trp.load either works or raises a ValueError naming the file."""
    try:
        with AllocationGuard():
            trp.load(path)
    except ValueError as exc:
        assert str(path) in str(exc), str(exc)


# --- the cases, one by one -------------------------------------------------------------------------

def _set(path, value):
    def edit(record):
        *parents, last = path
        node = record
        for key in parents:
            node = node[key]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    return edit


DELETE = object()
NAN_WEIGHT = "layer1.0.conv1.weight"

CHECKPOINT_CASES = {  # edit, what the error names
    "config lacks keys": (_set(("config", "scheme"), DELETE), "config: lacks scheme"),
    "unknown arch keyword": (_set(("arch", "width"), 3), "'width'"),
    "1e10 classes": (_set(("arch", "num_classes"), 10 ** 10), "arch['num_classes']"),
    "epoch as a string": (_set(("epoch",), "1"), "epoch: must be an int"),
    "lr as a string": (_set(("config", "lr"), "0.1"), "config: --lr must be a finite number"),
    "inf in the config": (_set(("config", "momentum"), math.inf), "config: --momentum must be a finite number"),
    "huge image size": (_set(("config", "image_size"), 10 ** 10), "config: image size must be an int in [4, 64]"),
    "NaN weight": (lambda r: r["model"][NAN_WEIGHT].view(-1)[0].fill_(math.nan),
                   f"model['{NAN_WEIGHT}']: holds NaN or infinite values"),
    "NaN momentum": (lambda r: next(iter(r["optimizer"]["state"].values()))["momentum_buffer"].view(-1)[0]
                     .fill_(math.inf), "optimizer['state']"),
    "a list for the model": (_set(("model",), [1, 2]), "model: must be a dict of tensors"),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
@pytest.mark.parametrize("command", sorted(CHECKPOINT_COMMANDS))
def test_crafted_checkpoint_fields_are_named(case, command, sources, tmp_path, capsys):
    edit, expected = CHECKPOINT_CASES[case]
    if command == "init" and case == "unknown arch keyword":
        pytest.skip("--init takes the weights into the model the options build: the record's arch is not built")
    record = copy.deepcopy(sources["checkpoint"])
    edit(record)
    path = tmp_path / "crafted.pt"
    ckpt.save_checkpoint(record, path)  # sealed: intact as far as the seal can tell
    with light_commands(), AllocationGuard():
        code, _, err = run_cli(capsys, *CHECKPOINT_COMMANDS[command](path, tmp_path))
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"trp: error: "), err
    assert str(path) in err and expected in err, err
    assert sorted(os.listdir(tmp_path)) == ["crafted.pt"]  # nothing written


def _layer(payload):
    return next(iter(payload["layers"].values()))


MODEL_CASES = {
    "rank 1e10": (lambda p: _layer(p).update(rank=10 ** 10), "rank 10000000000 and sizes imply"),
    "a layer without rank": (lambda p: _layer(p).pop("rank"), "lacks 'rank'"),
    "stride 'x'": (lambda p: _layer(p).update(stride=["x", 1]), "['stride'][0]: must be an int"),
    "1e10 classes": (lambda p: p["arch"].update(num_classes=10 ** 10), "arch['num_classes']"),
    "unknown layer type": (lambda p: _layer(p).update(type="fancy"), "unknown type 'fancy'"),
    "another stride": (lambda p: _layer(p).update(stride=[2, 2]), "was saved from another architecture"),
    "stride 0": (lambda p: _layer(p).update(stride=[0, 1]), "['stride'][0]: must be an int >= 1, got 0"),
    "another dilation": (lambda p: _layer(p).update(dilation=[3, 1]), "was saved from another architecture"),
    "NaN weight": (lambda p: p["state_dict"]["fc.weight"].view(-1)[0].fill_(math.nan),
                   "state_dict['fc.weight']: holds NaN"),
    "string version": (lambda p: p["metadata"][""].update(version="1"), "metadata['']: must be a dict with an int"),
}


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_crafted_model_file_fields_are_named(case, sources, tmp_path, capsys):
    edit, expected = MODEL_CASES[case]
    payload = copy.deepcopy(sources["model"])
    edit(payload)
    path = tmp_path / "crafted.pt"
    seal_model_file(payload, path)
    with AllocationGuard(), pytest.raises(ValueError) as info:
        trp.load(path)
    assert str(path) in str(info.value) and expected in str(info.value), str(info.value)
    for name, command in MODEL_COMMANDS.items():
        with light_commands(), AllocationGuard():
            code, _, err = run_cli(capsys, *command(path, tmp_path))
        assert code == 2 and err.count("\n") == 1 and str(path) in err, err
        # --init takes the state_dict only: a decomposed file's weights never fit the dense model to train
        assert expected in err or (name == "init" and case.startswith("another")), err
    assert sorted(os.listdir(tmp_path)) == ["crafted.pt"]


def test_init_with_a_nan_state_dict_blames_the_file(tmp_path, capsys):
    state = trp.models.build("resnet20").state_dict()
    state["fc.bias"][0] = math.nan
    torch.save(state, tmp_path / "weights.pt")
    code, _, err = run_cli(capsys, "train", *TINY, "--init", tmp_path / "weights.pt", "--out", tmp_path / "run")
    assert code == 2 and f"--init {tmp_path / 'weights.pt'}: state_dict['fc.bias']: holds NaN" in err, err
    assert "training diverged" not in err and "--lr" not in err and not (tmp_path / "run").exists()


def test_older_checkpoints_without_the_newer_options_still_load(sources, tmp_path):
    record = copy.deepcopy(sources["checkpoint"])
    for name in ("nproc", "amp", "channels_last", "compile", "target_speedup", "deterministic"):
        del record["config"][name]
    ckpt.save_checkpoint(record, tmp_path / "old.pt")
    assert ckpt.load_checkpoint(tmp_path / "old.pt")["config"]["nproc"] == 1
    record["config"]["scheme"] = "channel"
    record["config"]["newer_option"] = 1
    ckpt.save_checkpoint(record, tmp_path / "newer.pt")
    with pytest.raises(ckpt.CheckpointError, match="has unknown options 'newer_option'"):
        ckpt.load_checkpoint(tmp_path / "newer.pt")


# --- property: any crafted record, every loader ---------------------------------------------------------------

def _paths(obj, prefix=(), depth=0):
    """Paths to the nodes of a record a crafter could change (not inside tensors; a few items per list)."""
    out = [prefix] if prefix else []
    if depth >= 5 or isinstance(obj, torch.Tensor):
        return out
    items = obj.items() if isinstance(obj, dict) else enumerate(obj[:3]) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        out += _paths(v, prefix + (k,), depth + 1)
    return out


TENSOR_EDITS = ("nan", "empty", "int64", "other shape")
BAD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 12), st.sampled_from([10 ** 10, 2 ** 63, -(10 ** 10), 10 ** 40]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4),
    st.lists(st.integers(-2, 10 ** 10), max_size=3),
    st.dictionaries(st.text(max_size=2), st.integers(0, 9), max_size=2),
    st.sampled_from(TENSOR_EDITS))


def _craft(record, path, value):
    """record with the node at `path` deleted (value None and the parent a dict, drawn as a separate case),
    or replaced: tensor edits act on the tensor that is there (or on a small one)."""
    record = copy.deepcopy(record)
    node = record
    for key in path[:-1]:
        node = node[key]
    last = path[-1]
    if value == "delete":
        if isinstance(node, dict):
            del node[last]
        else:
            node.pop(last) if isinstance(node, list) else None
        return record
    if value in TENSOR_EDITS:
        old = node[last] if isinstance(node[last], torch.Tensor) else torch.ones(3)
        value = {"nan": lambda: torch.full(old.shape, math.nan),
                 "empty": lambda: old.new_empty(0),
                 "int64": lambda: torch.ones(old.shape, dtype=torch.int64),
                 "other shape": lambda: torch.zeros(old.numel() + 1, dtype=old.dtype)}[value]()
    if isinstance(node, tuple):
        return record  # tuples (RNG states) are replaced as a whole through their parent's path
    node[last] = value
    return record


PROPERTY = settings(max_examples=20, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@PROPERTY
@given(data=st.data())
def test_any_crafted_checkpoint_is_refused_cleanly_by_every_loader(sources, capsys, data):
    record = sources["checkpoint"]
    path_ = data.draw(st.sampled_from(_paths(record)), label="field")
    value = data.draw(st.one_of(st.just("delete"), BAD_VALUES), label="value")
    command = data.draw(st.sampled_from(sorted(CHECKPOINT_COMMANDS)), label="loader")
    crafted = _craft(record, path_, value)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "crafted.pt")
        ckpt.save_checkpoint(crafted, path)
        check_command(capsys, CHECKPOINT_COMMANDS[command](path, tmp), path)


@PROPERTY
@given(data=st.data())
def test_any_crafted_model_file_is_refused_cleanly_by_every_loader(sources, capsys, data):
    payload = sources["model"]
    fields = [p for p in _paths(payload) if p[0] != "sha256" and not (p[0] == "state_dict" and len(p) > 1
                                                                       and not p[1].startswith(("fc", "layer1.0.")))]
    path_ = data.draw(st.sampled_from(fields), label="field")
    value = data.draw(st.one_of(st.just("delete"), BAD_VALUES), label="value")
    command = data.draw(st.sampled_from(["load"] + sorted(MODEL_COMMANDS)), label="loader")
    crafted = _craft(payload, path_, value)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "crafted.pt")
        seal_model_file(crafted, path)
        if command == "load":
            check_load(path)
        else:
            check_command(capsys, MODEL_COMMANDS[command](path, tmp), path)

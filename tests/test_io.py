"""trp.save / trp.load: round trip, architecture checks, damaged and missing files, atomic write."""
import copy
import datetime
import os

import pytest
import torch
import torch.nn as nn

import trp


@pytest.fixture(scope="module")
def decomposed():
    torch.manual_seed(0)
    dense = trp.models.build("resnet20", num_classes=7)
    return trp.decompose(dense, "channel", energy=0.6, layers=r"layer[12]\..*").eval()


def test_round_trip_rebuilds_from_recorded_arch(decomposed, tmp_path):
    path = tmp_path / "model.pt"
    trp.save(decomposed, path)
    loaded = trp.load(path).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), decomposed(x))
    assert repr(loaded) == repr(decomposed)
    assert loaded.trp_arch == decomposed.trp_arch
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left


def test_round_trip_onto_given_base_leaves_base_untouched(decomposed, tmp_path):
    path = tmp_path / "model.pt"
    trp.save(decomposed, path)
    base = trp.models.build("resnet20", num_classes=7)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    loaded = trp.load(path, base=base).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), decomposed(x))
    assert isinstance(base.layer1[0].conv1, torch.nn.Conv2d)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_spatial_and_dense_models_round_trip(tmp_path):
    dense = trp.models.build("resnet20").eval()
    spatial = trp.decompose(dense, "spatial", rank=3, layers=[r"layer3\.0\.conv1", r"layer1\.0\.conv2"]).eval()
    for model, name in ((dense, "dense.pt"), (spatial, "spatial.pt")):
        trp.save(model, tmp_path / name)
        loaded = trp.load(tmp_path / name).eval()
        x = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))


def test_other_architecture_is_a_clear_error(decomposed, tmp_path):
    path = tmp_path / "model.pt"
    trp.save(decomposed, path)
    with pytest.raises(ValueError, match="architecture"):
        trp.load(path, base=trp.models.build("resnet32", num_classes=7))
    other = trp.models.build("resnet32", num_classes=7)
    del other.trp_arch  # no record to compare: the layer shapes/state_dict must catch it
    with pytest.raises(ValueError, match="another architecture"):
        trp.load(path, base=other)
    wrong_width = trp.models.build("resnet20", num_classes=3)
    del wrong_width.trp_arch
    with pytest.raises(ValueError, match="does not match"):
        trp.load(path, base=wrong_width)
    with pytest.raises(ValueError, match="nn.Module"):
        trp.load(path, base="resnet20")


def test_unrecorded_arch_needs_base(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 3))
    compact = trp.decompose(model, "channel", rank=1, layers=["1"])
    trp.save(compact, tmp_path / "m.pt")
    with pytest.raises(ValueError, match="base="):
        trp.load(tmp_path / "m.pt")
    loaded = trp.load(tmp_path / "m.pt", base=model)
    x = torch.randn(1, 3, 9, 9)
    assert torch.equal(loaded(x), compact(x))


def test_damaged_and_missing_files(decomposed, tmp_path):
    path = tmp_path / "model.pt"
    trp.save(decomposed, path)
    data = path.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        trp.load(tmp_path / "truncated.pt")
    flipped = bytearray(data)
    middle = len(flipped) // 3
    flipped[middle:middle + 64] = bytes(64)
    (tmp_path / "flipped.pt").write_bytes(bytes(flipped))
    with pytest.raises(ValueError):
        trp.load(tmp_path / "flipped.pt")
    (tmp_path / "garbage.pt").write_bytes(os.urandom(256))
    with pytest.raises(ValueError, match="not a readable"):
        trp.load(tmp_path / "garbage.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a trp model file"):
        trp.load(tmp_path / "foreign.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        trp.load(tmp_path / "missing.pt")


def test_failed_save_keeps_previous_file(decomposed, tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    trp.save(decomposed, path)
    good = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        trp.save(decomposed, path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtype_is_kept(decomposed, dtype, tmp_path):
    model = copy.deepcopy(decomposed).to(dtype)
    trp.save(model, tmp_path / "m.pt")
    loaded = trp.load(tmp_path / "m.pt")
    for (k, v), (k2, w) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and v.dtype == w.dtype and torch.equal(v, w), k
    # onto a given base: the file's dtype, the base's device
    loaded = trp.load(tmp_path / "m.pt", base=trp.models.build("resnet20", num_classes=7))
    assert {p.dtype for p in loaded.parameters()} == {dtype}


def test_state_dict_metadata_is_kept(tmp_path):
    """torchvision's MNASNet reads the state_dict version from _metadata in _load_from_state_dict."""
    pytest.importorskip("torchvision")
    model = trp.models.build("torchvision:mnasnet0_5").eval()
    trp.save(model, tmp_path / "mnasnet.pt")
    payload = torch.load(tmp_path / "mnasnet.pt", weights_only=True)  # plain data, safe loading
    assert payload["metadata"][""]["version"] == 2
    loaded = trp.load(tmp_path / "mnasnet.pt")
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_model_files_of_the_first_format_still_load(decomposed, tmp_path):
    """Version 1 files (no metadata) carry a SHA-256 over (arch, layers) and the tensors: still verified."""
    from trp._utils.integrity import digest
    trp.save(decomposed, tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    del payload["metadata"]
    payload.update(version=1, sha256=digest((payload["arch"], payload["layers"]), payload["state_dict"]))
    torch.save(payload, tmp_path / "v1.pt")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(trp.load(tmp_path / "v1.pt").eval()(x), decomposed(x))
    payload["state_dict"]["fc.bias"][0] += 1
    torch.save(payload, tmp_path / "v1.pt")
    with pytest.raises(ValueError, match="corrupted"):
        trp.load(tmp_path / "v1.pt")


def test_directory_and_refused_objects_have_clear_messages(tmp_path):
    with pytest.raises(IsADirectoryError, match=f"{tmp_path} is a directory, not a file"):
        trp.load(tmp_path)

    torch.save({"format": "trp.model", "x": datetime.date(2024, 1, 1)}, tmp_path / "pickle.pt")
    with pytest.raises(ValueError, match="not a trp/torch checkpoint or holds disallowed objects") as info:
        trp.load(tmp_path / "pickle.pt")
    assert "weights_only" not in str(info.value) and "can still be loaded" not in str(info.value)


def _modes(model):
    return {n: m.training for n, m in model.named_modules()}


def _round_trip(model, path, input_size, **load_kwargs):
    """Saves `model`, loads it back and checks outputs, structure and every module's train/eval flag."""
    trp.save(model, path)
    loaded = trp.load(path, **load_kwargs)
    assert repr(loaded) == repr(model) and _modes(loaded) == _modes(model)
    x = torch.randn(2, *input_size)
    with torch.no_grad():
        torch.testing.assert_close(copy.deepcopy(loaded).eval()(x), copy.deepcopy(model).eval()(x), rtol=0, atol=0)
    return loaded


def test_torchvision_model_built_directly_loads_without_base(tmp_path):
    """No trp_arch: the builder (resnet18 among the ResNet builders) and num_classes are found by name and
    verified against the saved structure; the saved eval mode comes back (a layer left in train mode too)."""
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    dense = tv.models.resnet18(num_classes=7)
    compact = trp.decompose(dense, "channel", rank=4, layers=[r"layer1\..*conv2"]).eval()
    compact.layer2.train()
    loaded = _round_trip(compact, tmp_path / "r18.pt", (3, 32, 32))
    assert loaded.trp_arch == {"name": "torchvision:resnet18", "num_classes": 7, "in_channels": 3}
    assert not loaded.training and loaded.layer2.training and not loaded.layer1[0].conv2.training


def test_timm_model_loads_without_base(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    dense = timm.create_model("test_resnet", pretrained=False, num_classes=5).eval()
    compact = trp.decompose(dense, "channel", rank=3, layers=[nn.Conv2d], exclude=["conv1.0"]).eval()
    assert trp.factorized_layers(compact)
    loaded = _round_trip(compact, tmp_path / "timm.pt", (3, 32, 32))
    assert loaded.trp_arch == {"name": "timm:test_resnet", "num_classes": 5, "in_channels": 3}
    built = trp.models.build("timm:test_resnet", num_classes=4, in_channels=1).eval()
    assert built.trp_arch == {"name": "timm:test_resnet", "num_classes": 4, "in_channels": 1}
    _round_trip(built, tmp_path / "built.pt", (1, 32, 32))
    with pytest.raises(ValueError, match="unknown timm model 'no_such_net'"):
        trp.models.check_name("timm:no_such_net")


def test_torchvision_segmentation_builds_without_downloads(tmp_path):
    pytest.importorskip("torchvision")
    model = trp.models.build("torchvision:fcn_resnet50", num_classes=3).eval()
    assert model.aux_classifier is None
    _round_trip(model, tmp_path / "fcn.pt", (3, 32, 32))


class _MyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)
        self.b = nn.Conv2d(8, 8, 3)

    def forward(self, x):
        return self.b(self.a(x))


def test_other_models_need_base_and_say_so(tmp_path):
    """A user's class, and a torchvision model changed after it was built (no builder reproduces it exactly),
    are refused without base= by a message naming the class; with base= they load, modes included."""
    torch.manual_seed(0)
    mine = trp.decompose(_MyNet(), "channel", rank=2, layers=["b"]).eval()
    trp.save(mine, tmp_path / "mine.pt")
    with pytest.raises(ValueError, match=r"holds a test_io\._MyNet, .* pass the dense model as base=, "
                                         r"e\.g\. trp\.load\(path, base=_MyNet\(\.\.\.\)\)"):
        trp.load(tmp_path / "mine.pt")
    _round_trip(mine, tmp_path / "mine.pt", (3, 9, 9), base=_MyNet())

    tv = pytest.importorskip("torchvision")
    changed = tv.models.resnet18(num_classes=7)
    changed.fc = nn.Sequential(nn.Dropout(0.2), nn.Linear(512, 7))  # a head of the user's own
    trp.save(changed, tmp_path / "changed.pt")
    with pytest.raises(ValueError, match=r"holds a torchvision\.models\.resnet\.ResNet, .*base=ResNet\(\.\.\.\)"):
        trp.load(tmp_path / "changed.pt")
    base = tv.models.resnet18(num_classes=7)
    base.fc = nn.Sequential(nn.Dropout(0.2), nn.Linear(512, 7))
    _round_trip(changed.eval(), tmp_path / "changed.pt", (3, 32, 32), base=base)

    built = trp.models.build("resnet20", num_classes=7)
    built.fc = nn.Sequential(nn.Linear(64, 7))  # the record no longer describes the model
    with pytest.warns(UserWarning, match="differs from a fresh trp.models.build"):
        trp.save(built, tmp_path / "built.pt")
    with pytest.raises(ValueError, match="CifarResNet"):
        trp.load(tmp_path / "built.pt")


def test_saved_mode_round_trips(decomposed, tmp_path):
    """Eval, train and mixed modes come back as saved, with and without base (before: always train)."""
    for mode in ("eval", "train", "mixed"):
        model = copy.deepcopy(decomposed).train(mode == "train")
        if mode == "mixed":
            model.layer1.train()
        trp.save(model, tmp_path / "m.pt")
        for base in (None, trp.models.build("resnet20", num_classes=7).train(mode != "train")):
            assert _modes(trp.load(tmp_path / "m.pt", base=base)) == _modes(model), (mode, base is None)

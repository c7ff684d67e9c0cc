"""Official checkpoints into our models: both layouts, layer scale, mismatches, unsafe files,
and a training run that starts from them.

The "official" files are written here from our own models under the official key names (the
inverse of bldseg's mapping, written independently below): no official code is involved.
"""

import json
import zipfile

import numpy as np
import pytest
import torch

from bldseg.models import (
    create_backbone,
    create_model,
    load_pretrained,
    overrides_for_checkpoint,
    read_checkpoint,
)
from bldseg.train import engine
from bldseg.train.config import RunConfig

# Our name prefix -> mmseg's (EncoderDecoder with UPerHead + FCNHead(num_convs=1)).
OURS_TO_MMSEG = [
    ("decode_head.classifier.", "decode_head.conv_seg."),
    ("aux_head.conv.", "auxiliary_head.convs.0."),
    ("aux_head.classifier.", "auxiliary_head.conv_seg."),
]

# Keys every mmseg UPerNet checkpoint has (the tiny model's level count and pool scales).
MMSEG_KEYS = [
    "backbone.patch_embed.conv1.weight",
    "backbone.levels.0.blocks.0.dcn.offset.weight",
    "decode_head.conv_seg.weight",
    "decode_head.conv_seg.bias",
    "decode_head.psp_modules.0.1.conv.weight",
    "decode_head.psp_modules.3.1.bn.num_batches_tracked",
    "decode_head.bottleneck.conv.weight",
    "decode_head.lateral_convs.0.conv.weight",
    "decode_head.lateral_convs.2.bn.running_var",
    "decode_head.fpn_convs.2.conv.weight",
    "decode_head.fpn_bottleneck.bn.bias",
    "auxiliary_head.convs.0.conv.weight",
    "auxiliary_head.convs.0.bn.running_mean",
    "auxiliary_head.conv_seg.weight",
]

CLASSES = 150  # ADE20K


def to_mmseg(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        for ours, theirs in OURS_TO_MMSEG:
            if k.startswith(ours):
                k = theirs + k[len(ours) :]
                break
        out[k] = v
    return out


def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every tensor random (zero-init offsets, unit gammas and fresh BN stats would hide a
    tensor loaded into the wrong place)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                r = torch.rand(t.shape, generator=g)
                t.copy_(0.5 + r if name.endswith(("running_var", "gamma1", "gamma2")) else r - 0.5)
    return model


def assert_same_tensors(model: torch.nn.Module, expected: dict, skip=()) -> None:
    own = model.state_dict()
    for k, v in expected.items():
        if not k.startswith(skip):
            assert torch.equal(own[k], v), k


@pytest.fixture(scope="module")
def seg150():
    """A tiny UPerNet with ADE20K's 150 classes, every tensor random, in eval mode."""
    torch.manual_seed(0)
    return randomise(create_model("upernet_internimage_tiny", num_classes=CLASSES), 1).eval()


@pytest.fixture(scope="module")
def seg_file(seg150, tmp_path_factory):
    """seg150 as an mmseg checkpoint: mmseg names, under "state_dict", with a "meta"."""
    path = tmp_path_factory.mktemp("ckpt") / "upernet_internimage_tiny_512_160k_ade20k.pth"
    meta = {"mmseg_version": "0.27.0", "CLASSES": tuple(f"c{i}" for i in range(CLASSES))}
    torch.save({"state_dict": to_mmseg(seg150.state_dict()), "meta": meta}, path)
    return path


@pytest.fixture(scope="module")
def cls_model():
    torch.manual_seed(2)
    return randomise(create_backbone("internimage_tiny", num_classes=1000), 3).eval()


@pytest.fixture(scope="module")
def cls_file(cls_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "internimage_tiny_1k_224.pth"
    torch.save({"model": cls_model.state_dict()}, path)
    return path


def test_inverse_mapping_gives_the_official_names(seg150):
    keys = set(to_mmseg(seg150.state_dict()))
    for k in MMSEG_KEYS:
        assert k in keys, k
    assert not any(k.startswith(("aux_head.", "decode_head.classifier.")) for k in keys)


def test_segmentation_checkpoint_with_the_same_classes_gives_the_same_model(seg150, seg_file):
    model = create_model("upernet_internimage_tiny", num_classes=CLASSES, pretrained=seg_file)
    report = model.pretrained_report
    assert report.layout == "segmentation" and report.dropped == {} and report.initialised == []
    assert report.loaded == sorted(seg150.state_dict())
    assert_same_tensors(model, seg150.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), seg150(x), rtol=0, atol=0)


def test_segmentation_checkpoint_remakes_the_classifiers(seg150, seg_file):
    torch.manual_seed(5)
    model = create_model("upernet_internimage_tiny", pretrained=seg_file).eval()
    report = model.pretrained_report
    # dropped: the 150-class classifiers, named as in the file
    assert report.dropped == {
        "150-class classifiers, re-made for the model's 1": [
            "auxiliary_head.conv_seg.bias",
            "auxiliary_head.conv_seg.weight",
            "decode_head.conv_seg.bias",
            "decode_head.conv_seg.weight",
        ]
    }
    remade = ("decode_head.classifier.", "aux_head.classifier.")
    assert report.initialised == sorted(k for k in model.state_dict() if k.startswith(remade))
    # the outputs are those of a model given the same tensors by hand (our names)
    torch.manual_seed(6)
    by_hand = create_model("upernet_internimage_tiny").eval()
    own = model.state_dict()
    given = {k: v for k, v in seg150.state_dict().items() if not k.startswith(remade)}
    by_hand.load_state_dict({**given, **{k: own[k] for k in own if k.startswith(remade)}})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), by_hand(x), rtol=0, atol=0)


def test_segmentation_checkpoint_into_a_backbone(seg150, seg_file):
    backbone = create_backbone("internimage_tiny", pretrained=seg_file)
    why = "decoder (not part of a backbone)"
    assert list(backbone.pretrained_report.dropped) == [why]
    assert "decode_head.conv_seg.weight" in backbone.pretrained_report.dropped[why]
    expected = {k.removeprefix("backbone."): v for k, v in seg150.state_dict().items()}
    assert_same_tensors(backbone, {k: v for k, v in expected.items() if k in backbone.state_dict()})


def test_classification_checkpoint_loads_into_the_backbone(cls_model, cls_file):
    model = create_model("upernet_internimage_tiny", pretrained=cls_file).eval()
    report = model.pretrained_report
    assert report.layout == "classification"
    (why, dropped), *rest = report.dropped.items()
    assert not rest and why.startswith("ImageNet classifier")
    assert {k.split(".")[0] for k in dropped} == {"conv_head", "head"}
    assert len(dropped) == sum(
        k.startswith(("conv_head.", "head.")) for k in cls_model.state_dict()
    )
    assert report.initialised == sorted(
        k for k in model.state_dict() if not k.startswith("backbone.")
    )
    assert_same_tensors(model.backbone, cls_model.state_dict(), skip=("conv_head.", "head."))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(model.backbone(x), cls_model.forward_features(x), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the classifier itself loads into a backbone that has one
    clf = create_backbone("internimage_tiny", num_classes=1000, pretrained=cls_file)
    assert clf.pretrained_report.dropped == {}
    with torch.no_grad():
        torch.testing.assert_close(clf.eval()(x), cls_model(x), rtol=0, atol=0)


def test_a_safetensors_file_loads_as_its_torch_save(cls_model, tmp_path):
    # Hugging Face's hub keeps weights as .safetensors (OpenGVLab's port, every name under
    # "model."): refused as "not a PyTorch checkpoint" before
    from safetensors.torch import save_file

    sd = {f"model.{k}": v.contiguous() for k, v in cls_model.state_dict().items()}
    path = tmp_path / "model.safetensors"
    save_file(sd, path)
    model = create_model("upernet_internimage_tiny", pretrained=path).eval()
    assert model.pretrained_report.layout == "classification"
    assert_same_tensors(model.backbone, cls_model.state_dict(), skip=("conv_head.", "head."))
    # recognised by its bytes too (a file renamed .bin), and a damaged one is named
    renamed = tmp_path / "weights.bin"
    renamed.write_bytes(path.read_bytes())
    assert read_checkpoint(renamed).layout == "classification"
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"{cut} is not a readable safetensors file"):
        read_checkpoint(cut)
    # the bytes decide: a torch.save file named .safetensors loads, JSON text is no checkpoint
    misnamed = tmp_path / "torch.safetensors"
    torch.save({"model": cls_model.state_dict()}, misnamed)
    assert read_checkpoint(misnamed).layout == "classification"
    text = tmp_path / "cfg.json"
    text.write_text('{"cfg": {"a": 1}}')  # its 9th byte is "{" too
    with pytest.raises(ValueError, match=rf"{text} is not a PyTorch checkpoint"):
        read_checkpoint(text)


def test_t_segmentation_checkpoint_with_gammas_builds_t_with_layer_scale(tmp_path):
    # The official T segmentation config has layer_scale=1.0: gamma1/gamma2 in all 30 layers.
    torch.manual_seed(0)
    official = create_model("upernet_internimage_t", layer_scale=1.0, num_classes=CLASSES)
    sd = official.state_dict()
    gammas = [k for k in sd if k.endswith((".gamma1", ".gamma2"))]
    assert len(gammas) == (4 + 4 + 18 + 4) * 2 == 60
    with torch.no_grad():
        for k in gammas:
            sd[k].uniform_(0.5, 1.5)
    path = tmp_path / "upernet_internimage_t_512_160k_ade20k.pth"
    torch.save({"state_dict": to_mmseg(sd), "meta": {}}, path)
    del official
    model = create_model("upernet_internimage_t", pretrained=path)
    assert model.pretrained_report.overrides == {"layer_scale": 1.0}
    assert model.backbone.cfg.layer_scale == 1.0
    assert_same_tensors(model, sd, skip=("decode_head.classifier.", "aux_head.classifier."))
    assert overrides_for_checkpoint(sd) == {"layer_scale": 1.0}
    assert overrides_for_checkpoint(create_backbone("internimage_tiny").state_dict()) == {}


def test_t_from_the_classification_checkpoint_starts_its_layer_scales_at_one(tmp_path):
    # The official T segmentation fine-tuning: the classification T has no layer scale, the
    # segmentation config builds it with layer_scale=1.0, and the scales start at 1.
    torch.manual_seed(0)
    cls = randomise(create_backbone("internimage_t", num_classes=1000), 4).eval()
    path = tmp_path / "internimage_t_1k_224.pth"
    torch.save({"model": cls.state_dict()}, path)
    model = create_model("upernet_internimage_t", pretrained=path).eval()
    report = model.pretrained_report
    gammas = [k for k in model.state_dict() if k.endswith((".gamma1", ".gamma2"))]
    assert len(gammas) == 60 and model.backbone.cfg.layer_scale == 1.0
    assert set(gammas) <= set(report.initialised) and not set(gammas) & set(report.loaded)
    assert all(
        torch.equal(model.state_dict()[k], torch.ones_like(model.state_dict()[k])) for k in gammas
    )
    assert_same_tensors(model.backbone, cls.state_dict(), skip=("conv_head.", "head."))
    # scales of 1: the backbone computes what the classification checkpoint's did
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for a, b in zip(model.backbone(x), cls.forward_features(x), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # any other init value would change the blocks: those gammas are missing, as before
    with pytest.raises(RuntimeError, match="missing from the checkpoint"):
        create_model("upernet_internimage_t", layer_scale=1e-5, pretrained=path)


def test_a_t_run_saved_without_layer_scale_is_rebuilt_without_it(tmp_path):
    # T runs trained before upernet_internimage_t had layer scale: predict and resume rebuild
    # the model their weights describe.
    torch.manual_seed(0)
    old = create_model("upernet_internimage_t", layer_scale=None)
    assert not any(k.endswith(".gamma1") for k in old.state_dict())
    overrides = overrides_for_checkpoint(old.state_dict())
    assert overrides == {"layer_scale": None}
    create_model("upernet_internimage_t", **overrides).load_state_dict(old.state_dict())
    # into a model built today, the message says which it is and what to do, not that the
    # decoder differs (its backbone "fit" once built without layer scale)
    path = tmp_path / "old_t_best.pt"
    torch.save({"model": old.state_dict(), "config": {}}, path)
    with pytest.raises(RuntimeError) as e:
        load_pretrained(create_model("upernet_internimage_t"), path)
    msg = str(e.value)
    assert "saved before upernet_internimage_t had layer scale" in msg
    assert "decoder differs" not in msg
    assert overrides_for_checkpoint(create_model("upernet_internimage_t").state_dict()) == {
        "layer_scale": 1.0
    }


def test_gammas_into_a_model_without_layer_scale_say_what_to_do(tmp_path):
    sd = create_model("upernet_internimage_tiny", layer_scale=1.0).state_dict()
    path = tmp_path / "gammas.pth"
    torch.save({"state_dict": to_mmseg(sd)}, path)
    with pytest.raises(RuntimeError) as e:
        load_pretrained(create_model("upernet_internimage_tiny"), path)
    msg = str(e.value)
    assert "unexpected in the checkpoint (10)" in msg  # 5 layers x 2
    assert "backbone.levels.2.blocks.1.gamma2" in msg and "layer_scale=1.0" in msg


def test_a_decoder_built_otherwise_is_named_when_the_backbone_fits(tmp_path):
    # A head width other than the file's: the message asked "Is it a checkpoint of the same
    # variant?", which it is
    sd = create_model("upernet_internimage_tiny", head_channels=64).state_dict()
    path = tmp_path / "wide_head.pth"
    torch.save({"state_dict": to_mmseg(sd)}, path)
    with pytest.raises(RuntimeError) as e:
        load_pretrained(create_model("upernet_internimage_tiny"), path)
    msg = str(e.value)
    assert "The backbone fits upernet_internimage_tiny; its decoder differs" in msg
    assert "same variant" not in msg
    model = create_model("upernet_internimage_tiny")
    report = load_pretrained(model.backbone, path)  # what it says to do works
    assert_same_tensors(model, sd, skip=("decode_head.", "aux_head."))
    assert report.dropped


def test_mismatch_lists_every_bad_key_grouped(cls_model, tmp_path):
    state = dict(cls_model.state_dict())
    missing = ["levels.1.blocks.0.mlp.fc1.bias", "levels.3.blocks.0.dcn.mask.weight"]
    for k in missing:
        state.pop(k)
    state["extra.weight"] = torch.zeros(1)
    state["levels.9.norm.0.bias"] = torch.zeros(1)
    state["levels.0.blocks.0.dcn.offset.weight"] = torch.zeros(3, 3)
    state["patch_embed.conv1.bias"] = torch.zeros(5)
    path = tmp_path / "bad.pth"
    torch.save(state, path)  # a bare state dict
    with pytest.raises(RuntimeError) as e:
        create_model("upernet_internimage_tiny", pretrained=path)
    msg = str(e.value)
    assert "2 missing, 2 unexpected, 2 of another shape" in msg
    assert "missing from the checkpoint (2):\n    " + "\n    ".join(missing) in msg
    assert "unexpected in the checkpoint (2):\n    extra.weight\n    levels.9.norm.0.bias" in msg
    assert "levels.0.blocks.0.dcn.offset.weight: checkpoint (3, 3) vs model (18, 16)" in msg
    assert "patch_embed.conv1.bias: checkpoint (5,) vs model (8,)" in msg


def test_segmentation_mismatch_names_keys_as_in_the_file(seg150, tmp_path):
    sd = to_mmseg(seg150.state_dict())
    sd["auxiliary_head.convs.0.conv.weight"] = torch.zeros(2, 2)
    sd.pop("decode_head.fpn_bottleneck.bn.running_mean")
    path = tmp_path / "bad_seg.pth"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(RuntimeError) as e:
        create_model("upernet_internimage_tiny", num_classes=CLASSES, pretrained=path)
    msg = str(e.value)
    assert "decode_head.fpn_bottleneck.bn.running_mean" in msg
    assert "auxiliary_head.convs.0.conv.weight: checkpoint (2, 2)" in msg


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.pth.*never downloads"):
        create_model("upernet_internimage_tiny", pretrained=tmp_path / "nope.pth")
    text = tmp_path / "notes.pth"
    # text the unpickler fails on in three ways: UnpicklingError, KeyError (a memo id: "KeyError:
    # 174812789" was the message) and IndexError (a traceback)
    for words in ("not a checkpoint", "junk\n", "this is junk\n"):
        text.write_text(words)
        with pytest.raises(ValueError, match="is not a PyTorch checkpoint") as e:
            read_checkpoint(text)
        assert "Error" not in str(e.value), words
    torch.save({"epoch": 3}, tmp_path / "no_weights.pth")
    with pytest.raises(ValueError, match=r"holds no state dict.*found \['epoch'\]"):
        read_checkpoint(tmp_path / "no_weights.pth")
    # zero bytes read as torch's legacy format: its advice to load with weights_only=False
    # (which runs the file's code) is not passed on
    (tmp_path / "zeros.pth").write_bytes(bytes(1000))
    with pytest.raises(ValueError, match="is not a PyTorch checkpoint") as e:
        read_checkpoint(tmp_path / "zeros.pth")
    assert "weights_only` set to `False`" not in str(e.value)


def test_a_checkpoint_damaged_inside_a_tensor_is_refused(cls_model, cls_file, tmp_path):
    # torch.load does not check the archive's checksums: the damaged tensor loaded silently
    data = bytearray(cls_file.read_bytes())
    sd = cls_model.state_dict()
    name = "levels.3.blocks.0.mlp.fc1.weight"
    raw = sd[name].numpy().tobytes()
    at = bytes(data).find(raw[:64])  # the tensor's stored bytes (uncompressed in the archive)
    assert at > 0
    data[at + 100 : at + 164] = bytes(b ^ 0x5A for b in data[at + 100 : at + 164])
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"damaged\.pth is damaged: the checksum of its member"):
        read_checkpoint(damaged)
    assert len(read_checkpoint(cls_file).state_dict) == len(sd)  # the intact file passes


class _Payload:
    """Unpickling this creates a file: the proof that code from the checkpoint ran."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_a_checkpoint_with_pickled_objects_is_refused_unrun(cls_model, tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.pth"
    torch.save({"model": cls_model.state_dict(), "x": _Payload(marker)}, path)
    with pytest.raises(ValueError, match="refusing") as e:
        create_model("upernet_internimage_tiny", pretrained=path)
    assert "io.open" in str(e.value) and "weights_only=False" in str(e.value)
    assert not marker.exists()
    # an object array may not smuggle one in either
    payload = np.array([_Payload(marker)], dtype=object)
    torch.save({"state_dict": {}, "meta": {"x": payload}}, tmp_path / "np.pth")
    with pytest.raises(ValueError, match="refusing") as e:
        read_checkpoint(tmp_path / "np.pth")
    assert "'state_dict'" in str(e.value) and not marker.exists()


def test_numpy_numbers_in_mmseg_meta_are_read(seg150, tmp_path):
    # mmseg's meta holds numpy numbers (hook_msgs.best_score, iter); numpy 1 named their
    # module numpy.core, numpy 2 numpy._core: a file of either loads.
    meta = {"hook_msgs": {"best_score": np.float64(0.47)}, "iter": np.int64(160000)}
    meta["palette"] = np.arange(6, dtype=np.uint8).reshape(2, 3)
    path = tmp_path / "np2.pth"
    torch.save({"state_dict": to_mmseg(seg150.state_dict()), "meta": meta}, path)
    old = tmp_path / "np1.pth"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(old, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            dst.writestr(item, data)
    for f in (path, old):
        ckpt = read_checkpoint(f)
        assert ckpt.layout == "segmentation" and len(ckpt.state_dict) == len(seg150.state_dict())


def test_fit_starts_both_networks_from_the_checkpoint(
    seg150, seg_file, small_world, tmp_path, monkeypatch
):
    cfg = RunConfig.from_flat(
        {
            "pretrained": str(seg_file),
            "epochs": 1,
            "aug.crop_size": 64,
            "batch_size": 8,
            "samples_per_epoch": 16,
            "val_fraction": 0.25,
            "coteach.enabled": True,
        }
    )
    at_start = []
    real = engine.build_optimizer

    def spy(model, cfg, total_steps):  # called once per network, before any step
        at_start.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real(model, cfg, total_steps)

    monkeypatch.setattr(engine, "build_optimizer", spy)
    result = engine.fit(cfg, tmp_path, data=small_world, resume=False)
    assert result.status == "completed" and len(at_start) == 2
    remade = ("decode_head.classifier.", "aux_head.classifier.")
    expected = {k: v for k, v in seg150.state_dict().items() if not k.startswith(remade)}
    for state in at_start:
        for k, v in expected.items():
            assert torch.equal(state[k], v), k
    # the two networks differ only where the checkpoint gave nothing: their own seeds
    assert not torch.equal(
        at_start[0]["decode_head.classifier.weight"], at_start[1]["decode_head.classifier.weight"]
    )
    record = json.loads((tmp_path / "pretrained.json").read_text())
    assert record["path"] == str(seg_file) and record["networks"] == 2
    assert "decode_head.conv_seg.weight" in next(iter(record["dropped"].values()))
    assert len(record["loaded"]) == len(expected)


def test_a_tiny_run_as_pretrained_reports_no_architecture_override(tmp_path):
    # "built with {'layer_scale': None}" was logged for a model that never has layer scale
    path = tmp_path / "best.pt"
    torch.save({"model": create_model("upernet_internimage_tiny").state_dict()}, path)
    model = create_model("upernet_internimage_tiny", pretrained=path)
    assert model.pretrained_report.overrides == {}
    assert "built with" not in model.pretrained_report.summary()

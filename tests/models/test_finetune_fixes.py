"""Fine-tuning from official weights: what a file that does not fit says, our older run files
as --pretrained, the file's names in messages, and the epoch lines of ``bldseg train``.

Checkpoints are made here from our own models with the official layouts (tiny shapes, and one
real InternImage-T classification file, 0.4 s to build).
"""

import hashlib
import json
import re

import pytest
import torch

from bldseg.commands import train as train_cmd
from bldseg.models import create_backbone, create_model, read_checkpoint
from bldseg.models.pretrained import CheckpointMismatchError, file_fingerprint
from tests.models.test_pretrained import to_mmseg


@pytest.fixture(scope="module")
def t_classifier(tmp_path_factory):
    """An official-layout InternImage-T ImageNet checkpoint ({"model": state_dict})."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "internimage_t_1k_224.pth"
    torch.save({"model": create_backbone("internimage_t", num_classes=1000).state_dict()}, path)
    return path


def test_a_file_of_another_variant_is_a_value_error_naming_both_models(t_classifier):
    # The CPU default model is upernet_internimage_tiny: official T weights without --model.
    with pytest.raises(ValueError) as e:
        create_model("upernet_internimage_tiny", pretrained=t_classifier)
    assert isinstance(e.value, CheckpointMismatchError)
    assert isinstance(e.value, RuntimeError)  # what callers caught before
    first, *rest = str(e.value).splitlines()
    assert "does not fit the backbone of upernet_internimage_tiny" in first
    assert "--model upernet_internimage_t)" in first
    assert "SegmentationModel" not in str(e.value)
    assert rest[-1].startswith(
        "The file is for upernet_internimage_t, not upernet_internimage_tiny"
    )
    # into a backbone, the backbone's name
    with pytest.raises(CheckpointMismatchError, match=r"create_backbone\('internimage_t'\)"):
        create_backbone("internimage_tiny", pretrained=t_classifier)


def test_a_file_that_fits_no_variant_names_none(tmp_path):
    sd = create_backbone("internimage_tiny", num_classes=1000).state_dict()
    sd.pop("levels.0.blocks.0.dcn.offset.weight")
    torch.save({"model": sd}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError) as e:
        create_model("upernet_internimage_tiny", pretrained=tmp_path / "bad.pth")
    msg = str(e.value)
    assert "--model" not in msg and "same variant (t, s or b)" in msg.splitlines()[-1]


def test_missing_keys_are_named_as_in_the_file(tmp_path):
    model = create_model("upernet_internimage_tiny", num_classes=150)
    sd = to_mmseg(model.state_dict())
    for k in ("auxiliary_head.conv_seg.weight", "backbone.levels.0.blocks.0.dcn.offset.bias"):
        sd.pop(k)
    torch.save({"state_dict": sd}, tmp_path / "seg.pth")
    with pytest.raises(CheckpointMismatchError) as e:
        create_model("upernet_internimage_tiny", num_classes=150, pretrained=tmp_path / "seg.pth")
    missing = "missing from the checkpoint (2):\n    auxiliary_head.conv_seg.weight\n    "
    assert missing + "backbone.levels.0.blocks.0.dcn.offset.bias\n" in str(e.value)
    assert "aux_head.classifier" not in str(e.value)
    # a backbone given a segmentation file: the key with its backbone. prefix
    with pytest.raises(CheckpointMismatchError) as e:
        create_backbone("internimage_tiny", pretrained=tmp_path / "seg.pth")
    assert "\n    backbone.levels.0.blocks.0.dcn.offset.bias\n" in str(e.value)
    # a file saved from a DistributedDataParallel wrapper: every name with its module. prefix
    cls = create_backbone("internimage_tiny", num_classes=1000).state_dict()
    ddp = {f"module.{k}": v for k, v in cls.items() if k != "levels.1.norm.0.bias"}
    ddp["module.extra.weight"] = torch.zeros(1)
    torch.save({"model": ddp}, tmp_path / "ddp.pth")
    with pytest.raises(CheckpointMismatchError) as e:
        create_model("upernet_internimage_tiny", pretrained=tmp_path / "ddp.pth")
    assert "missing from the checkpoint (1):\n    module.levels.1.norm.0.bias\n" in str(e.value)
    assert "unexpected in the checkpoint (1):\n    module.extra.weight\n" in str(e.value)


def test_the_hugging_face_port_loads(tmp_path):
    # OpenGVLab's Hugging Face port keeps the InternImage as InternImageModel.model: a bare
    # state dict whose every name starts with "model." failed with every key missing and
    # unexpected, ending "Is it a checkpoint of the same variant?"
    torch.manual_seed(0)
    cls = create_backbone("internimage_tiny", num_classes=1000).state_dict()
    torch.save({f"model.{k}": v for k, v in cls.items()}, tmp_path / "pytorch_model.bin")
    model = create_model("upernet_internimage_tiny", pretrained=tmp_path / "pytorch_model.bin")
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, cls[k]), k
    # names in messages are the file's: a missing key with its model. prefix
    torch.save(
        {f"model.{k}": v for k, v in cls.items() if k != "levels.1.norm.0.bias"},
        tmp_path / "short.bin",
    )
    with pytest.raises(CheckpointMismatchError) as e:
        create_model("upernet_internimage_tiny", pretrained=tmp_path / "short.bin")
    assert "missing from the checkpoint (1):\n    model.levels.1.norm.0.bias\n" in str(e.value)


def _legacy(key: str) -> str:
    """Our decoder's names before the mmseg ones: ppm.stages.*, numbered ConvBNReLU parts."""
    if key.startswith("backbone."):
        return key
    key = key.replace("psp_modules.", "ppm.stages.")
    return re.sub(r"\.conv\.(weight)$", r".0.\1", re.sub(r"\.bn\.", ".1.", key))


def test_our_older_best_pt_loads_as_pretrained(tmp_path):
    torch.manual_seed(0)
    old_model = create_model("upernet_internimage_tiny")
    old = {_legacy(k): v for k, v in old_model.state_dict().items()}
    assert any(k.startswith("decode_head.ppm.stages.") for k in old)
    assert "decode_head.bottleneck.1.running_mean" in old
    path = tmp_path / "best.pt"
    torch.save({"config": {"model": "upernet_internimage_tiny"}, "model": old, "epoch": 3}, path)
    model = create_model("upernet_internimage_tiny", pretrained=path)
    report = model.pretrained_report
    assert report.layout == "segmentation" and report.dropped == {} and report.initialised == []
    assert report.loaded == sorted(old_model.state_dict())
    for k, v in old_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    # a 150-class old file: the dropped classifiers are named as in the file
    torch.manual_seed(1)
    wide = create_model("upernet_internimage_tiny", num_classes=150).state_dict()
    torch.save({"model": {_legacy(k): v for k, v in wide.items()}}, tmp_path / "wide.pt")
    dropped = create_model("upernet_internimage_tiny", pretrained=tmp_path / "wide.pt")
    (names,) = dropped.pretrained_report.dropped.values()
    assert "decode_head.classifier.weight" in names


def test_file_fingerprint(tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(b"x" * 3_000_000)  # more than one read block
    want = {"size": 3_000_000, "sha256": hashlib.sha256(b"x" * 3_000_000).hexdigest()}
    assert file_fingerprint(path) == want


def test_read_checkpoint_records_the_file_convention(tmp_path):
    sd = to_mmseg(create_model("upernet_internimage_tiny").state_dict())
    torch.save({"state_dict": sd}, tmp_path / "mm.pth")
    ckpt = read_checkpoint(tmp_path / "mm.pth")
    assert ckpt.mmseg_names and ckpt.prefix == ""
    assert ckpt.name_in_file("aux_head.conv.conv.weight") == "auxiliary_head.convs.0.conv.weight"
    # our own names (a best.pt): kept as they are
    ours = create_model("upernet_internimage_tiny").state_dict()
    torch.save(ours, tmp_path / "ours.pth")
    assert read_checkpoint(tmp_path / "ours.pth").name_in_file("aux_head.classifier.bias") == (
        "aux_head.classifier.bias"
    )


def test_train_refuses_another_variants_file_in_one_message_before_writing(
    small_world, t_classifier, tmp_path, capsys
):
    out = tmp_path / "run"
    argv = ["--data", str(small_world.root), "--data-root", str(tmp_path / "work")]
    code = train_cmd.main([*argv, "--out", str(out), "--pretrained", str(t_classifier)])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    # after the data's progress bar: the message, without a traceback
    first = err[err.index("\nerror: ") + 1 :].splitlines()[0]
    assert "does not fit the backbone of upernet_internimage_tiny" in first
    assert "(--model upernet_internimage_t)" in first
    assert not out.exists()  # nothing written: not even augmentation.json


def test_epoch_lines_keep_small_learning_rates():
    row = {"epoch": 1, "lr": 6e-05, "warm_lr": 6e-08, "train_loss": 0.978712, "val_net": "f"}
    line = json.loads(train_cmd.epoch_line(row))
    assert line == {"epoch": 1, "lr": 6e-05, "warm_lr": 6e-08, "train_loss": 0.9787, "val_net": "f"}


def test_epoch_lines_print_thresholds_that_type_back_to_their_level():
    # 109/255 = 0.42745 printed 0.4275 (4 significant digits, rounded), level 110 typed back;
    # the run's summary line says 0.4274
    from bldseg import metrics

    row = {"epoch": 1, "val_thr_best": 109 / 255, "val_thr_widened": 1.0, "val_dice_best": 0.5}
    line = json.loads(train_cmd.epoch_line(row))
    assert line == {
        "epoch": 1,
        "val_thr_best": 0.4274,
        "val_thr_widened": 1.0,
        "val_dice_best": 0.5,
    }
    assert metrics.level_from_threshold(line["val_thr_best"]) == 109

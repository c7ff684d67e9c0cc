"""smp models as bldseg segmentation models: names, output contract, training, reloading,
encoder weights from disk and a model search space."""

import importlib
import json

import pytest
import torch

pytest.importorskip("segmentation_models_pytorch")

import optuna
import timm

from bldseg.models import create_model, list_models, registry
from bldseg.models.smp import (
    ARCHS,
    ENCODERS,
    SmpSegmentor,
    load_smp_pretrained,
    register_smp_model,
    smp_model,
)
from bldseg.predict import load_checkpoint
from bldseg.train.config import RunConfig
from bldseg.train.engine import fit
from bldseg.tune.cli import CPU_DEMO
from bldseg.tune.runner import get_space, validate_space

# The module, not the package's `models` (which is the module's space function).
models_space = importlib.import_module("bldseg.tune_spaces.models")

TINY = ["smp_unet_tiny", "smp_upernet_tiny", "smp_fpn_tiny"]


def test_every_decoder_encoder_pair_is_registered_and_a_valid_run_config_model():
    names = [f"smp_{a}_{e}" for a in ARCHS for e in ENCODERS] + TINY
    assert len(names) == 27 and set(names) <= set(list_models())
    for name in names:
        assert RunConfig(model=name).model == name


def test_the_factory_names_any_pair(monkeypatch):
    # A copy of the registry: the name registered here is gone after the test.
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))
    model = smp_model("FPN", "tu-test_convnext", decoder_segmentation_channels=32)
    assert isinstance(model, SmpSegmentor) and (model.arch, model.stride) == ("FPN", 32)
    name = register_smp_model("Linknet", "tu-test_resnet")
    assert name == "smp_linknet_test_resnet" and RunConfig(model=name).model == name
    assert create_model(name).eval()(torch.zeros(1, 3, 40, 40)).shape == (1, 1, 40, 40)
    with pytest.raises(ValueError, match="registered twice"):
        register_smp_model("Linknet", "tu-test_resnet")


@pytest.mark.parametrize(
    "name",
    [
        *TINY,
        "smp_unet_resnet18",
        "smp_upernet_convnext_atto",
        "smp_fpn_mobilenetv3_small",
        "smp_unet_mobilenetv3_small_075_narrow",
    ],
)
def test_logits_have_the_input_size_in_train_and_eval(name):
    torch.manual_seed(0)
    # The keywords every run config passes (RunConfig.model_kwargs) are accepted.
    model = create_model(name, impl="auto", with_cp=False).eval()
    # predict's 224 tiles and arbitrary windows: 100 and 50x70 are no multiple of 32.
    sizes = [(64, 64), (50, 70), (100, 100), (224, 224)] if name in TINY else [(100, 100)]
    for size in sizes:
        with torch.no_grad():
            out = model(torch.randn(1, 3, *size))
        assert isinstance(out, torch.Tensor) and out.shape == (1, 1, *size)
    model.train()
    out = model(torch.randn(2, 3, 50, 70))  # no auxiliary head: a tensor in training too
    assert isinstance(out, torch.Tensor) and out.shape == (2, 1, 50, 70)
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", TINY)
def test_padding_does_not_leak_into_the_kept_pixels(name):
    # Zero padding to a multiple of 32 is cropped off: a 100x100 input equals the top-left of
    # the same input padded by hand to 128x128.
    torch.manual_seed(0)
    model = create_model(name).eval()
    x = torch.randn(1, 3, 100, 100)
    with torch.no_grad():
        small = model(x)
        padded = model(torch.nn.functional.pad(x, (0, 28, 0, 28)))
    torch.testing.assert_close(small, padded[..., :100, :100])


def test_random_init_and_the_run_config_keywords():
    model = create_model("smp_upernet_resnet18")
    assert isinstance(model, SmpSegmentor) and model.encoder_name == "resnet18"
    # timm encoders take stochastic depth and activation checkpointing ...
    timm_model = create_model("smp_fpn_convnext_atto", drop_path_rate=0.1, with_cp=True)
    timm_model.train()
    timm_model(torch.randn(2, 3, 64, 64)).mean().backward()
    # ... smp's own encoders refuse them instead of silently ignoring them.
    with pytest.raises(ValueError, match="no stochastic depth"):
        create_model("smp_unet_resnet18", drop_path_rate=0.1)
    with pytest.raises(ValueError, match="with_cp=True"):
        create_model("smp_fpn_resnet18", with_cp=True)
    create_model("smp_unet_resnet18", drop_path_rate=0.0, impl="reference")  # no-ops


def _save_timm(name: str, path, seed: int = 1) -> dict[str, torch.Tensor]:
    """A randomly initialised timm model's state dict (its classifier included), on disk."""
    torch.manual_seed(seed)
    sd = timm.create_model(name, pretrained=False).state_dict()
    torch.save(sd, path)
    return sd


@pytest.mark.parametrize("arch", ["unet", "upernet", "fpn"])
def test_one_epoch_fit_and_reload(arch, small_world, tmp_path):
    name = f"smp_{arch}_tiny"
    flat = {
        "model": name,
        "epochs": 1,
        "aug.crop_size": 64,
        "batch_size": 8,  # 32 samples in 4 full batches: UPerNet cannot train on one image
        "samples_per_epoch": 32,
        "val_fraction": 0.25,
        "optim.lr": 3e-3,
    }
    if arch == "upernet":  # fine-tuning from a user's encoder weights goes through fit too
        flat["pretrained"] = str(tmp_path / "test_resnet.pth")
        _save_timm("test_resnet", flat["pretrained"])
    result = fit(RunConfig.from_flat(flat), tmp_path / "run", data=small_world, resume=False)
    assert result.status == "completed" and len(result.history) == 1
    assert 0.0 <= result.best["val_dice_best"] <= 1.0
    if arch == "upernet":
        report = json.loads((tmp_path / "run" / "pretrained.json").read_text())
        assert report["layout"] == "encoder" and report["dropped"]  # the classifier, fc.*

    best = tmp_path / "run" / "best.pt"
    model, loaded_cfg, metrics = load_checkpoint(best)
    assert isinstance(model, SmpSegmentor) and not model.training
    assert loaded_cfg.model == name and metrics["epoch"] == 1
    # The same weights reach the model by load_checkpoint and by pretrained=best.pt (a whole
    # bldseg checkpoint): identical logits on a window that is no multiple of 32.
    again = create_model(name, pretrained=best).eval()
    assert again.pretrained_report.layout == "bldseg" and not again.pretrained_report.initialised
    x = torch.randn(2, 3, 100, 100)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 1, 100, 100)
        torch.testing.assert_close(again(x), out, rtol=0, atol=0)


def test_pretrained_timm_encoder_weights_are_loaded_exactly(tmp_path):
    sd = _save_timm("test_resnet", tmp_path / "w.pth")
    torch.manual_seed(0)
    model = create_model("smp_fpn_tiny", pretrained=tmp_path / "w.pth")
    own = model.state_dict()
    for k, v in sd.items():
        if not k.startswith("fc."):  # the classifier is not part of the encoder
            assert torch.equal(own[f"net.encoder.model.{k}"], v), k
    report = model.pretrained_report
    assert report.layout == "encoder" and sorted(report.dropped.popitem()[1]) == [
        "fc.bias",
        "fc.weight",
    ]
    assert report.initialised and all(not k.startswith("net.encoder.") for k in report.initialised)


def test_pretrained_timm_names_of_flattened_stages(tmp_path):
    # timm's feature model renames stages.0 -> stages_0 (ConvNeXt-style encoders): the file
    # keeps the whole model's names and still loads, its head dropped.
    sd = _save_timm("test_convnext", tmp_path / "w.pth")
    model = smp_model("UPerNet", "tu-test_convnext", decoder_channels=32)
    report = load_smp_pretrained(model, tmp_path / "w.pth")
    own = model.state_dict()
    renamed = "net.encoder.model.stages_0.blocks.0.conv_dw.weight"
    assert torch.equal(own[renamed], sd["stages.0.blocks.0.conv_dw.weight"])
    assert len(report.loaded) == len(model.net.encoder.state_dict())
    assert all(k.startswith("head.") for k in next(iter(report.dropped.values())))
    # smp's encoder's own names (as model.net.encoder.state_dict() saves them) load as well,
    # bare or with the "encoder." prefix of an smp model.
    enc = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in own.items()}
    enc = {k.removeprefix("net."): v for k, v in enc.items() if k.startswith("net.encoder.")}
    torch.save(enc, tmp_path / "enc.pth")
    load_smp_pretrained(model, tmp_path / "enc.pth")
    reloaded = model.state_dict()[renamed]
    assert torch.equal(reloaded, enc["encoder.model.stages_0.blocks.0.conv_dw.weight"])


def test_pretrained_torchvision_resnet_and_whole_smp_model(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(2)
    sd = torchvision.models.resnet18(weights=None).state_dict()
    torch.save({"state_dict": sd}, tmp_path / "tv.pth")
    model = create_model("smp_unet_resnet18", pretrained=tmp_path / "tv.pth")
    own = model.state_dict()
    assert all(torch.equal(own[f"net.encoder.{k}"], v) for k, v in sd.items() if "fc." not in k)
    # An smp model's own state_dict is a whole model: nothing keeps its init.
    torch.save(model.net.state_dict(), tmp_path / "smp.pth")
    again = create_model("smp_unet_resnet18", pretrained=tmp_path / "smp.pth")
    assert again.pretrained_report.layout == "smp" and not again.pretrained_report.initialised
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_mismatched_weights_name_the_file_and_keys(tmp_path):
    path = tmp_path / "convnext.pth"
    _save_timm("test_convnext", path)
    with pytest.raises(RuntimeError) as err:
        create_model("smp_fpn_tiny", pretrained=path)  # a ConvNeXt for a ResNet encoder
    msg = str(err.value)
    assert str(path) in msg and "read as encoder weights" in msg
    assert "missing from the checkpoint" in msg and "net.encoder" not in msg.split("\n")[0]
    assert "model.bn1.weight" in msg and "head.fc.weight" in msg and "85 more" in msg
    # One key short and one of another shape: both named.
    sd = _save_timm("test_resnet", tmp_path / "r.pth")
    del sd["layer1.0.conv1.weight"]
    sd["conv1.0.weight"] = torch.zeros(1, 1, 1, 1)
    torch.save(sd, tmp_path / "r.pth")
    with pytest.raises(RuntimeError, match=r"1 missing, 0 unexpected, 1 of another shape") as err:
        create_model("smp_upernet_tiny", pretrained=tmp_path / "r.pth")
    assert "model.layer1.0.conv1.weight" in str(err.value)
    assert "conv1.0.weight: checkpoint (1, 1, 1, 1) vs model (" in str(err.value)


def test_models_search_space_samples_valid_buildable_configs():
    keys = validate_space(get_space("models", CPU_DEMO), CPU_DEMO, samples=32)
    assert {"model", "optim.lr", "drop_path_rate"} <= keys
    assert set(models_space.MODELS) <= set(list_models())
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    built = set()
    for _ in range(40):
        trial = study.ask()
        models_space.space(trial, {})
        name = trial.params["model"]
        # drop_path_rate is a parameter of exactly the models that have stochastic depth.
        assert ("drop_path_rate" in trial.params) == models_space.MODELS[name]
        cfg = RunConfig.from_flat({**CPU_DEMO, **trial.params})
        if name.startswith("smp_") and name not in built:
            # A trial builds its model from the sampled config (on the meta device: no memory).
            with torch.device("meta"):
                create_model(cfg.model, **cfg.model_kwargs())
            built.add(name)
        study.tell(trial, 0.0)
    assert len(built) >= 6


def test_cpu_peer_is_the_narrow_unet():
    # The time-to-quality benchmark's first peer: 0.94M parameters, 0.57M of them the encoder.
    model = create_model("smp_unet_mobilenetv3_small_075_narrow")
    assert sum(p.numel() for p in model.parameters()) == 935_249
    assert sum(p.numel() for p in model.net.encoder.parameters()) == 573_480

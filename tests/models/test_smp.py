"""smp models as bldseg segmentation models: names, output contract, training and reloading."""

import pytest
import torch

pytest.importorskip("segmentation_models_pytorch")

from bldseg.models import create_model, list_models
from bldseg.models.smp import SmpSegmentor
from bldseg.predict import load_checkpoint
from bldseg.train.config import RunConfig
from bldseg.train.engine import fit

PEERS = [
    "smp_unet_resnet18",
    "smp_unet_resnet34",
    "smp_unet_mobilenet_v2",
    "smp_unet_mobilenetv3_small",
    "smp_unet_efficientnet_b0",
    "smp_unet_efficientnetv2_b0",
    "smp_unet_convnext_atto",
    "smp_unet_tiny",
]


def test_peers_are_registered_and_valid_run_config_models():
    assert set(PEERS) <= set(list_models())
    for name in PEERS:
        assert RunConfig(model=name).model == name


@pytest.mark.parametrize("name", ["smp_unet_tiny", "smp_unet_resnet18", "smp_unet_convnext_atto"])
@pytest.mark.parametrize("size", [(64, 64), (50, 70)])
def test_logits_have_the_input_size_in_train_and_eval(name, size):
    torch.manual_seed(0)
    # The keywords every run config passes (RunConfig.model_kwargs) are accepted.
    model = create_model(name, impl="auto", with_cp=False)
    x = torch.randn(2, 3, *size)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 1, *size)
    model.train()
    out = model(x)  # no auxiliary head: a tensor in training too
    assert isinstance(out, torch.Tensor) and out.shape == (2, 1, *size)
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_padding_does_not_leak_into_the_kept_pixels():
    # Zero padding to a multiple of 32 is cropped off: a 50x70 input equals the top-left of
    # the same input padded by hand to 64x96.
    torch.manual_seed(0)
    model = create_model("smp_unet_tiny").eval()
    x = torch.randn(1, 3, 50, 70)
    with torch.no_grad():
        small = model(x)
        padded = model(torch.nn.functional.pad(x, (0, 26, 0, 14)))
    torch.testing.assert_close(small, padded[..., :50, :70])


def test_random_init_and_the_run_config_keywords():
    model = create_model("smp_unet_resnet18")
    assert isinstance(model, SmpSegmentor) and model.encoder_name == "resnet18"
    # timm encoders take stochastic depth and activation checkpointing ...
    timm_model = create_model("smp_unet_convnext_atto", drop_path_rate=0.1, with_cp=True)
    timm_model.train()
    timm_model(torch.randn(1, 3, 64, 64)).mean().backward()
    # ... smp's own encoders refuse them instead of silently ignoring them.
    with pytest.raises(ValueError, match="no stochastic depth"):
        create_model("smp_unet_resnet18", drop_path_rate=0.1)
    with pytest.raises(ValueError, match="with_cp=True"):
        create_model("smp_unet_resnet18", with_cp=True)
    create_model("smp_unet_resnet18", drop_path_rate=0.0, impl="reference")  # no-ops


def test_one_epoch_fit_and_reload(small_world, tmp_path):
    cfg = RunConfig.from_flat(
        {
            "model": "smp_unet_tiny",
            "epochs": 1,
            "aug.crop_size": 64,
            "batch_size": 8,
            "samples_per_epoch": 32,
            "val_fraction": 0.25,
            "optim.lr": 3e-3,
        }
    )
    result = fit(cfg, tmp_path / "run", data=small_world, resume=False)
    assert result.status == "completed" and len(result.history) == 1
    assert 0.0 <= result.best["val_dice_best"] <= 1.0
    model, loaded_cfg, metrics = load_checkpoint(tmp_path / "run" / "best.pt")
    assert isinstance(model, SmpSegmentor) and not model.training
    assert loaded_cfg.model == "smp_unet_tiny" and metrics["epoch"] == 1
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 64, 64)

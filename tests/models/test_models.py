import importlib.util
import re

import pytest
import torch

from bldseg.models import create_backbone, create_model, list_backbones, list_models


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_registries_are_separate_and_names_are_checked():
    ours = [m for m in list_models() if not m.startswith("smp_")]  # smp's: bldseg[smp] only
    assert ours == [f"upernet_internimage_{v}" for v in ("b", "s", "t", "tiny")]
    assert list_backbones() == [f"internimage_{v}" for v in ("b", "s", "t", "tiny")]
    with pytest.raises(ValueError, match="'upernet_resnet' is not a registered model; known"):
        create_model("upernet_resnet")
    with pytest.raises(
        ValueError, match="is a backbone, not a segmentation model; use 'upernet_internimage_t'"
    ):
        create_model("internimage_t")
    with pytest.raises(ValueError, match="unknown backbone 'upernet_internimage_t'"):
        create_backbone("upernet_internimage_t")


@pytest.mark.skipif(
    importlib.util.find_spec("segmentation_models_pytorch") is not None,
    reason="the smp extra is installed: its peers are registered",
)
def test_an_smp_peer_without_the_smp_extra_names_the_extra():
    # `--model smp_unet_resnet18` was "not a registered model" with a list of ours only
    from bldseg.train.config import RunConfig

    with pytest.raises(ValueError, match=r"install the smp extra \(pip install 'bldseg\[smp\]'\)"):
        RunConfig.from_flat({"model": "smp_unet_resnet18"})


# Published sizes (PRODUCT.md): classifiers 30M/50M/97M (within 1%), UPerNet with 150 ADE20K
# classes 59M/80M/128M (within 2%). Our segmentation models have one class; the difference is
# only in the two 1x1 classifiers.
@pytest.mark.parametrize(
    ("name", "published", "tol"),
    [("internimage_t", 30e6, 0.01), ("internimage_s", 50e6, 0.01), ("internimage_b", 97e6, 0.01)],
)
def test_classifier_parameter_counts(name, published, tol):
    model = create_backbone(name, num_classes=1000)
    assert abs(n_params(model) - published) / published < tol, n_params(model)


@pytest.mark.parametrize(
    ("name", "published"),
    [
        ("upernet_internimage_t", 59e6),
        ("upernet_internimage_s", 80e6),
        ("upernet_internimage_b", 128e6),
    ],
)
def test_upernet_parameter_counts(name, published):
    model150 = create_model(name, num_classes=150)
    assert abs(n_params(model150) - published) / published < 0.02, n_params(model150)
    model1 = create_model(name)
    # one class instead of 150: two 1x1 classifiers (512 and 256 wide) shrink by 149 outputs
    assert n_params(model150) - n_params(model1) == 149 * (512 + 1) + 149 * (256 + 1)


OFFICIAL_KEYS_T = [
    "patch_embed.conv1.weight",
    "patch_embed.conv1.bias",
    "patch_embed.norm1.1.weight",
    "patch_embed.conv2.weight",
    "patch_embed.norm2.1.bias",
    "levels.0.blocks.0.norm1.0.weight",
    "levels.0.blocks.0.dcn.offset.weight",
    "levels.0.blocks.0.dcn.mask.bias",
    "levels.0.blocks.0.dcn.input_proj.weight",
    "levels.0.blocks.0.dcn.output_proj.weight",
    "levels.0.blocks.0.dcn.dw_conv.0.weight",
    "levels.0.blocks.0.dcn.dw_conv.1.1.weight",
    "levels.0.blocks.0.norm2.0.bias",
    "levels.0.blocks.0.mlp.fc1.weight",
    "levels.0.blocks.0.mlp.fc2.bias",
    "levels.0.norm.0.weight",
    "levels.0.downsample.conv.weight",
    "levels.0.downsample.norm.1.weight",
    "levels.2.blocks.17.dcn.offset.bias",
    "levels.3.norm.0.bias",
    "conv_head.0.weight",
    "conv_head.1.0.running_var",
    "head.weight",
]


def test_official_key_layout():
    t = create_backbone("internimage_t", num_classes=1000).state_dict()
    for k in OFFICIAL_KEYS_T:
        assert k in t, k
    assert "levels.3.downsample.conv.weight" not in t
    assert tuple(t["levels.0.blocks.0.dcn.offset.weight"].shape) == (4 * 9 * 2, 64)
    assert tuple(t["levels.0.blocks.0.dcn.mask.weight"].shape) == (4 * 9, 64)
    assert tuple(t["head.weight"].shape) == (1000, 768)
    # S/B: post-norm with layer scale: gammas, and no per-level norm
    s = create_backbone("internimage_s", num_classes=1000).state_dict()
    assert "levels.1.blocks.2.gamma1" in s and "levels.1.norm.0.weight" not in s


# mmseg's names (UPerHead, FCNHead, mmcv ConvModule = conv + bn) for the tiny model's decoder;
# ours differ only where MMSEG_TO_BLDSEG says (tests/models/test_pretrained.py).
DECODER_KEYS = [
    "decode_head.psp_modules.0.1.conv.weight",
    "decode_head.psp_modules.3.1.bn.running_var",
    "decode_head.bottleneck.conv.weight",
    "decode_head.bottleneck.bn.num_batches_tracked",
    "decode_head.lateral_convs.0.conv.weight",
    "decode_head.lateral_convs.2.bn.bias",
    "decode_head.fpn_convs.1.conv.weight",
    "decode_head.fpn_bottleneck.bn.weight",
    "decode_head.classifier.weight",
    "aux_head.conv.conv.weight",
    "aux_head.conv.bn.running_mean",
    "aux_head.classifier.bias",
]


def test_decoder_key_layout():
    sd = create_model("upernet_internimage_tiny").state_dict()
    for k in DECODER_KEYS:
        assert k in sd, k
    assert not any(k.startswith("decode_head.psp_modules.4") for k in sd)
    assert not any(".conv.bias" in k for k in sd if not k.startswith("backbone."))  # BN shifts


def test_run_folders_with_the_old_decoder_names_still_load():
    torch.manual_seed(0)
    model = create_model("upernet_internimage_tiny").eval()
    for name, buf in model.named_buffers():
        if name.endswith("running_mean"):
            buf.normal_()
    old = {}
    for k, v in model.state_dict().items():
        if not k.startswith("backbone."):
            # before the mmseg names: ppm.stages.i, and numbered ConvBNReLU children (0, 1)
            k = k.replace("psp_modules.", "ppm.stages.")
            k = re.sub(r"\.conv\.weight$", ".0.weight", re.sub(r"\.bn\.(\w+)$", r".1.\1", k))
        old[k] = v
    assert "decode_head.ppm.stages.2.1.1.running_mean" in old
    assert "aux_head.conv.0.weight" in old and "decode_head.fpn_convs.0.0.weight" in old
    torch.manual_seed(1)
    fresh = create_model("upernet_internimage_tiny").eval()
    fresh.load_state_dict(old, strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_tiny_forward_backward_any_size():
    torch.manual_seed(0)
    model = create_model("upernet_internimage_tiny", impl="compiled")
    x = torch.randn(2, 3, 64, 64)
    out = model.train()(x)
    assert out["logits"].shape == (2, 1, 64, 64) and out["aux_logits"].shape == (2, 1, 64, 64)
    loss = out["logits"].mean() + model.aux_weight * out["aux_logits"].mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        y = model(torch.randn(1, 3, 50, 70))
    assert isinstance(y, torch.Tensor) and y.shape == (1, 1, 50, 70)


def test_compiled_and_reference_agree():
    torch.manual_seed(0)
    model = create_model("upernet_internimage_tiny", impl="compiled").double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    # non-zero offsets/masks so the deformable sampling is really exercised
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".dcn.offset." in name or ".dcn.mask." in name:
                p.normal_(0, 0.5)
        a = model(x)
        for m in model.modules():
            if hasattr(m, "impl"):
                m.impl = "reference"
        b = model(x)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = create_model("upernet_internimage_tiny", impl="reference", drop_path_rate=0.2)
    cp = create_model(
        "upernet_internimage_tiny", impl="reference", drop_path_rate=0.2, with_cp=True
    )
    cp.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    grads, saved = [], []
    for model in (plain, cp):
        torch.manual_seed(1)  # the same drop-path and dropout draws (recomputation keeps them)
        kept = []  # bytes autograd keeps for backward: checkpointed blocks keep only inputs

        def pack(t, kept=kept):
            kept.append(t.untyped_storage().nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model.train()(x)
        saved.append(sum(kept))
        (out["logits"].square().mean() + out["aux_logits"].mean()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-5, atol=1e-7, msg=n)
    # equal gradients alone hold when with_cp is ignored too; the blocks' activations are
    # most of what the tiny model saves (13.5 vs 7.0 MiB at 128²)
    assert saved[1] < 0.75 * saved[0], saved


def test_decoder_starts_as_mmseg_initialises_it():
    # mmcv's ConvModule: Kaiming normal (fan_out, ReLU); mmseg's conv_seg: N(0, 0.01), bias 0
    from bldseg.models.decoders.upernet import ConvBNReLU

    torch.manual_seed(0)
    model = create_model("upernet_internimage_t", impl="reference")
    convs = [m.conv for m in model.decode_head.modules() if isinstance(m, ConvBNReLU)]
    assert len(convs) > 5
    for conv in convs:
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        expected = (2.0 / fan_out) ** 0.5
        assert abs(conv.weight.std().item() / expected - 1) < 0.05, (conv, expected)
    for head in (model.decode_head, model.aux_head):
        assert abs(head.classifier.weight.std().item() - 0.01) < 0.002
        assert torch.equal(head.classifier.bias, torch.zeros_like(head.classifier.bias))


def test_the_impl_environment_variable_reaches_models_built_with_auto(monkeypatch):
    # README: "force it with BLDSEG_DCNV3_IMPL=reference"; models pass impl="auto" explicitly
    # (RunConfig.impl), so the variable was read by bare op calls only
    import importlib

    dcnv3_module = importlib.import_module("bldseg.ops.dcnv3")  # not the function of that name
    calls = []
    real = dcnv3_module.dcnv3_reference

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(dcnv3_module, "dcnv3_reference", counting)
    monkeypatch.setenv(dcnv3_module.IMPL_ENV_VAR, "reference")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        create_model("upernet_internimage_tiny", impl="auto").eval()(x)
        assert calls
        calls.clear()
        create_model("upernet_internimage_tiny", impl="compiled").eval()(x)  # explicit wins
    assert not calls
    monkeypatch.setenv(dcnv3_module.IMPL_ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=dcnv3_module.IMPL_ENV_VAR), torch.no_grad():
        create_model("upernet_internimage_tiny", impl="auto").eval()(x)

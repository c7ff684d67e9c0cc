import pytest
import torch

from bldseg.models import create_model, list_models, load_pretrained


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_registry_names_and_unknown():
    names = list_models()
    for n in (
        "upernet_internimage_tiny",
        "upernet_internimage_t",
        "upernet_internimage_s",
        "upernet_internimage_b",
        "internimage_t",
        "internimage_s",
        "internimage_b",
    ):
        assert n in names
    with pytest.raises(ValueError, match="unknown model 'upernet_resnet'; known models"):
        create_model("upernet_resnet")


# Published sizes (PRODUCT.md): classifiers 30M/50M/97M (within 1%), UPerNet with 150 ADE20K
# classes 59M/80M/128M (within 2%). Our segmentation models have one class; the difference is
# only in the two 1x1 classifiers.
@pytest.mark.parametrize(
    ("name", "published", "tol"),
    [("internimage_t", 30e6, 0.01), ("internimage_s", 50e6, 0.01), ("internimage_b", 97e6, 0.01)],
)
def test_classifier_parameter_counts(name, published, tol):
    model = create_model(name, num_classes=1000)
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
    t = create_model("internimage_t", num_classes=1000).state_dict()
    for k in OFFICIAL_KEYS_T:
        assert k in t, k
    assert "levels.3.downsample.conv.weight" not in t
    assert tuple(t["levels.0.blocks.0.dcn.offset.weight"].shape) == (4 * 9 * 2, 64)
    assert tuple(t["levels.0.blocks.0.dcn.mask.weight"].shape) == (4 * 9, 64)
    assert tuple(t["head.weight"].shape) == (1000, 768)
    # S/B: post-norm with layer scale: gammas, and no per-level norm
    s = create_model("internimage_s", num_classes=1000).state_dict()
    assert "levels.1.blocks.2.gamma1" in s and "levels.1.norm.0.weight" not in s


def test_official_checkpoint_loads_strictly(tmp_path):
    torch.manual_seed(0)
    cls = create_model("internimage_tiny", num_classes=1000)
    path = tmp_path / "internimage_tiny_1k_224.pth"
    torch.save({"model": cls.state_dict()}, path)
    seg = create_model("upernet_internimage_tiny")
    dropped = load_pretrained(seg, path)
    assert sorted({k.split(".")[0] for k in dropped}) == ["conv_head", "head"]
    for k, v in seg.backbone.state_dict().items():
        assert torch.equal(v, cls.state_dict()[k]), k


def test_checkpoint_mismatch_is_reported_by_name(tmp_path):
    state = create_model("internimage_tiny").state_dict()
    state.pop("levels.1.blocks.0.mlp.fc1.bias")
    state["levels.0.blocks.0.dcn.offset.weight"] = torch.zeros(3, 3)
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(RuntimeError) as e:
        load_pretrained(create_model("upernet_internimage_tiny"), path)
    msg = str(e.value)
    assert "levels.1.blocks.0.mlp.fc1.bias" in msg and "extra.weight" in msg
    assert "levels.0.blocks.0.dcn.offset.weight: checkpoint (3, 3)" in msg
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_pretrained(create_model("upernet_internimage_tiny"), tmp_path / "nope.pth")


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

"""Model search: UPerNet-InternImage against smp's UNet, UPerNet and FPN on small encoders.

``model`` is a categorical over registered names, so a trial builds its network with the same
``create_model`` as any run; the LR is searched with it, since the families train best at
different rates. ``drop_path_rate`` exists only for the models that have stochastic depth
(InternImage, timm encoders): smp's own ResNet refuses it. Sized for a GPU, trained from
scratch: not with ``--pretrained`` (an InternImage checkpoint fits none of the smp models).
Needs ``pip install 'bldseg[smp]'``.
"""

from typing import Any

import optuna

from bldseg.models.smp import smp_available

from ._lr import SCRATCH_RANGE

#: Candidate models -> whether they take ``drop_path_rate``.
MODELS: dict[str, bool] = {
    "upernet_internimage_t": True,
    "smp_unet_resnet34": False,
    "smp_upernet_resnet34": False,
    "smp_fpn_resnet34": False,
    "smp_unet_efficientnetv2_b0": True,
    "smp_upernet_efficientnetv2_b0": True,
    "smp_fpn_efficientnetv2_b0": True,
    "smp_unet_convnext_atto": True,
    "smp_upernet_convnext_atto": True,
    "smp_fpn_convnext_atto": True,
}


def space(trial: optuna.Trial, base: dict[str, Any] | None = None) -> None:
    """The model, its peak LR and, where it has stochastic depth, its drop-path rate."""
    if base and base.get("pretrained"):
        raise ValueError(
            f"the models space trains each family from scratch; --pretrained {base['pretrained']} "
            "fits only upernet_internimage models: search the scheduler or augmentation space "
            "to fine-tune"
        )
    if not smp_available():
        raise ImportError(
            "the models space needs segmentation_models_pytorch: pip install 'bldseg[smp]'"
        )
    model = trial.suggest_categorical("model", list(MODELS))
    trial.suggest_float("optim.lr", *SCRATCH_RANGE, log=True)
    if MODELS[model]:
        trial.suggest_float("drop_path_rate", 0.0, 0.3)

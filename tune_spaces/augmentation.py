"""Augmentation search: the reference pipeline's knobs and more (keys of ``AugConfig``)."""

import optuna


def space(trial: optuna.Trial) -> dict | None:
    """Scale/flip probabilities of the reference pipeline, plus rotations, colour, noise, blur.

    The blur strength exists only when blur is on (a conditional parameter): a blur
    probability at or below 0.05 means off, and the trial runs (and records) aug.blur_p=0.
    """
    trial.suggest_float("aug.scale_limit", 0.0, 0.4)
    trial.suggest_float("aug.scale_p", 0.0, 1.0)
    trial.suggest_float("aug.vflip_p", 0.0, 0.5)
    trial.suggest_float("aug.hflip_p", 0.0, 0.5)
    trial.suggest_float("aug.rotate90_p", 0.0, 1.0)
    trial.suggest_float("aug.transpose_p", 0.0, 0.5)
    trial.suggest_float("aug.brightness_contrast_p", 0.0, 0.8)
    trial.suggest_float("aug.hsv_p", 0.0, 0.8)
    trial.suggest_float("aug.noise_p", 0.0, 0.5)
    if trial.suggest_float("aug.blur_p", 0.0, 0.5) > 0.05:
        # the largest sigma of a trial's blurs, each drawn from 0.4 up (MIN_BLUR_SIGMA in
        # bldseg.train.augment, where a sharp roof edge softens by about 14 grey levels): from
        # 0.5 most of every trial's blurs soften edges visibly
        trial.suggest_float("aug.blur_sigma", 0.5, 1.5)
        return None
    return {"aug.blur_p": 0.0}

"""Run plots: worst_tiles.png draws the library's predictions at the threshold the run uses."""

import json

import matplotlib.pyplot as plt
import numpy as np

from bldseg import metrics
from bldseg.train.folds import mean_row, oof_metrics
from bldseg.train.plots import plot_worst_tiles, write_run_plots


def _tiles(image_ids, tile_yx, size: int) -> np.ndarray:
    return np.full((len(image_ids), size, size, 3), 128, np.uint8)


def test_kfold_worst_tiles_are_drawn_at_the_out_of_fold_threshold(tmp_path):
    # a K-fold run: history.json holds means over folds (thresholds 0.30 and 0.70 -> 0.50);
    # the out-of-fold library is predicted at its own threshold, folds.json's "oof"
    rng = np.random.default_rng(0)
    truth = rng.random((6, 16, 16)) < 0.3
    probs = np.clip(truth * 60 + rng.integers(0, 200, truth.shape), 0, 255).astype(np.uint8)
    ids = np.array([f"i{i}" for i in range(6)])
    tile_ids = np.array([f"t{i}" for i in range(6)])
    np.savez(
        tmp_path / "val_probs.npz",
        probs=probs,
        truth=truth.astype(np.uint8),
        tile_ids=tile_ids,
        image_ids=ids,
        tile_yx=np.zeros((6, 2), int),
    )
    fold = {"epoch": 1, "train_loss": 1.0, "lr": 1.0, "val_dice_05": 0.5, "val_dice_best": 0.6}
    fold |= {"val_dice_youden": 0.5, "val_thr_youden": 0.5}
    row = mean_row([{**fold, "val_thr_best": 0.3}, {**fold, "val_thr_best": 0.7}])
    (tmp_path / "history.json").write_text(json.dumps([row]))
    oof = oof_metrics(tmp_path)
    (tmp_path / "folds.json").write_text(json.dumps({"status": "completed", "oof": oof}))

    write_run_plots(tmp_path, _tiles)
    got = plt.imread(tmp_path / "plots" / "worst_tiles.png")

    def drawn_at(thr: float) -> np.ndarray:
        pred = probs >= metrics.level_from_threshold(thr)
        path = tmp_path / f"expected_{thr}.png"
        plot_worst_tiles(_tiles(ids, None, 16), truth, pred, path, 8, list(tile_ids))
        return plt.imread(path)

    assert not np.array_equal(drawn_at(row["val_thr_best"]), drawn_at(oof["val_thr_best"]))
    assert np.array_equal(got, drawn_at(oof["val_thr_best"]))


def test_worst_tiles_keep_a_given_ranking(tmp_path):
    # suspects.png must show the CSV's ranking (smoothed Dice), not re-sort by plain Dice:
    # tile 0 has the lowest plain Dice, the caller ranks tile 2 first
    levels = [30, 130, 230]
    images = np.stack([np.full((16, 16, 3), v, np.uint8) for v in levels])
    truth = np.zeros((3, 16, 16), bool)
    truth[:, :8] = True
    pred = np.zeros_like(truth)
    pred[1, :4] = True  # Dice 0.67
    pred[2, :8] = True  # Dice 1.0; tile 0 predicts nothing: Dice 0

    def row_greys(path) -> list[int]:
        png = plt.imread(path)  # (H, W, 4) floats
        h, w = png.shape[:2]
        # centre of each row's first (image) panel
        return [round(png[int(h * (r + 0.5) / 3), int(w * 0.17), 0] * 255) for r in range(3)]

    plain = plot_worst_tiles(images, truth, pred, tmp_path / "plain.png", k=3)
    assert row_greys(plain) == [30, 130, 230]
    ranked = plot_worst_tiles(
        images[[2, 0, 1]],
        truth[[2, 0, 1]],
        pred[[2, 0, 1]],
        tmp_path / "given.png",
        k=3,
        ranking=("smoothed Dice", np.array([0.1, 0.9, 0.95])),
    )
    assert row_greys(ranked) == [230, 30, 130]


def test_curves_of_a_few_epochs_tick_whole_epochs(tmp_path, monkeypatch):
    # with two epochs matplotlib's default locator ticked 1.0, 1.2, ... 2.0: epochs are whole
    import bldseg.train.plots as plots

    ticks = []
    real = plots.save_figure

    def keep(fig, path, dpi=110):
        fig.canvas.draw()
        for ax in fig.axes:
            lo, hi = ax.get_xlim()
            ticks.append([float(t) for t in ax.get_xticks() if lo <= t <= hi])
        return real(fig, path, dpi)

    monkeypatch.setattr(plots, "save_figure", keep)
    history = [
        {"epoch": e, "train_loss": 1 / e, "lr": 0.1 / e, "val_dice_05": 0.5}
        | {"val_dice_best": 0.5 + 0.1 * e, "val_dice_youden": 0.55}
        for e in (1, 2)
    ]
    plots.plot_history(history, tmp_path / "curves.png")
    assert len(ticks) == 3  # loss, learning rate, validation Dice
    for axis in ticks:
        assert axis and all(t.is_integer() for t in axis), axis
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_threshold_curve_labels_type_back_to_their_levels(tmp_path, monkeypatch):
    # "best 0.412" for level 105 read back as level 106 in predict --threshold
    import bldseg.train.plots as plots

    labels = []
    real = plots.save_figure

    def keep(fig, path, dpi=110):
        labels.extend(t.get_text() for t in fig.axes[0].get_legend().get_texts())
        return real(fig, path, dpi)

    monkeypatch.setattr(plots, "save_figure", keep)
    rng = np.random.default_rng(0)
    probs = rng.integers(0, 256, (4, 16, 16)).astype(np.uint8)
    truth = probs > 120
    plots.plot_threshold_curve(probs, truth, tmp_path / "t.png", chosen=105 / 255)
    (best,) = [s for s in labels if s.startswith("best ")]
    assert best.startswith("best 0.4117: "), labels
    (youden,) = [s for s in labels if s.startswith("Youden ")]
    shown = float(youden.split()[1].rstrip(":"))
    ty, _ = metrics.youden_threshold(probs, truth)
    assert metrics.level_from_threshold(shown) == metrics.level_from_threshold(ty), (shown, ty)

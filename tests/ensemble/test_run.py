"""The whole job: honest split, outputs, MLflow run, spec; and the CLI on a real Ray cluster."""

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bldseg import metrics, stats
from bldseg.ensemble.library import find_runs, load_library, split_by_image
from bldseg.ensemble.run import (
    SearchConfig,
    evaluate,
    run_search,
    submission_decision,
    summary_lines,
    tile_scores,
)
from bldseg.ensemble.search import brute_force
from bldseg.ensemble.synthetic import fake_library, write_checkpoint_stand_in, write_runs
from bldseg.predict import EnsembleSpec
from bldseg.train.config import RunConfig
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("ens")
    lib = fake_library(6, 24, 16, seed=3, tiles_per_image=2)
    write_runs(lib, root / "results")
    test = fake_library(6, 12, 16, seed=4)
    write_runs(test, root / "results", file_name="test_probs.npz")
    return root, lib, test


def test_run_search_outputs_and_mlflow(results):
    root, _lib, test = results
    out = root / "out"
    uri = "sqlite:///" + str((root / "mlflow.db").resolve())
    cfg = SearchConfig(
        runs=str(root / "results"),
        k=[2, 3],
        top=5,
        out=str(out),
        tracking_uri=uri,
        parent_run_id="parent123",
        progress=False,
    )
    s = run_search(cfg)
    table = pd.read_csv(out / "top_ensembles.csv")
    assert len(table) == 5 and list(table["position"]) == [1, 2, 3, 4, 5]
    assert {"selection_dice", "check_dice", "test_dice", "threshold", "members"} <= set(table)
    assert table["selection_dice"].is_monotonic_decreasing
    for name in ("score_vs_k.png", "threshold_curve.png", "summary.json", "best_ensemble.json"):
        assert (out / name).stat().st_size > 0
    assert not list(out.glob("*.tmp*"))

    # chosen on the selection half exactly as brute force on that half would choose
    full = load_library(find_runs(root / "results"), root=root / "results")
    sel_idx, chk_idx = split_by_image(full.image_ids, 0.5, 0)
    want = brute_force(full.subset(sel_idx), [2, 3])[0]
    assert s.best["member_ids"] == " ".join(map(str, want.members))
    assert s.best["selection_dice"] == want.score
    assert s.best["check_dice"] == evaluate(full.subset(chk_idx), want.members, want.level)
    assert s.best["test_dice"] == evaluate(test, want.members, want.level)
    assert "check_dice" in s.best_single and "test_dice" in s.best_single

    spec = EnsembleSpec.load(out / "best_ensemble.json")
    assert [Path(c).parent.name for c in spec.checkpoints] == [
        f"trial_model{m:02d}" for m in want.members
    ]
    assert spec.weights == [1.0] * want.k and spec.threshold == want.level / (255 * want.k)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(s.mlflow_run_id)
    assert run.data.tags["mlflow.parentRunId"] == "parent123"
    assert run.data.metrics["ensemble_selection_dice"] == want.score
    assert run.data.params["best_threshold"] == str(want.level / (255 * want.k))
    arts = {a.path for a in client.list_artifacts(s.mlflow_run_id)}
    assert {"top_ensembles.csv", "score_vs_k.png", "threshold_curve.png"} <= arts
    # a new experiment of a sqlite store keeps its artifacts beside the database, as the
    # searches' do (they went into this job's --out, another job's folder for the next one)
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.artifact_location == (root / "mlartifacts" / cfg.experiment).as_uri()
    assert not (out / "mlartifacts").exists()


def _members(d: dict) -> tuple[int, ...]:
    return tuple(int(m) for m in d["member_ids"].split())


def test_summary_intervals_gain_and_decision(results, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    root, _lib, test = results
    out = tmp_path / "out"
    drawn = []  # (title, legend texts) of every figure saved
    real_savefig = Figure.savefig

    def recording(fig, *args, **kwargs):
        ax = fig.axes[0]
        legend = ax.get_legend()
        drawn.append((ax.get_title(), [t.get_text() for t in legend.get_texts()] if legend else []))
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording)
    s = run_search(SearchConfig(runs=str(root / "results"), k=[2, 3], out=str(out), progress=False))
    summary = json.loads((out / "summary.json").read_text())
    full = load_library(find_runs(root / "results"), root=root / "results")
    sel_idx, chk_idx = split_by_image(full.image_ids, 0.5, 0)
    libs = {"selection": full.subset(sel_idx), "check": full.subset(chk_idx), "test": test}
    best, single = summary["best"], summary["best_single"]
    for row in (best, single, *summary["best_per_k"].values()):
        for split, lib in libs.items():
            iv = row["intervals"][split]
            assert iv["low"] <= iv["estimate"] <= iv["high"]
            assert iv["estimate"] == pytest.approx(row[f"{split}_dice"], abs=1e-12)
            # resampled by source image, those with a scored tile
            scored = np.isfinite(tile_scores(lib, _members(row), row["level"]))
            assert iv["clusters"] == np.unique(lib.image_ids[scored]).size
    # the gain is the paired interval over source images, recomputed here from the tiles
    for split, lib in libs.items():
        a = tile_scores(lib, _members(best), best["level"])
        b = tile_scores(lib, _members(single), single["level"])
        want = stats.paired_difference(a, b, lib.image_ids).to_dict()
        assert summary["gain"][split] == pytest.approx(want)
    decision = summary["decision"]
    chosen = "ensemble" if summary["gain"]["check"]["low"] > 0 else "single"
    assert decision["submit"] == chosen == s.decision["submit"]
    assert decision["gain_check"] == summary["gain"]["check"]
    # submit.json is the spec of the chosen one; best_single.json a one-member ensemble
    submit = EnsembleSpec.load(out / "submit.json")
    row = best if chosen == "ensemble" else single
    assert submit.threshold == row["threshold"]
    assert [Path(c).parent.name for c in submit.checkpoints] == row["members"].split("+")
    one = EnsembleSpec.load(out / "best_single.json")
    assert len(one.checkpoints) == 1 and one.threshold == single["level"] / 255
    lines = "\n".join(summary_lines(s))
    assert "gain" in lines and "submit" in lines and "[" in lines
    # the threshold curve is the best ensemble's (submit.json may be the single model), and
    # its threshold types back to its level (rounded to nearest it was the next level up)
    ((title, legend),) = [d for d in drawn if any("its threshold" in t for t in d[1])]
    assert title == f"best ensemble (k={best['k']})"
    assert f"its threshold {metrics.threshold_text(best['threshold'])}" in legend


def test_submission_decision_rule():
    best = {"members": "a+b", "threshold": 0.4}
    single = {"members": "a", "threshold": 0.45}

    def gain(low, high):
        return {"estimate": (low + high) / 2, "low": low, "high": high}

    assert submission_decision(best, single, gain(0.001, 0.02))["submit"] == "ensemble"
    for g in (gain(-0.001, 0.02), gain(0.0, 0.02), gain(-0.03, -0.01), None):
        d = submission_decision(best, single, g)
        assert d["submit"] == "single" and d["members"] == "a" and d["threshold"] == 0.45
    d = submission_decision(best, single, gain(-0.001, 0.02))
    assert "-0.0010" in d["reason"] and "check half" in d["rule"]


def test_ensemble_is_submitted_only_with_a_clear_gain(tmp_path):
    # independent model errors: averaging five models clearly beats the best one
    lib = fake_library(5, 60, 16, seed=1, tiles_per_image=2, noise=4.0, rho=0.0)
    write_runs(lib, tmp_path / "clear")
    s = run_search(
        SearchConfig(runs=str(tmp_path / "clear"), k=[5], out=str(tmp_path / "o1"), progress=False)
    )
    assert s.gain["check"]["low"] > 0 and s.decision["submit"] == "ensemble"
    assert len(EnsembleSpec.load(tmp_path / "o1" / "submit.json").checkpoints) == 5
    # copies of one model: an ensemble of them is that model, no gain at all
    lib.probs[:] = lib.probs[0]
    write_runs(lib, tmp_path / "same")
    s = run_search(
        SearchConfig(runs=str(tmp_path / "same"), k=[2], out=str(tmp_path / "o2"), progress=False)
    )
    assert s.gain["check"]["estimate"] == 0.0 and s.decision["submit"] == "single"
    assert len(EnsembleSpec.load(tmp_path / "o2" / "submit.json").checkpoints) == 1


def test_threshold_on_the_edge_widens_the_ensemble_search(tmp_path):
    # under-confident models: every best threshold lies below 0.30
    lib = fake_library(4, 24, 16, seed=3, tiles_per_image=2)
    lib.probs = np.round(lib.probs * 0.25).astype(np.uint8)
    write_runs(lib, tmp_path / "runs")
    s = run_search(
        SearchConfig(runs=str(tmp_path / "runs"), k=[2], out=str(tmp_path / "out"), progress=False)
    )
    assert s.widened and s.threshold_range == (0.05, 0.95)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["widened"] and summary["threshold_range"] == [0.05, 0.95]
    # the single model was searched in the range asked for (widened with the rest): no range
    # of its own to report, though [0.30, 0.70] is not the widened range
    assert summary["single_range"] is None and s.single_range is None
    full = load_library(find_runs(tmp_path / "runs"), root=tmp_path / "runs")
    sel = full.subset(split_by_image(full.image_ids, 0.5, 0)[0])
    want = brute_force(sel, [2], 0.05, 0.95)[0]
    assert _members(s.best) == want.members and s.best["selection_dice"] == want.score
    assert s.best["threshold"] < 0.3
    single = brute_force(sel, [1], 0.05, 0.95)[0]
    assert _members(s.best_single) == single.members and s.best_single["level"] == single.level
    assert any("widened" in line for line in summary_lines(s))
    # the same library with the range fixed wide from the start finds the same
    fixed = run_search(
        SearchConfig(
            runs=str(tmp_path / "runs"),
            k=[2],
            lo=0.05,
            hi=0.95,
            out=str(tmp_path / "fixed"),
            progress=False,
        )
    )
    assert not fixed.widened and fixed.best["member_ids"] == s.best["member_ids"]


def test_greedy_job(results):
    root, _, _ = results
    cfg = SearchConfig(
        runs=str(root / "results"),
        method="greedy",
        greedy_size=4,
        out=str(root / "greedy"),
        progress=False,
    )
    s = run_search(cfg)
    spec = EnsembleSpec.load(root / "greedy" / "best_ensemble.json")
    assert len(spec.checkpoints) == len(s.best["member_ids"].split())


def test_cli_bad_k_message(results):
    root, _, _ = results
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "experiments/ensemble_search.py"),
            "--runs",
            str(root / "results"),
            "-k",
            "9",
            "--workers",
            "0",
            "--out",
            str(root / "bad"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0
    assert "k=9 is larger than the library, which holds 6 model(s)" in r.stderr


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else "ray start exited"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"the Ray head did not open port {port} in {timeout} s")


def test_cli_two_workers_on_a_real_local_ray_cluster(results, tmp_path):
    root, _, _ = results
    port = free_port()
    ray = str(Path(sys.executable).parent / "ray")
    # Our own cluster, isolated from the pytest process's Ray and from other users' clusters:
    # no RAY_ADDRESS, token auth off (it would share ~/.ray/auth_token), a private temp dir.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: socket paths are limited
    # --block keeps `ray start` in the foreground; terminating it stops exactly this cluster
    # (a plain `ray stop` would stop every Ray cluster of this user on the machine).
    head = subprocess.Popen(
        [
            ray,
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=false",
            f"--temp-dir={temp}",
            "--disable-usage-stats",
            "--node-ip-address=127.0.0.1",
            "--block",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        _wait_for_port(port, head)
        out = tmp_path / "cluster"
        r = subprocess.run(
            [
                sys.executable,
                str(REPO / "experiments/ensemble_search.py"),
                "--runs",
                str(root / "results"),
                "--k-range",
                "2",
                "3",
                "--address",
                f"127.0.0.1:{port}",
                "--workers",
                "2",
                "--top",
                "5",
                "--out",
                str(out),
                "--no-progress",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
            cwd=REPO,
        )
        assert r.returncode == 0, r.stdout + r.stderr[-3000:]
        local = run_search(
            SearchConfig(
                runs=str(root / "results"),
                k=[2, 3],
                top=5,
                out=str(tmp_path / "local"),
                progress=False,
            )
        )
        got = pd.read_csv(out / "top_ensembles.csv")
        pd.testing.assert_frame_equal(got, pd.read_csv(tmp_path / "local/top_ensembles.csv"))
        assert (
            json.loads((out / "summary.json").read_text())["best"]
            == json.loads((tmp_path / "local/summary.json").read_text())["best"]
        )
        assert local.best["member_ids"] == got["member_ids"][0]
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Rules, relocatable specs, and predict reproducing every rule's searched score
# --------------------------------------------------------------------------------------------

VARIANTS = ["mean", "vote", "weighted", "mean_empty", "vote_empty", "weighted_empty"]


def _rules_lib():
    # Many empty tiles and loosely correlated errors: the vote, weights and empty-tile rule
    # each change the result on this library.
    return fake_library(6, 48, 16, seed=2, tiles_per_image=2, empty_fraction=0.5, rho=0.2)


@pytest.fixture(scope="module")
def rule_search(tmp_path_factory):
    """A project folder (runs + search output) searched with every rule and the empty rule."""
    proj = tmp_path_factory.mktemp("rules") / "project"
    write_runs(_rules_lib(), proj / "runs")
    write_runs(fake_library(6, 12, 16, seed=5), proj / "runs", file_name="test_probs.npz")
    cfg = SearchConfig(
        runs=str(proj / "runs"),
        k=[2, 3],
        top=5,
        out=str(proj / "out"),
        rules=["mean", "vote", "weighted"],
        empty_tile=True,
        progress=False,
    )
    return proj, run_search(cfg)


class _MapsCache:
    """A stand-in test cache whose "images" are a library's maps: checkpoint -> (N, S, S)."""

    def __init__(self, maps: dict[str, np.ndarray]):
        self.maps = maps
        first = next(iter(maps.values()))
        self.image_size = first.shape[1:]

    def __len__(self) -> int:
        return len(next(iter(self.maps.values())))


def _fake_predict(monkeypatch, maps_by_ckpt: dict[str, np.ndarray]) -> _MapsCache:
    """predict_cache with every member's model replaced by its library maps (no network):
    pass it the returned cache; chunks of 7 images, so the chunked path is what is tested."""
    import bldseg.predict as P

    def loader(cache, batch_size=16, indices=None):
        return cache, range(len(cache)) if indices is None else indices

    monkeypatch.setattr(P, "image_loader", loader)
    monkeypatch.setattr(P, "PREDICT_CHUNK", 7)
    monkeypatch.setattr(
        P, "load_checkpoint", lambda ckpt, device="cpu": (str(ckpt), RunConfig(), {})
    )
    monkeypatch.setattr(
        P, "predict_probs", lambda model, ld, *a, **kw: ld[0].maps[model][list(ld[1])]
    )
    return _MapsCache(maps_by_ckpt)


def _selection_maps(runs: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Checkpoint path -> the model's maps of the selection half, and the half's truth."""
    full = load_library(find_runs(runs), root=runs)
    sel = full.subset(split_by_image(full.image_ids, 0.5, 0)[0])
    maps = {str(c.resolve()): sel.probs[m] for m, c in enumerate(full.checkpoints)}
    return maps, sel.truth


def test_rule_summary_reports_every_variant_with_intervals(rule_search):
    proj, s = rule_search
    summary = json.loads((proj / "out" / "summary.json").read_text())
    assert list(summary["rules"]) == VARIANTS == list(s.rules)
    for name, row in summary["rules"].items():
        assert row["rule"] == name.removesuffix("_empty")
        for split in ("selection", "check", "test"):
            iv = row["intervals"][split]
            assert iv["low"] <= iv["estimate"] <= iv["high"]
            assert iv["estimate"] == pytest.approx(row[f"{split}_dice"], abs=1e-12)
        assert (proj / "out" / f"best_ensemble_{name}.json").is_file()
    rows = summary["rules"]
    assert rows["mean"]["selection_dice"] == s.table["selection_dice"][0]
    assert any(rows[f"{r}_empty"]["empty_votes"] > 0 for r in ("mean", "vote", "weighted"))
    assert rows["vote"]["cut"] in range(1, rows["vote"]["k"] + 1)
    for r in ("mean", "vote", "weighted"):  # the empty rule is kept only when it helps
        assert rows[f"{r}_empty"]["selection_dice"] >= rows[r]["selection_dice"]
    assert rows["weighted"]["selection_dice"] >= rows["mean"]["selection_dice"]
    # best_ensemble.json holds the best variant on the selection half
    best = max(VARIANTS, key=lambda n: rows[n]["selection_dice"])
    assert summary["best"]["selection_dice"] == rows[best]["selection_dice"]
    assert summary["best"]["rule"] == rows[best]["rule"]
    assert EnsembleSpec.load(proj / "out" / "best_ensemble.json").rule == rows[best]["rule"]
    lines = "\n".join(summary_lines(s))
    assert "rule vote_empty" in lines and "votes" in lines


def test_predict_reproduces_every_rules_selection_score(rule_search, monkeypatch):
    from bldseg import metrics
    from bldseg.predict import predict_cache

    proj, s = rule_search
    maps, truth = _selection_maps(proj / "runs")
    cache = _fake_predict(monkeypatch, maps)
    for name, row in s.rules.items():
        spec = EnsembleSpec.load(proj / "out" / f"best_ensemble_{name}.json")
        assert spec.rule == row["rule"] and spec.empty_votes == row["empty_votes"]
        pred = predict_cache(spec, cache, progress=False)
        assert metrics.competition_score(pred, truth) == row["selection_dice"], name


def test_spec_paths_are_relative_and_the_project_folder_can_move(
    rule_search, tmp_path, monkeypatch
):
    from bldseg import metrics
    from bldseg.predict import predict_cache

    proj, s = rule_search
    # A copy of the module's project is moved, so the fixture stays usable; the checks below
    # make sure that nothing the moved specs name lies outside the moved folder.
    shutil.copytree(proj, tmp_path / "project")
    moved = tmp_path / "elsewhere" / "moved_project"
    moved.parent.mkdir()
    shutil.move(tmp_path / "project", moved)
    raw = json.loads((moved / "out" / "best_ensemble_vote_empty.json").read_text())
    assert all(m["checkpoint"].startswith("../runs/trial_") for m in raw["members"])
    maps, truth = _selection_maps(moved / "runs")
    cache = _fake_predict(monkeypatch, maps)
    for name, row in s.rules.items():
        spec = EnsembleSpec.load(moved / "out" / f"best_ensemble_{name}.json")
        assert all(Path(c).is_relative_to(moved.resolve()) for c in spec.checkpoints)
        pred = predict_cache(spec, cache, progress=False)
        assert metrics.competition_score(pred, truth) == row["selection_dice"], name
    # a member that is gone is named, with the spec
    victim = Path(EnsembleSpec.load(moved / "out" / "best_ensemble.json").checkpoints[0])
    victim.unlink()
    with pytest.raises(FileNotFoundError) as err:
        EnsembleSpec.load(moved / "out" / "best_ensemble.json")
    assert str(moved / "out" / "best_ensemble.json") in str(err.value)
    assert str(victim) in str(err.value)


def test_old_spec_with_absolute_paths_loads_unchanged(tmp_path):
    for name in "ab":
        (tmp_path / name).mkdir()
        (tmp_path / name / "best.pt").touch()
    members = [{"checkpoint": str(tmp_path / n / "best.pt"), "weight": 1.0} for n in "ab"]
    old = {"members": members, "threshold": 0.43, "min_area": 0, "tta": False}
    (tmp_path / "spec_dir").mkdir()
    path = tmp_path / "spec_dir" / "best_ensemble.json"
    path.write_text(json.dumps(old))
    spec = EnsembleSpec.load(path)
    assert spec.checkpoints == [str(tmp_path / n / "best.pt") for n in "ab"]
    assert (spec.rule, spec.threshold, spec.votes, spec.empty_votes) == ("mean", 0.43, 0, 0)
    assert spec.member_thresholds == []
    spec.save(path)  # written back relative to its folder, same members
    assert json.loads(path.read_text())["members"][0]["checkpoint"] == "../a/best.pt"
    assert EnsembleSpec.load(path) == spec


def test_rules_need_the_exhaustive_search_and_known_names(results):
    root, _, _ = results
    base = {"runs": str(root / "results"), "out": str(root / "x"), "progress": False}
    with pytest.raises(ValueError, match="need --method exhaustive"):
        run_search(SearchConfig(**base, method="greedy", rules=["mean", "vote"]))
    with pytest.raises(ValueError, match="rules must be some of"):
        run_search(SearchConfig(**base, rules=["mean", "median"]))


def test_one_model_library_with_k1_end_to_end(tmp_path):
    write_runs(fake_library(1, 16, 16, seed=0, tiles_per_image=2), tmp_path / "runs")
    s = run_search(
        SearchConfig(
            runs=str(tmp_path / "runs"),
            k=[1],
            out=str(tmp_path / "out"),
            rules=["mean", "vote", "weighted"],
            empty_tile=True,
            progress=False,
        )
    )
    assert s.best["k"] == 1 and s.best_single["member_ids"] == "0"
    assert s.rules["vote"]["selection_dice"] == s.rules["mean"]["selection_dice"]


def test_cli_rules_flags(results, tmp_path):
    root, _, _ = results
    out = tmp_path / "cli"
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "experiments/ensemble_search.py"),
            "--runs",
            str(root / "results"),
            "-k",
            "2",
            "--rules",
            "vote",
            "weighted",
            "--empty-tile",
            "--empty-areas",
            "1",
            "8",
            "--workers",
            "0",
            "--no-progress",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["rules"]) == VARIANTS
    assert summary["config"]["empty_areas"] == [1, 8]
    assert "rule weighted" in r.stdout
    h = subprocess.run(
        [sys.executable, str(REPO / "experiments/ensemble_search.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "--rules" in h.stdout and "--empty-tile" in h.stdout and "vote" in h.stdout


def test_predict_cli_refuses_a_threshold_for_a_vote_spec(rule_search, capsys):
    from bldseg.commands import predict as predict_cmd

    proj, _ = rule_search
    spec = proj / "out" / "best_ensemble_vote.json"
    assert predict_cmd.main(["--ensemble", str(spec), "--threshold", "0.4"]) == 1
    assert "--threshold sets the threshold of a mean ensemble" in capsys.readouterr().err


def test_a_failed_run_leaves_the_previous_outputs_whole(results, tmp_path, monkeypatch):
    # the job wrote the table, plots and best_ensemble.json before the rule search and
    # submit.json/summary.json at the end: a failure in between left some of each run
    root, _, _ = results
    out = tmp_path / "out"
    base = {"runs": str(root / "results"), "out": str(out), "progress": False}
    run_search(SearchConfig(**base, k=[3]))
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*a, **kw):
        raise RuntimeError("vote search failed")

    monkeypatch.setattr("bldseg.ensemble.rules.vote_search", broken)
    with pytest.raises(RuntimeError, match="vote search failed"):
        run_search(SearchConfig(**base, k=[2], rules=["mean", "vote"]))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no staging folder left
    monkeypatch.undo()
    s = run_search(SearchConfig(**base, k=[2], rules=["mean", "vote"]))
    assert Path(s.files["summary"]).parent == out and Path(s.files["spec_vote"]).is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["decision"]["spec"] == str(out / "submit.json")
    assert not list(out.glob(".ensemble-staging-*"))


def test_a_winning_vote_rule_is_logged_as_its_spec_decides(tmp_path):
    # The vote rule has no ensemble threshold: best_ensemble.json holds votes (and 0.5 in its
    # required, unread threshold field), while MLflow's best_threshold and summary.json said
    # votes / k (1.0 for 2 of 2), a number applied nowhere.
    from mlflow.tracking import MlflowClient

    # seed 6: the members' own thresholds make the vote strictly better than any mean
    write_runs(fake_library(4, 24, 16, seed=6, tiles_per_image=2, rho=0.2), tmp_path / "runs")
    uri = "sqlite:///" + str((tmp_path / "mlflow.db").resolve())
    cfg = SearchConfig(
        runs=str(tmp_path / "runs"),
        k=[2, 3],
        out=str(tmp_path / "out"),
        rules=["mean", "vote"],
        tracking_uri=uri,
        progress=False,
    )
    s = run_search(cfg)
    assert s.best["rule"] == "vote"
    spec = EnsembleSpec.load(tmp_path / "out" / "best_ensemble.json")
    assert spec.rule == "vote"
    params = MlflowClient(tracking_uri=uri).get_run(s.mlflow_run_id).data.params
    assert params["best_rule"] == "vote" and "best_threshold" not in params
    assert params["best_votes"] == str(spec.votes)
    assert params["best_member_thresholds"] == ",".join(map(str, spec.member_thresholds))
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    for row in (summary["best"], summary["rules"]["vote"]):
        assert row["threshold"] is None and row["votes"] == spec.votes == row["cut"]
        assert row["member_thresholds"] == spec.member_thresholds
    if summary["decision"]["submit"] == "ensemble":
        assert summary["decision"]["threshold"] is None
        assert summary["decision"]["votes"] == spec.votes
    assert f">= {spec.votes} of {len(spec.checkpoints)} votes" in "\n".join(summary_lines(s))
    # the mean rule keeps its threshold, as its spec applies it
    mean = EnsembleSpec.load(tmp_path / "out" / "best_ensemble_mean.json")
    assert summary["rules"]["mean"]["threshold"] == mean.threshold
    assert "votes" not in summary["rules"]["mean"]


@pytest.mark.parametrize("flag", ["top", "weighted_starts", "empty_candidates"])
def test_counts_below_one_are_refused(results, flag):
    root, _, _ = results
    cfg = SearchConfig(runs=str(root / "results"), out=str(root / "x"), progress=False)
    setattr(cfg, flag, 0)
    with pytest.raises(ValueError, match=f"--{flag.replace('_', '-')} must be at least 1"):
        run_search(cfg)


def test_best_per_k_one_is_the_best_single_after_widening(tmp_path):
    # the single model's best threshold lies on the default range's edge, the pair's does not:
    # the widened single replaced best_single, but k=1 kept the default range's choice
    n, s = 8, 16
    truth = np.zeros((n, s, s), np.uint8)
    truth[:, 2:8, 2:8] = 1
    fg, bg = np.argwhere(truth[0]), np.argwhere(truth[0] == 0)
    maps = np.zeros((3, n, s, s), np.uint8)
    for i, (y, x) in enumerate(fg):
        maps[:, :, y, x] = [
            [80 if i < 18 else 60],
            [20 if i < 14 else 200],
            [20 if i >= 22 else 200],
        ]
    for m, rows in ((0, bg[:9]), (1, bg[20:34]), (2, bg[40:54])):
        for y, x in rows:
            maps[m, :, y, x] = 60 if m == 0 else 200
    for name, p in zip("abc", maps, strict=True):
        (tmp_path / "runs" / name).mkdir(parents=True)
        np.savez(
            tmp_path / "runs" / name / "val_probs.npz",
            probs=p,
            truth=truth,
            tile_ids=np.array([f"t{i}" for i in range(n)]),
            image_ids=np.array([f"img{i}" for i in range(n)]),
            tile_yx=np.zeros((n, 2), int),
        )
        write_checkpoint_stand_in(tmp_path / "runs" / name)
    run_search(
        SearchConfig(
            runs=str(tmp_path / "runs"), k=[1, 2], out=str(tmp_path / "out"), progress=False
        )
    )
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["widened"]
    one, single = summary["best_per_k"]["1"], summary["best_single"]
    assert (one["members"], one["level"]) == (single["members"], single["level"])


@pytest.mark.parametrize("flags", [(True, True, True), (False, False, False), (True, False, True)])
def test_specs_predict_with_tta_as_the_library_was_validated(tmp_path, flags):
    # maps flip-averaged in validation (run config tta) must be predicted with TTA: the specs
    # said "tta": false for every library
    import torch

    lib = fake_library(3, 16, 16, seed=5, tiles_per_image=2)
    write_runs(lib, tmp_path / "runs")
    validated = {}
    for ckpt, flag in zip(
        load_library(find_runs(tmp_path / "runs")).checkpoints, flags, strict=True
    ):
        torch.save({"config": RunConfig(tta=flag).to_flat(), "model": {}, "metrics": {}}, ckpt)
        validated[Path(ckpt).resolve()] = flag
    cfg = SearchConfig(
        runs=str(tmp_path / "runs"), k=[2], out=str(tmp_path / "out"), progress=False
    )
    run_search(cfg)
    for name in ("best_ensemble.json", "best_single.json", "submit.json"):
        spec = EnsembleSpec.load(tmp_path / "out" / name)
        # each member as it was validated (one "tta" for all ran a mixed ensemble without TTA)
        members = [validated[Path(c).resolve()] for c in spec.checkpoints]
        assert spec.member_ttas() == members, (name, members)


def test_a_widened_search_replaces_only_what_it_beats():
    # Each choice of the default range is replaced by the widened search's only where that
    # scores strictly higher: a size whose widened best ties keeps its in-range threshold.
    from bldseg.ensemble.run import _keep_widened_where_better
    from bldseg.ensemble.search import Ensemble as E

    single, w_single = E((0,), 90, 0.70), E((1,), 20, 0.72)
    top, w_top = [E((0, 1), 200, 0.80, 0)], [E((0, 2), 60, 0.81, 1)]
    per_k = {2: E((0, 1), 200, 0.78, 0), 3: E((0, 1, 2), 300, 0.80, 0)}
    w_per_k = {2: E((0, 1), 50, 0.78, 0), 3: E((0, 1, 2), 90, 0.81, 0)}
    s, t, k = _keep_widened_where_better(
        (single, top, per_k), (w_single, w_top, w_per_k), 0.3, 0.7, 20
    )
    assert s is w_single and t == [w_top[0], top[0]]
    assert k[2] is per_k[2] and k[3] is w_per_k[3]  # the tie keeps the default range's
    s, t, _ = _keep_widened_where_better(
        (w_single, w_top, w_per_k), (single, top, per_k), 0.3, 0.7, 1
    )
    assert s is w_single and t == [w_top[0]]


def test_a_tie_in_the_top_table_keeps_the_default_ranges_threshold():
    # As choose_level: on equal scores a threshold inside the default range [lo, hi] wins over
    # one outside it, for one ensemble (the widened entry replaced its row) and between two
    # (the widened one came first, its rank lower, and became best_ensemble.json).
    from bldseg.ensemble.run import _merge_top
    from bldseg.ensemble.search import Ensemble as E

    inside, outside = E((0, 1), 255, 0.80, 1), E((0, 1), 50, 0.80, 1)  # thresholds 0.50, 0.098
    assert _merge_top([inside], [outside], 0.3, 0.7, 20) == [inside]
    other = E((0, 2), 40, 0.80, 0)  # 0.078: another pair, the same score, a lower rank
    assert _merge_top([inside], [other], 0.3, 0.7, 20) == [inside, other]
    assert _merge_top([inside], [other], 0.3, 0.7, 1) == [inside]


def test_a_widened_top_table_merges_both_ranges_as_the_summary_chooses(tmp_path):
    # The top table was the default range's whole unless the widened best beat its best,
    # while each size's best was replaced on its own: the CSV left out the k=3 best that
    # summary.json reported, at 0.1386, and 18 of its 20 rows scored below it.
    write_runs(fake_library(6, 16, 12, seed=41, noise=3.5), tmp_path / "runs")
    cfg = SearchConfig(
        runs=str(tmp_path / "runs"), k=[2, 3, 4], out=str(tmp_path / "out"), progress=False
    )
    run_search(cfg)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    table = pd.read_csv(tmp_path / "out" / "top_ensembles.csv")
    assert summary["widened"] and len(table) == cfg.top
    # every ensemble once, with the default range's entry unless the widened one scores
    # strictly higher; ties: inside [0.30, 0.70] first, then k, then rank
    full = load_library(find_runs(tmp_path / "runs"), root=tmp_path / "runs")
    sel = full.subset(split_by_image(full.image_ids, 0.5, 0)[0])
    narrow = {e.members: e for e in brute_force(sel, cfg.k, 0.30, 0.70)}
    chosen = [
        w if w.score > narrow[w.members].score else narrow[w.members]
        for w in brute_force(sel, cfg.k, 0.05, 0.95)
    ]
    chosen.sort(key=lambda e: (-e.score, not 0.30 <= e.threshold <= 0.70, e.k, e.rank))
    want = chosen[: cfg.top]
    assert [_members(r) for _, r in table.iterrows()] == [e.members for e in want]
    assert list(table["level"]) == [e.level for e in want]
    assert list(table["selection_dice"]) == [e.score for e in want]
    # so every reported choice that scores as high as a row is that row
    assert _members(summary["best"]) == _members(table.iloc[0])
    for k in map(str, cfg.k):
        best_k = summary["best_per_k"][k]
        if best_k["selection_dice"] > table["selection_dice"].min():
            row = table[table["members"] == best_k["members"]]
            assert list(row["level"]) == [best_k["level"]], k
    assert summary["best_per_k"]["3"]["threshold"] < 0.30  # the case the reviewer found


def test_a_range_with_no_level_of_one_map_still_searches_the_single_model(tmp_path):
    # 0.5 is a level of two maps' sum (255/510), none of one map's (127/255 < 0.5 < 128/255):
    # -k 2 --lo 0.5 --hi 0.5 was refused by the hidden search of the best single model, with a
    # message about L/255, a scale the user did not ask for
    from bldseg.ensemble.run import _single_range

    assert _single_range(0.5, 0.5) == (0.5, 128 / 255)
    assert _single_range(0.5, 0.501) == (0.5, 128 / 255)
    assert _single_range(0.30, 0.70) == (0.30, 0.70)
    assert _single_range(128 / 255, 128 / 255) == (128 / 255, 128 / 255)
    write_runs(fake_library(4, 16, 12, seed=2), tmp_path / "runs")
    cfg = SearchConfig(
        runs=str(tmp_path / "runs"),
        k=[2],
        lo=0.5,
        hi=0.5,
        rules=["mean", "vote"],  # the members' own masks are levels of one map too
        out=str(tmp_path / "out"),
        progress=False,
    )
    with pytest.warns(UserWarning, match=r"no threshold L/255 of one model's map.*128/255"):
        s = run_search(cfg)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    # a choice on the edge of a one-level range: widened like any other, ties to the default
    full = load_library(find_runs(tmp_path / "runs"), root=tmp_path / "runs")
    sel = full.subset(split_by_image(full.image_ids, 0.5, 0)[0])
    narrow = brute_force(sel, [1], 0.5, 128 / 255)[0]
    wide = brute_force(sel, [1], 0.05, 0.95)[0]
    want = wide if wide.score > narrow.score else narrow
    assert summary["widened"]
    assert (_members(s.best_single), s.best_single["level"]) == (want.members, want.level)
    said = any("best single model was searched in [0.5, 0.501961]" in x for x in summary_lines(s))
    if want is narrow:
        assert summary["single_range"] == [0.5, 128 / 255] and s.single_range == (0.5, 128 / 255)
        assert said
    else:  # the widened search's single model: it was not searched in [0.5, 128/255]
        assert summary["single_range"] is None and s.single_range is None and not said
    # a range that holds one map's levels records none
    s = run_search(replace(cfg, lo=0.3, hi=0.7, out=str(tmp_path / "o2")))
    assert s.single_range is None
    assert json.loads((tmp_path / "o2" / "summary.json").read_text())["single_range"] is None


@pytest.mark.parametrize(
    "how", [{"k": [1, 2]}, {"method": "greedy", "greedy_size": 3}], ids=["k1", "greedy"]
)
def test_a_range_with_no_level_of_one_map_is_refused_where_one_map_is_thresholded(tmp_path, how):
    # -k 1 and a greedy search's first step threshold one map themselves: after a warning
    # that the single model was searched in [0.5, 128/255], the run failed on "no threshold
    # level k/255 lies in [lo, hi]"
    write_runs(fake_library(3, 16, 12, seed=2), tmp_path / "runs")
    cfg = SearchConfig(
        runs=str(tmp_path / "runs"), lo=0.5, hi=0.5, out=str(tmp_path / "out"), progress=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused before the single model's warning
        with pytest.raises(ValueError, match=r"holds no threshold L/255 of one model's map"):
            run_search(replace(cfg, **how))
    assert not (tmp_path / "out" / "summary.json").exists()


def test_each_method_records_only_its_own_settings(results, tmp_path):
    # a greedy run logged k=6 (the exhaustive default it never read; the CLI refuses -k with
    # --method greedy) and neither greedy_size nor greedy_init
    from mlflow.tracking import MlflowClient

    root, _, _ = results
    uri = "sqlite:///" + str((tmp_path / "mlflow.db").resolve())
    base = {"runs": str(root / "results"), "tracking_uri": uri, "progress": False}
    greedy = run_search(
        SearchConfig(**base, method="greedy", greedy_size=3, greedy_init=1, out=str(tmp_path / "g"))
    )
    exhaustive = run_search(SearchConfig(**base, k=[2, 3], out=str(tmp_path / "e")))
    client = MlflowClient(tracking_uri=uri)
    params = client.get_run(greedy.mlflow_run_id).data.params
    assert "k" not in params and (params["greedy_size"], params["greedy_init"]) == ("3", "1")
    params = client.get_run(exhaustive.mlflow_run_id).data.params
    assert params["k"] == "2,3" and not {"greedy_size", "greedy_init"} & set(params)
    config = json.loads((tmp_path / "g" / "summary.json").read_text())["config"]
    assert config["k"] is None and (config["greedy_size"], config["greedy_init"]) == (3, 1)
    config = json.loads((tmp_path / "e" / "summary.json").read_text())["config"]
    assert config["k"] == [2, 3]


# --- a held-out test library that does not fit is left out, not fatal ----------------------


def _spoil_other_tiles(runs: Path) -> str:
    # one model's test maps from another test split (other tiles)
    other = runs.parent / "other"
    write_runs(fake_library(3, 6, 16, seed=9), other, file_name="test_probs.npz")
    shutil.copy(other / "trial_model00" / "test_probs.npz", runs / "trial_model01")
    return "trial_model01/test_probs.npz' has no tile"


def _spoil_unreadable(runs: Path) -> str:
    (runs / "trial_model02" / "test_probs.npz").write_bytes(b"not an npz archive")
    return str(runs / "trial_model02" / "test_probs.npz") + "): cannot read it"


def _spoil_stale(runs: Path) -> str:
    # written by an older run: before the model's weights (and validation maps) were saved
    saved = (runs / "trial_model01" / "best.pt").stat().st_mtime_ns
    os.utime(runs / "trial_model01" / "test_probs.npz", ns=(saved - 10**9, saved - 10**9))
    return f"{runs / 'trial_model01' / 'test_probs.npz'} is older than {runs / 'trial_model01'}"


def _spoil_missing(runs: Path) -> str:
    (runs / "trial_model02" / "test_probs.npz").unlink()
    return "1 of 3 models have none"


@pytest.mark.parametrize(
    "spoil", [_spoil_other_tiles, _spoil_unreadable, _spoil_stale, _spoil_missing]
)
def test_test_files_that_do_not_fit_are_left_out_with_the_reason(tmp_path, spoil):
    # the optional test column stopped the whole search (status 2) although no choice reads it
    runs = tmp_path / "runs"
    write_runs(fake_library(3, 8, 16, seed=3, tiles_per_image=2), runs)
    write_runs(fake_library(3, 8, 16, seed=4, tiles_per_image=2), runs, file_name="test_probs.npz")
    why = spoil(runs)
    out = tmp_path / "out"
    cfg = SearchConfig(runs=str(runs), k=[2], out=str(out), progress=False)
    with pytest.warns(UserWarning, match="held-out test column left out") as caught:
        s = run_search(cfg)
    left_out = [str(w.message) for w in caught if "test column left out" in str(w.message)]
    assert len(left_out) == 1 and why in left_out[0], left_out
    assert "the search goes on without it" in left_out[0].lower()
    # the choices are those of a search without any test file
    assert "test_dice" not in s.best and "test" not in s.gain
    assert why in s.test_left_out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_library"] is False and why in summary["test_library_left_out"]
    assert any(line.startswith("test") and why in line for line in summary_lines(s))


def test_cli_goes_on_without_an_unreadable_test_column(tmp_path, capsys):
    from bldseg.commands.ensemble import main

    runs = tmp_path / "runs"
    write_runs(fake_library(3, 8, 16, seed=3, tiles_per_image=2), runs)
    write_runs(fake_library(3, 8, 16, seed=4, tiles_per_image=2), runs, file_name="test_probs.npz")
    why = _spoil_unreadable(runs)
    argv = ["--runs", str(runs), "-k", "2", "--workers", "0", "--no-progress"]
    with pytest.warns(UserWarning, match="held-out test column left out") as caught:
        assert main([*argv, "--out", str(tmp_path / "out")]) == 0
    assert "column left out" in capsys.readouterr().out
    # test maps are remade by whatever wrote them, not by retraining
    message = next(str(w.message) for w in caught if why in str(w.message))
    assert "remake it or delete it" in message and "retrain" not in message
    # what the search chooses from is still refused
    (runs / "trial_model00" / "val_probs.npz").write_bytes(b"not an npz archive")
    assert main([*argv, "--out", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert "val_probs.npz): cannot read it" in err and why not in err


def test_a_fitting_test_library_is_scored_without_a_warning(results, tmp_path):
    root, _lib, _test = results
    cfg = SearchConfig(runs=str(root / "results"), k=[2], out=str(tmp_path), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        s = run_search(cfg)
    assert "test_dice" in s.best and s.test_left_out is None
    assert json.loads((tmp_path / "summary.json").read_text())["test_library_left_out"] is None


def test_halves_of_one_source_image_print_no_interval_in_words(tmp_path):
    # validation of two scenes: each half holds one, so no interval can be measured; the
    # summary printed "[-inf, inf]" for every score, the gain and the decision's reason
    runs = tmp_path / "runs"
    write_runs(fake_library(3, 8, 16, seed=3, tiles_per_image=4), runs)
    out = tmp_path / "out"
    s = run_search(SearchConfig(runs=str(runs), k=[2], out=str(out), progress=False))
    lines = "\n".join(summary_lines(s))
    assert "inf" not in lines and "nan" not in lines
    assert lines.count("[no interval: 1 source image]") >= 6  # 2 halves x (ens, single, gain)
    assert "no interval: 1 source image" in s.decision["reason"]
    assert s.decision["submit"] == "single"  # an unmeasured gain is no gain

    def refuse(word):
        raise AssertionError(f"non-strict JSON: {word}")

    summary = json.loads((out / "summary.json").read_text(), parse_constant=refuse)
    assert summary["gain"]["check"]["low"] is None and summary["gain"]["check"]["clusters"] == 1


def test_a_kfold_members_test_maps_are_judged_by_its_folds_weights(tmp_path):
    # its folds.json and out-of-fold val_probs.npz are rewritten without new weights (a resumed
    # run that had finished): only a fold's newer best.pt makes its test maps stale
    runs = tmp_path / "runs"
    folders = write_runs(fake_library(3, 8, 16, seed=3, tiles_per_image=2), runs)
    kfold = folders[0]
    (kfold / "best.pt").unlink()
    for f in range(2):
        write_checkpoint_stand_in(kfold / f"fold{f}")
    manifest = {"folds": 2, "config": RunConfig().to_flat(), "status": "completed"}
    (kfold / "folds.json").write_text(json.dumps(manifest))
    write_runs(fake_library(3, 8, 16, seed=4, tiles_per_image=2), runs, file_name="test_probs.npz")
    later = (kfold / "test_probs.npz").stat().st_mtime_ns + 10**9
    for name in ("folds.json", "val_probs.npz"):
        os.utime(kfold / name, ns=(later, later))
    cfg = SearchConfig(runs=str(runs), k=[2], out=str(tmp_path / "out"), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert run_search(cfg).test_left_out is None
    os.utime(kfold / "fold1" / "best.pt", ns=(later, later))
    with pytest.warns(UserWarning, match="held-out test column left out"):
        s = run_search(cfg)
    assert f"is older than {kfold / 'fold1' / 'best.pt'}" in s.test_left_out


# --------------------------------------------------------------------------------------------
# Killed and interrupted runs: staging folders, the move into --out
# --------------------------------------------------------------------------------------------


def _stage(out: Path, name: str, owner: dict | None, age_s: float = 0.0) -> Path:
    """A staging folder as a run leaves it: a staged output, the owner file, ``age_s`` old."""
    from bldseg.ensemble.run import STAGING_OWNER, STAGING_PREFIX

    stage = out / f"{STAGING_PREFIX}{name}"
    stage.mkdir(parents=True)
    (stage / "summary.json").write_text("{}")
    if owner is not None:
        (stage / STAGING_OWNER).write_text(json.dumps(owner))
    then = time.time() - age_s
    os.utime(stage, (then, then))
    return stage


def test_staging_folders_of_gone_processes_are_removed(results, tmp_path):
    # A SIGKILLed search left its staging folder (mode 700) in --out, and no later run removed it.
    root, _, _ = results
    out = tmp_path / "out"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])  # a pid that ran, and ended
    gone.wait()
    host = socket.gethostname()
    stale = [
        _stage(out, "killed", {"pid": gone.pid, "host": host}),
        _stage(out, "old-unowned", None, age_s=2 * 3600),  # a bldseg before the owner file
    ]
    kept = [
        _stage(out, "running", {"pid": os.getpid(), "host": host}),  # a search running now
        _stage(out, "elsewhere", {"pid": gone.pid, "host": host + "-other"}),  # cannot tell
        _stage(out, "just-made", None),  # its owner file is being written
    ]
    run_search(SearchConfig(runs=str(root / "results"), k=[2], out=str(out), progress=False))
    assert not any(s.exists() for s in stale)
    assert all((s / "summary.json").is_file() for s in kept)
    left = sorted(p.name for p in out.glob(".ensemble-staging-*"))
    assert left == sorted(s.name for s in kept)  # and this run's own is gone


#: Holds the lock given as its argument, says so, and lets go when its stdin closes.
_HOLD_LOCK = (
    "import sys\n"
    "from bldseg.io import file_lock\n"
    "with file_lock(sys.argv[1]):\n"
    "    print('held', flush=True)\n"
    "    sys.stdin.read()\n"
)


def test_a_staging_folder_is_stale_only_when_its_lock_is_free(tmp_path):
    # Two searches sharing a hostname but not a PID namespace (containers with --network host,
    # jobs in PID namespaces of their own) see each other's pids as not running: one removed
    # the other's live staging folder.
    from bldseg.ensemble.run import STAGING_LOCK, remove_stale_stages

    out = tmp_path / "out"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = socket.gethostname()
    # its owner file names a pid that does not run here, but its run is alive: it holds the lock
    live = _stage(out, "live", {"pid": gone.pid, "host": host})
    # another host's (an --out on NFS), whose lock no one holds: that run is gone
    dead = _stage(out, "dead", {"pid": os.getpid(), "host": host + "-other"})
    (dead / STAGING_LOCK).touch()
    # a run between creating its lock file and locking it (no owner file yet): young, kept
    making = _stage(out, "making", None)
    (making / STAGING_LOCK).touch()
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(live / STAGING_LOCK)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert remove_stale_stages(out) == [dead]
        assert (live / "summary.json").is_file() and (making / STAGING_LOCK).is_file()
    finally:
        holder.stdin.close()  # its run ends (without removing its folder: killed)
        holder.wait(timeout=60)
    assert remove_stale_stages(out) == [live]
    assert [p.name for p in out.iterdir()] == [making.name]


def test_a_killed_search_leaves_a_staging_folder_the_next_run_removes(results, tmp_path):
    root, _, _ = results
    out = tmp_path / "out"
    # killed (SIGKILL: no finally runs) as it was about to move its outputs into --out
    script = (
        "import os, signal, sys\n"
        "import bldseg.ensemble.run as run\n"
        "run._publish = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
        "run.run_search(run.SearchConfig(runs=sys.argv[1], k=[2], out=sys.argv[2], "
        "progress=False))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(root / "results"), str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr
    (left,) = out.glob(".ensemble-staging-*")
    assert (left / "summary.json").is_file() and not (out / "summary.json").exists()
    run_search(SearchConfig(runs=str(root / "results"), k=[2], out=str(out), progress=False))
    assert not left.exists() and (out / "summary.json").is_file()
    assert not list(out.glob(".ensemble-staging-*"))


def test_a_staging_folder_follows_the_umask(results, tmp_path, monkeypatch):
    # In an --out shared by a group (umask 002), another user's run must look into a staging
    # folder to tell whether its run is gone: mkdtemp made it drwx------ whatever the umask.
    import bldseg.ensemble.run as run_mod

    root, _, _ = results
    modes = []

    def staged(cfg, out, stage, t0):
        modes.append(stage.stat().st_mode & 0o777)
        return "done"

    monkeypatch.setattr(run_mod, "_run_search", staged)
    cfg = SearchConfig(runs=str(root / "results"), k=[2], out=str(tmp_path / "out"))
    old = os.umask(0o002)
    try:
        assert run_search(cfg) == "done"
        os.umask(0o027)
        assert run_search(cfg) == "done"
    finally:
        os.umask(old)
    assert modes == [0o775, 0o750]
    assert not list((tmp_path / "out").glob(".ensemble-staging-*"))


def test_a_staging_folder_this_user_cannot_look_into_is_kept(results, tmp_path, monkeypatch):
    # Another user's staging folder (drwx------, made by an earlier bldseg): looking for its
    # lock file raised PermissionError, and every search into that --out ended in a traceback.
    root, _, _ = results
    out = tmp_path / "out"
    theirs = _stage(out, "theirs", {"pid": 1, "host": socket.gethostname()})
    is_file = Path.is_file

    def denied_in_theirs(self):
        if self.parent == theirs:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return is_file(self)

    monkeypatch.setattr(Path, "is_file", denied_in_theirs)
    with pytest.warns(UserWarning, match=r"staging folder \.ensemble-staging-theirs is another"):
        run_search(SearchConfig(runs=str(root / "results"), k=[2], out=str(out), progress=False))
    assert (theirs / "summary.json").read_text() == "{}"  # kept as it was
    assert json.loads((out / "summary.json").read_text())  # and the search went on
    assert [p.name for p in out.glob(".ensemble-staging-*")] == [theirs.name]


def test_a_staging_folder_whose_lock_this_user_cannot_open_is_kept_with_a_warning(
    results, tmp_path, monkeypatch
):
    # Another user's run under umask 022, killed: its folder (drwxr-sr-x) can be looked into,
    # but its lock file (-rw-r--r--) cannot be opened to test the lock; it was kept silently.
    import bldseg.ensemble.run as run_mod
    from bldseg.ensemble.run import STAGING_LOCK

    root, _, _ = results
    out = tmp_path / "out"
    theirs = _stage(out, "theirs", {"pid": 1, "host": socket.gethostname()})
    (theirs / STAGING_LOCK).write_bytes(b"")
    file_lock = run_mod.file_lock

    def denied_in_theirs(path, *args, **kwargs):
        if Path(path).parent == theirs:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return file_lock(path, *args, **kwargs)

    monkeypatch.setattr(run_mod, "file_lock", denied_in_theirs)
    with pytest.warns(
        UserWarning,
        match=r"staging folder \.ensemble-staging-theirs is another user's search's, whose "
        r"lock file this user cannot open \(Permission denied\): it is kept",
    ):
        run_search(SearchConfig(runs=str(root / "results"), k=[2], out=str(out), progress=False))
    assert (theirs / "summary.json").read_text() == "{}"  # kept as it was
    assert json.loads((out / "summary.json").read_text())  # and the search went on
    assert [p.name for p in out.glob(".ensemble-staging-*")] == [theirs.name]


@pytest.fixture
def moves_into(monkeypatch):
    """``moves_into(out, on_move)``: calls ``on_move(name)`` before each rename into ``out``;
    returns the names moved there, in order."""
    import bldseg.ensemble.run as run_mod

    replace_file = os.replace

    def arm(out: Path, on_move=lambda name: None) -> list[str]:
        moved = []

        def replace_noting(src, dst):
            if Path(dst).parent == out and Path(src).parent != out:
                on_move(Path(dst).name)
                moved.append(Path(dst).name)
            return replace_file(src, dst)

        monkeypatch.setattr(run_mod.os, "replace", replace_noting)
        return moved

    return arm


def test_submit_and_summary_are_moved_last(results, tmp_path, moves_into):
    # the outputs were moved in name order: a kill between two renames could leave the new
    # summary.json (or submit.json) beside the earlier run's spec files
    root, _, _ = results
    out = tmp_path / "out"
    moved = moves_into(out)
    run_search(SearchConfig(runs=str(root / "results"), k=[2], out=str(out), progress=False))
    assert moved[-2:] == ["submit.json", "summary.json"]
    assert sorted(moved) == sorted(p.name for p in out.iterdir())


def test_ctrl_c_while_the_outputs_move_waits_for_all_of_them(results, tmp_path, moves_into):
    import signal

    from bldseg.ensemble.run import InterruptedAfterPublishing

    root, _, _ = results
    out = tmp_path / "out"
    base = {"runs": str(root / "results"), "out": str(out), "progress": False}
    run_search(SearchConfig(**base, k=[3]))
    earlier = {p.name: p.read_bytes() for p in out.iterdir()}

    def ctrl_c_at_the_first(name: str) -> None:
        if not moved:
            signal.raise_signal(signal.SIGINT)

    moved = moves_into(out, ctrl_c_at_the_first)
    try:
        with pytest.raises(InterruptedAfterPublishing):
            run_search(SearchConfig(**base, k=[2]))
    except KeyboardInterrupt:  # would end the test session
        pytest.fail("Ctrl-C stopped the move into --out halfway")
    now = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(now) == sorted(moved) == sorted(earlier)  # every output moved, no stage left
    summary = json.loads(now["summary.json"])
    assert summary["config"]["k"] == [2]  # this run's, beside its own files
    assert now["top_ensembles.csv"] != earlier["top_ensembles.csv"]


def test_ctrl_c_while_logging_to_mlflow_says_the_outputs_are_in(results, tmp_path, monkeypatch):
    from bldseg.ensemble.run import InterruptedAfterPublishing

    root, _, _ = results
    out = tmp_path / "out"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("bldseg.ensemble.run._log_mlflow", interrupted)
    cfg = SearchConfig(
        runs=str(root / "results"), k=[2], out=str(out), progress=False, tracking_uri="x"
    )
    with pytest.raises(InterruptedAfterPublishing):
        run_search(cfg)
    assert (out / "summary.json").is_file() and not list(out.glob(".ensemble-staging-*"))

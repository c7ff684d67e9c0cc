"""experiments/bench_data.py: both paths timed in the same rounds, a --size that cannot hold
the crop refused, and --overwrite for a bench world made with other parameters."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import bench_data  # noqa: E402

# 64-px images and 32-px crops: RandomScale(0.2) needs a 40-px window
TINY = ["--images", "2", "--size", "64", "--crop", "32", "--samples", "4"]


def test_both_paths_report_median_and_spread_over_the_same_rounds(tmp_path, capsys):
    out = tmp_path / "data.json"
    bench_data.main([*TINY, "--root", str(tmp_path / "w"), "--repeats", "3", "--json", str(out)])
    r = json.loads(out.read_text())
    assert (r["images"], r["image_size"], r["crop"], r["repeats"]) == (2, 64, 32, 3)
    for key in ("png_samples_per_s", "cache_samples_per_s"):
        sp = r["spread"][key]
        assert len(sp["rounds"]) == 3
        assert sp["min"] <= sp["median"] <= sp["max"] and r[key] == round(sp["median"], 1)
    assert len(r["spread"]["speedup"]["rounds"]) == 3
    assert r["cpu_count"] >= 1 and r["torch_threads"] >= 1 and "cv2_threads" in r
    assert "[min-max]" in capsys.readouterr().out


def test_a_size_below_the_crop_window_is_refused_before_anything_is_written(tmp_path, capsys):
    root = tmp_path / "w"
    with pytest.raises(SystemExit) as e:
        bench_data.main([*TINY, "--size", "39", "--root", str(root)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--size 39 is smaller than the 40x40 window that --crop 32 needs" in err
    assert not root.exists()
    bench_data.main([*TINY, "--size", "40", "--root", str(root), "--repeats", "1"])  # just fits


def test_another_size_in_the_same_root_needs_overwrite(tmp_path, capsys):
    root, out = tmp_path / "w", tmp_path / "data.json"
    bench_data.main([*TINY, "--root", str(root), "--repeats", "1"])
    other = ["--images", "2", "--size", "48", "--crop", "32", "--samples", "4", "--repeats", "1"]
    with pytest.raises(SystemExit) as e:
        bench_data.main([*other, "--root", str(root)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "other parameters" in err and "pass --overwrite" in err
    bench_data.main([*other, "--root", str(root), "--overwrite", "--json", str(out)])
    assert json.loads(out.read_text())["image_size"] == 48

import json

import numpy as np

from bldseg.io import write_json


def test_write_json_creates_folders_and_replaces_whole_files(tmp_path):
    path = tmp_path / "bench" / "deeper" / "out.json"  # folders that do not exist yet
    write_json(path, {"dice": np.float32(0.5), "n": 3})
    assert json.loads(path.read_text()) == {"dice": 0.5, "n": 3}
    write_json(path, {"n": 4})
    assert json.loads(path.read_text()) == {"n": 4}
    assert [p.name for p in path.parent.iterdir()] == ["out.json"]  # no temporary left


def test_write_json_passes_dumps_options(tmp_path):
    path = write_json(tmp_path / "a.json", {"p": tmp_path}, default=str, indent=None)
    assert path.read_text() == json.dumps({"p": str(tmp_path)}) + "\n"

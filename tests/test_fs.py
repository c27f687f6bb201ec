"""cm3leon_jax/fs.py behaves the same on a local folder and on a remote file system.

The remote one is TensorFlow's `ram://` (in this process's memory; what gs:// goes
through, tf.io.gfile, without a network).
"""

import json
import uuid

import pytest

from cm3leon_jax import fs


@pytest.fixture(params=["local", "ram"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path)
    path = f"ram://fs_test_{uuid.uuid4().hex[:8]}"
    fs.makedirs(path)
    return path


def test_files_and_folders(root):
    d = fs.join(root, "a", "b")
    fs.makedirs(d)
    fs.makedirs(d)  # again: fine
    assert fs.isdir(d) and not fs.isfile(d)
    fs.write_text(fs.join(d, "x.txt"), "héllo")
    fs.write_json(fs.join(d, "y.json"), {"k": [1, 2]})
    with fs.open(fs.join(d, "z.bin"), "wb") as f:
        f.write(b"\0\1")
    assert fs.listdir(d) == ["x.txt", "y.json", "z.bin"]
    assert fs.listdir(fs.join(root, "a")) == ["b"]
    assert fs.read_text(fs.join(d, "x.txt")) == "héllo"
    assert fs.read_json(fs.join(d, "y.json")) == {"k": [1, 2]}
    assert fs.read_bytes(fs.join(d, "z.bin")) == b"\0\1" and fs.getsize(fs.join(d, "z.bin")) == 2
    assert fs.glob(fs.join(d, "*.j*")) == [fs.join(d, "y.json")]
    fs.rename(fs.join(d, "x.txt"), fs.join(d, "w.txt"))
    fs.copy(fs.join(d, "w.txt"), fs.join(d, "v.txt"))
    with pytest.raises(Exception):
        fs.rename(fs.join(d, "v.txt"), fs.join(d, "w.txt"), overwrite=False)
    fs.remove(fs.join(d, "v.txt"))
    assert fs.listdir(d) == ["w.txt", "y.json", "z.bin"]
    assert fs.exists(fs.join(d, "w.txt")) and not fs.exists(fs.join(d, "nothing"))
    fs.rmtree(fs.join(root, "a"))
    assert not fs.exists(d)


def test_copy_tree_and_local_copy(root, tmp_path):
    src = fs.join(root, "src")
    fs.makedirs(fs.join(src, "sub"))
    fs.write_text(fs.join(src, "sub", "f.txt"), "1")
    fs.write_text(fs.join(src, "g.txt"), "2")
    with fs.local_copy(src) as local:
        assert not fs.is_remote(local)
        assert fs.read_text(fs.join(local, "sub", "f.txt")) == "1"
    with fs.staged_dir(fs.join(root, "out")) as out:
        assert not fs.is_remote(out)
        fs.write_text(fs.join(out, "h.txt"), "3")
    assert fs.read_text(fs.join(root, "out", "h.txt")) == "3"


def test_paths():
    assert fs.join("gs://b/run", "checkpoints") == "gs://b/run/checkpoints"
    assert fs.abspath("gs://b/run") == "gs://b/run"
    assert fs.abspath("run").startswith("/")
    assert fs.is_remote("ram://x") and not fs.is_remote("/tmp/x")


def test_overlap_follows_links_and_nesting(tmp_path):
    (tmp_path / "run" / "sft").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "run")
    run = str(tmp_path / "run")
    assert fs.overlap(run, run + "/") and fs.overlap(str(tmp_path / "link"), run)
    assert fs.overlap(run, f"{run}/sft") and fs.overlap(f"{tmp_path}/link/sft/..", run)
    assert not fs.overlap(run, str(tmp_path / "other"))
    assert not fs.overlap(run, f"{run}_b")  # A shared prefix is not nesting.
    assert fs.overlap("gs://b/runs/x", "gs://b/runs/x/export")
    assert fs.overlap("gs://b/runs//x/", "gs://b/runs/x")
    assert not fs.overlap("gs://b/runs/x", "gs://b/runs/xy")
    assert not fs.overlap("gs://b/runs/x", run)


def test_within_is_the_folder_or_inside_it_not_a_folder_holding_it(tmp_path):
    (tmp_path / "data" / "out").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "data")
    data = str(tmp_path / "data")
    assert fs.within(data, data + "/") and fs.within(f"{data}/out", data)
    assert fs.within(str(tmp_path / "link" / "out"), data)
    assert not fs.within(str(tmp_path), data)  # It holds the folder: not inside it.
    assert not fs.within(f"{data}_b", data)
    assert fs.within("gs://b/d/out", "gs://b/d") and not fs.within("gs://b", "gs://b/d")


def test_atomic_write_leaves_the_old_file_or_the_new_one(root):
    from cm3leon_jax.data import shards

    shards.write_manifest(root, {"num_docs": 1})
    with pytest.raises(RuntimeError, match="killed"):
        with fs.atomic_write(fs.join(root, "manifest.json")) as tmp, fs.open(tmp, "w") as f:
            f.write('{"num_do')  # Half a file, then the writer dies.
            raise RuntimeError("killed mid-write")
    assert shards.read_manifest(root) == {"num_docs": 1}
    with pytest.raises(TypeError):  # Not JSON: nothing is written at all.
        shards.write_manifest(root, {"num_docs": object()})
    shards.write_manifest(root, {"num_docs": 2})
    assert shards.read_manifest(root) == {"num_docs": 2}
    assert fs.listdir(root) == ["manifest.json"]  # No temporary left behind.


def test_write_json_writes_floats_that_are_not_finite_as_null(tmp_path):
    path = str(tmp_path / "report.json")
    fs.write_json(path, {"mean": float("nan"), "rows": [{"x": float("inf"), "y": 0.5}]})
    with open(path) as f:
        text = f.read()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"mean": None, "rows": [{"x": None, "y": 0.5}]}

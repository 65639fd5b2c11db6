from pathlib import Path

import pytest
import torch

from ecoflap.data.calibration import load_calibration, save_calibration
from ecoflap.utils.io import atomic_path, load_tensors, read_json, write_json


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_whole(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_path(target, is_dir=True) as tmp:
        (tmp / "a").write_text("1")
    with atomic_path(target, is_dir=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]


def test_corrupt_files_give_clear_errors(tmp_path):
    ids = torch.arange(20, dtype=torch.int64).reshape(4, 5)
    save_calibration(tmp_path / "c.safetensors", ids, {"seed": "0"})
    assert torch.equal(load_calibration(tmp_path / "c.safetensors", 2)["input_ids"], ids[:2])
    with pytest.raises(ValueError, match="raise calibration.n_samples"):
        load_calibration(tmp_path / "c.safetensors", 9)
    data = (tmp_path / "c.safetensors").read_bytes()
    (tmp_path / "c.safetensors").write_bytes(data[:40])
    with pytest.raises(ValueError, match="rerun the rule"):
        load_calibration(tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match="no pickle"):
        load_tensors(tmp_path / "weights.bin")
    (tmp_path / "x.json").write_text("{broken")
    with pytest.raises(ValueError, match="rerun the rule"):
        read_json(tmp_path / "x.json")
    write_json(tmp_path / "y.json", {"a": 1})
    assert read_json(tmp_path / "y.json") == {"a": 1}


def test_tensor_files_are_byte_identical_across_processes(tmp_path):
    """safetensors writes several metadata keys in a random order per process; the same
    calibration set must give the same file (its hash is an input of every later stage)."""
    import hashlib
    import subprocess
    import sys

    from ecoflap.utils.io import tensor_metadata

    code = ("import sys, torch; from ecoflap.utils.io import save_tensors; "
            "save_tensors(sys.argv[1], {'input_ids': torch.arange(12).reshape(3, 4)}, "
            "{'source': 'austen-emma', 'seed': '0', 'seq_len': '4', 'prompt': '', 'protocol': 'caption'})")
    paths = [tmp_path / f"c{i}.safetensors" for i in range(4)]
    for p in paths:
        subprocess.run([sys.executable, "-c", code, str(p)], check=True)
    assert len({hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}) == 1
    assert tensor_metadata(paths[0]) == {"source": "austen-emma", "seed": "0", "seq_len": "4", "prompt": "",
                                         "protocol": "caption"}
    assert torch.equal(load_tensors(paths[0])["input_ids"], torch.arange(12).reshape(3, 4))


def test_atomic_dir_interrupted_while_replacing_keeps_a_whole_folder(tmp_path, monkeypatch):
    """A job killed while the old folder was being deleted left it half deleted under the final
    name (the old code removed the old folder in place, then renamed the new one in)."""
    import shutil

    from ecoflap.utils import io

    target = tmp_path / "ckpt"
    with atomic_path(target, is_dir=True) as tmp:
        for name in ("a", "b", "c"):
            (tmp / name).write_text("old")
    real_rmtree, calls = shutil.rmtree, []

    def killed_midway(path, *args, **kwargs):  # deletes one file, then the job is killed
        if calls:
            return real_rmtree(path, *args, **kwargs)
        calls.append(path)
        sorted(p for p in Path(path).iterdir())[0].unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(io.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target, is_dir=True) as tmp:
            for name in ("a", "b", "c", "d"):
                (tmp / name).write_text("new")
    contents = {p.name: p.read_text() for p in target.iterdir()}
    assert contents in ({"a": "old", "b": "old", "c": "old"}, {n: "new" for n in "abcd"}), contents


def test_atomic_dir_replace_leaves_no_hidden_folders(tmp_path):
    target = tmp_path / "ckpt"
    for n in range(3):
        with atomic_path(target, is_dir=True) as tmp:
            (tmp / f"f{n}").write_text(str(n))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert [p.name for p in target.iterdir()] == ["f2"]


def test_sha256_file_sees_a_change_whose_modification_time_was_set_back(tmp_path):
    """The in-process hash cache was keyed on (inode, size, mtime): a same-size change with the
    mtime restored (cp -p, rsync -t, touch -r) was answered with the old file's hash, so
    verify_checksums passed a changed file."""
    import hashlib
    import os

    from ecoflap.utils.io import sha256_file, verify_checksums, write_checksums

    f = tmp_path / "model.safetensors"
    f.write_bytes(b"A" * 4096)
    st = os.stat(f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns - 10**10))  # written 10 s ago: old enough to be remembered
    st = os.stat(f)
    write_checksums(tmp_path)
    with open(f, "r+b") as fh:
        fh.seek(100)
        fh.write(b"B")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert sha256_file(f) == hashlib.sha256(f.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="differs from when it was written"):
        verify_checksums(tmp_path)


def test_sha256_file_does_not_remember_a_racily_fresh_file(tmp_path, monkeypatch):
    """File times are coarse on many kernels (a few ms): a same-size rewrite within one tick, or a
    new file given the freed inode, has the same (inode, size, mtime, ctime). A file that recent
    is hashed again each time."""
    import hashlib
    import os

    from ecoflap.utils import io

    f = tmp_path / "x.json"
    f.write_text("1111")
    st = os.stat(f)
    frozen = os.stat_result(tuple(st[:10]) + (st.st_atime, st.st_mtime, st.st_ctime, st.st_atime_ns,
                                              st.st_mtime_ns, st.st_ctime_ns))
    real_stat = os.stat
    monkeypatch.setattr(io.os, "stat", lambda path, *a, **k: frozen if str(path) == str(f) else real_stat(path, *a, **k))
    # (a coarse clock: the rewrite below keeps every time of the file)
    assert io.sha256_file(f) == hashlib.sha256(b"1111").hexdigest()
    f.write_text("2222")
    assert io.sha256_file(f) == hashlib.sha256(b"2222").hexdigest()


def test_the_commit_is_dirty_when_the_code_holds_a_file_not_committed(tmp_path):
    """A new module (not yet added) runs like any other; the commit recorded without "-dirty"
    claimed the committed code had produced the result."""
    import subprocess

    from ecoflap.utils.io import git_commit

    git = lambda *a: subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *a], cwd=tmp_path,  # noqa: E731
                                    check=True, capture_output=True)
    git("init", "-q")
    (tmp_path / "ecoflap").mkdir()
    (tmp_path / "ecoflap/a.py").write_text("x = 1\n")
    git("add", "-A")
    git("commit", "-qm", "a")
    assert not git_commit(tmp_path / "ecoflap").endswith("-dirty")
    (tmp_path / "results").mkdir()
    (tmp_path / "results/out.json").write_text("{}")  # outputs beside the code: not the code
    assert not git_commit(tmp_path / "ecoflap").endswith("-dirty")
    (tmp_path / "ecoflap/b.py").write_text("y = 2\n")
    assert git_commit(tmp_path / "ecoflap").endswith("-dirty")

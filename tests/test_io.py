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

import json

import pytest

from ecoflap.models.layout import layout_of_folder
from ecoflap.models.loading import fetch_model


def test_local_source_copies_safetensors_and_lists_layers(tiny_dir, tmp_path):
    fetch_model({"source": "local", "path": str(tiny_dir)}, tmp_path / "model")
    assert (tmp_path / "model" / "model.safetensors").exists()
    assert json.loads((tmp_path / "model" / "ecoflap_source.json").read_text())["source"] == "local"
    layout = layout_of_folder(tmp_path / "model")["layout"]
    assert list(layout) == ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert len(layout["model.layers.0"]) == 7


def test_pickle_only_folder_is_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(RuntimeError, match="safetensors"):
        fetch_model({"source": "local", "path": str(src)}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unreachable_hub_model_fails_clearly_and_leaves_nothing(tmp_path):
    # offline (CI) this cannot connect; online the repository does not exist: both are clear errors
    with pytest.raises(RuntimeError, match="hub"):
        fetch_model({"source": "hub", "id": "ecoflap-tests/no-such-model-xyz", "revision": "main"}, tmp_path / "m")
    assert not (tmp_path / "m").exists()
    assert list(tmp_path.iterdir()) == []


def test_a_flipped_weight_byte_is_caught_on_load(tiny_dir, tmp_path):
    """Corruption inside the tensor data leaves a readable safetensors file; the checksums
    written with the checkpoint catch it before any stage uses the weights."""
    import pytest
    import torch

    from ecoflap.models.loading import load_model

    fetch_model({"source": "local", "path": str(tiny_dir)}, tmp_path / "model")
    load_model(tmp_path / "model", torch.device("cpu"), torch.float32)  # intact: loads
    weights = tmp_path / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors differs from when it was written.*download_model"):
        load_model(tmp_path / "model", torch.device("cpu"), torch.float32)


def test_the_embedded_clip_is_trained_with_the_top_level_seed(tmp_path, monkeypatch):
    """The schema says the download keeps the top-level seed; the training always used seed 0."""
    import yaml

    from conftest import REPO, run_snakemake
    from ecoflap.models import loading

    seeds = []

    def train(out_dir, seed=0):
        seeds.append(seed)
        (out_dir / "config.json").write_text("{}")
        return {"source": "embedded", "name": "fashion-clip", "trained": {"seed": seed}}

    monkeypatch.setitem(loading.EMBEDDED["fashion-clip"], "train", train)
    fetch_model({"source": "embedded", "name": "fashion-clip", "train_seed": 7}, tmp_path / "model")
    assert seeds == [7]

    config = yaml.safe_load((REPO / "config" / "embedded" / "fashion_clip.yaml").read_text())
    config["seed"] = 7
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    model = next(iter(config["models"]))
    run = run_snakemake(tmp_path, tmp_path / "c.yaml", "-n", "-p", targets=[f"results/{model}/layout.json"])
    assert run.returncode == 0, run.stderr
    assert '"train_seed": 7' in run.stdout + run.stderr

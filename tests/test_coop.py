"""The paper's CLIP table on CoOp's data sets: the split readers (the nine split files, FGVC-Aircraft's
variant lists, ImageNet's folders), the authors' CLIP calibration (each data set's train split under
its zero-shot prompt, captions padded to CLIP's context), zero-shot classification on a test split,
and the workflow on a tiny CLIP with one data set present and one missing."""
import json

import pytest
import torch
import yaml
from PIL import Image

import vl_models
from conftest import run_snakemake
from ecoflap.data.coop import COOP_DATASETS, load_coop_split

CALTECH = {"train": [("face", 3), ("leopard_cat", 3), ("motorbike", 2)], "test": [("face", 2), ("leopard_cat", 2),
                                                                                 ("motorbike", 2)]}


def _image(path, seed):
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def make_coop_root(root):
    """Tiny copies of three CoOp layouts: Caltech101 (a split file), FGVC-Aircraft, ImageNet."""
    seed = 0
    split = {"train": [], "val": [], "test": []}
    classes = ["face", "leopard_cat", "motorbike"]
    for part, counts in CALTECH.items():
        for name, n in counts:
            for i in range(n):
                rel = f"{name}/{part}_{i}.png"
                _image(root / "caltech-101/101_ObjectCategories" / rel, seed := seed + 1)
                split[part].append([rel, classes.index(name), name])
    (root / "caltech-101/split_zhou_Caltech101.json").write_text(json.dumps(split))
    fgvc = root / "fgvc_aircraft"
    variants = ["707-320", "A300B4", "Cessna 172"]
    fgvc.mkdir(parents=True)
    (fgvc / "variants.txt").write_text("\n".join(variants) + "\n")
    for part in ("train", "val", "test"):
        lines = []
        for k, v in enumerate(variants):
            image_id = f"{part}{k:04d}"
            _image(fgvc / "images" / f"{image_id}.jpg", seed := seed + 1)
            lines.append(f"{image_id} {v}")
        (fgvc / f"images_variant_{part}.txt").write_text("\n".join(lines) + "\n")
    net = root / "imagenet"
    net.mkdir()
    (net / "classnames.txt").write_text("n01440764 tench\nn01443537 goldfish\n")
    for part in ("train", "val"):
        for wnid in ("n01443537", "n01440764"):
            _image(net / "images" / part / wnid / f"{part}.JPEG", seed := seed + 1)
    return root


@pytest.fixture(scope="module")
def coop_root(tmp_path_factory):
    return make_coop_root(tmp_path_factory.mktemp("coop"))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return vl_models.build("clip", tmp_path_factory.mktemp("clip") / "model")


def test_split_file_reader(coop_root):
    test = load_coop_split(coop_root, "caltech101", "test", "evaluation.caltech101")
    assert test.classnames == ("face", "leopard cat", "motorbike")  # "_" -> " ", as zsclip.py formats them
    assert test.labels == [0, 0, 1, 1, 2, 2]
    assert all(p.is_file() for p in test.image_paths)
    assert test.prompt(1, COOP_DATASETS["caltech101"].template) == "a photo of a leopard cat."
    assert len(load_coop_split(coop_root, "caltech101", "train", "calibration").labels) == 8


def test_fgvc_and_imagenet_layouts(coop_root):
    fgvc = load_coop_split(coop_root, "fgvc_aircraft", "test", "evaluation.fgvc_aircraft")
    assert fgvc.classnames == ("707-320", "A300B4", "Cessna 172") and fgvc.labels == [0, 1, 2]
    net = load_coop_split(coop_root, "imagenet", "test", "evaluation.imagenet")  # CoOp tests on val
    assert net.classnames == ("tench", "goldfish")  # sorted wnids
    assert [p.parent.name for p in net.image_paths] == ["n01440764", "n01443537"] and net.labels == [0, 1]


def test_missing_data_names_the_file_the_key_and_the_guide(coop_root, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"evaluation\.eurosat\.root.*|DATASETS\.md") as e:
        load_coop_split(coop_root, "eurosat", "test", "evaluation.eurosat")
    assert "eurosat" in str(e.value) and "DATASETS.md" in str(e.value) and "evaluation.eurosat.root" in str(e.value)
    broken = make_coop_root(tmp_path / "broken")
    next((broken / "caltech-101/101_ObjectCategories/face").glob("test_0.png")).unlink()
    with pytest.raises(FileNotFoundError, match="test_0.png"):
        load_coop_split(broken, "caltech101", "test", "evaluation.caltech101")
    with pytest.raises(ValueError, match="unknown CoOp data set"):
        load_coop_split(coop_root, "cifar10", "test", "evaluation.x")


def test_context_padding_changes_the_statistics_not_the_loss(coop_root, tiny_clip):
    """The authors' captions are padded to the whole context without a padding mask: the pooled
    end-of-text embedding, hence the contrastive loss, is the same as with padding masked out,
    while every context position now enters the layer statistics."""
    from ecoflap.models.processors import load_processors
    from ecoflap.models.registry import adapter_for
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(tiny_clip).eval()
    adapter, procs = adapter_for(model), load_processors(tiny_clip)
    images = [Image.open(p).convert("RGB") for p in load_coop_split(coop_root, "caltech101", "test", "e").image_paths]
    captions = ["a photo of a face.", "a photo of a leopard cat, spotted", "a photo of a motorbike."] * 2
    masked = adapter.calibration_batch(model, procs, images, captions, "")
    padded = adapter.context_padded_batch(model, procs, images, captions)
    context = model.config.text_config.max_position_embeddings
    assert padded["input_ids"].shape == (6, context) and bool(padded["attention_mask"].all())
    assert masked["input_ids"].shape[1] < context and not bool(masked["attention_mask"].all())
    n = masked["attention_mask"].sum(1)
    assert torch.equal(padded["input_ids"][:, : masked["input_ids"].shape[1]] * masked["attention_mask"],
                       masked["input_ids"] * masked["attention_mask"])
    assert int(padded["input_ids"][0, n[0]:].abs().sum()) == 0  # token 0 after the caption
    with torch.no_grad():
        assert torch.allclose(adapter.loss(model, masked), adapter.loss(model, padded), atol=1e-5)


def test_coop_calibration_batches(coop_root, tiny_clip):
    from ecoflap.models.image_calibration import build_image_caption_calibration

    paths = {"root": str(coop_root)}
    a = build_image_caption_calibration(tiny_clip, "coop", 4, 0, paths, protocol="coop", coop_dataset="caltech101")
    b = build_image_caption_calibration(tiny_clip, "coop", 4, 0, paths, protocol="coop", coop_dataset="caltech101")
    assert all(torch.equal(a[k], b[k]) for k in a)  # seeded: the same images, crops and flips
    assert a["pixel_values"].shape == (4, 3, 32, 32) and bool(a["attention_mask"].all())
    c = build_image_caption_calibration(tiny_clip, "coop", 4, 0, paths, protocol="caption", coop_dataset="caltech101")
    assert not torch.equal(a["pixel_values"], c["pixel_values"])  # evaluation processor, no crop
    assert c["input_ids"].shape[1] < a["input_ids"].shape[1]
    with pytest.raises(ValueError, match="fewer than calibration.n_samples"):
        build_image_caption_calibration(tiny_clip, "coop", 9, 0, paths, protocol="coop", coop_dataset="caltech101")
    with pytest.raises(ValueError, match="needs calibration.dataset"):
        build_image_caption_calibration(tiny_clip, "coop", 4, 0, paths, protocol="coop")


def test_zero_shot_classification_on_a_test_split(coop_root, tiny_clip):
    from ecoflap.evaluation.vision_language import _classification_set, evaluate_vision_language
    from ecoflap.models.processors import load_processors
    from ecoflap.models.registry import adapter_for
    from transformers import CLIPModel

    spec = {"task": "classification", "dataset": "caltech101", "root": str(coop_root), "split": "test",
            "batch_size": 4}
    _, labels, names, templates = _classification_set({**spec, "limit": 3})
    assert labels == [0, 1, 2] and templates == ("a photo of a {}.",)  # a limit spans the classes
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    metrics, _ = evaluate_vision_language(model, load_processors(tiny_clip), adapter_for(model), spec)
    assert 0 <= metrics["top1"] <= 100 and metrics["dataset"] == "caltech101"
    with pytest.raises(ValueError, match="templates: coop"):
        _classification_set({**spec, "templates": "ensemble"})


def test_config_rules_for_the_coop_source():
    from ecoflap.config import ConfigError, validate_config

    base = yaml.safe_load(open("config/paper/clip_table.yaml"))
    validate_config(base)
    bad = json.loads(json.dumps(base))
    bad["models"]["clip-b16-caltech101"]["calibration"] = {"source": "cc3m", "pairs": "x", "protocol": "coop"}
    with pytest.raises(ConfigError, match="protocol coop goes with source coop"):
        validate_config(bad)
    bad = json.loads(json.dumps(base))
    del bad["models"]["clip-b16-caltech101"]["calibration"]["dataset"]
    with pytest.raises(ConfigError, match="calibration.dataset"):
        validate_config(bad)


def test_workflow_on_a_tiny_clip(coop_root, tiny_clip, tmp_path):
    """Calibration on Caltech101's train split, ECoFLaP (the paper's zeroth-order estimator) and
    Wanda at 0.4, evaluation on its test split; EuroSAT's files are absent, so its job fails with
    the folder, the config key and where to get it, and the rest finishes (--keep-going)."""
    import pandas as pd

    entry = {"source": "local", "path": str(tiny_clip), "family": "clip", "evaluate": ["caltech101", "eurosat"],
             "calibration": {"dataset": "caltech101"}}
    config = {
        "models": {"tiny-clip": entry}, "device": "cpu", "dtype": "float32", "threads": 1, "seed": 0,
        "sparsities": [0.4],
        "calibration": {"source": "coop", "root": str(coop_root), "protocol": "coop", "n_samples": 8},
        "scorers": {"zo": {"kind": "zeroth_order", "granularity": "block", "perturb": "tensor",
                           "reuse_block_inputs": False, "n_samples": 4, "batch_size": 2}},
        "methods": {"dense": {"pruner": "none"}, "wanda": {"pruner": "wanda"},
                    "ecoflap_zo_wanda": {"pruner": "wanda", "allocation": "ecoflap", "scorer": "zo",
                                         "max_sparsity_offset": 0.1}},
        "pruning": {"batch_size": 4},
        "evaluation": {name: {"task": "classification", "dataset": name, "root": str(coop_root), "batch_size": 4}
                       for name in ("caltech101", "eurosat")},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    out = run_snakemake(tmp_path, tmp_path / "c.yaml", "--cores", "2", "--keep-going", timeout=900)
    assert out.returncode != 0  # EuroSAT's evaluations fail
    results = tmp_path / "results/tiny-clip"
    for row in ("dense/0", "wanda/0.4", "ecoflap_zo_wanda/0.4"):
        scores = json.loads((results / row / "eval/caltech101.json").read_text())
        assert 0 <= scores["metrics"]["top1"] <= 100, row
        assert not (results / row / "eval/eurosat.json").exists()
    log = (results / "dense/0/logs/eurosat.log").read_text()
    assert "evaluation.eurosat.root" in log and "DATASETS.md" in log and "eurosat" in log
    meta = json.loads((results / "ecoflap_zo_wanda/0.4/pruning.json").read_text())
    assert abs(meta["global_sparsity"] - 0.4) < 0.01
    summary = pd.read_csv(results / "summary/summary.csv") if (results / "summary/summary.csv").exists() else None
    assert summary is None  # the aggregate waits for every evaluation, EuroSAT's included

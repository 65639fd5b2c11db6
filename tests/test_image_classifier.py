"""Image classifiers (ViT, DeiT; family image_classifier) on tiny models built in code: labelled
calibration, the loss and the evaluation logits equal the model's own, the ImageNet training
folder reader, the config checks, and the whole workflow under Snakemake on the vendored
Fashion-MNIST images."""
import json
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import REPO, run_snakemake

CPU = torch.device("cpu")
FIX = REPO / "tests" / "fixtures" / "vl"


def build_tiny_classifier(out, kind: str = "vit", num_labels: int = 10, seed: int = 0):
    """A 2-block ViT (or DeiT with its distillation head) at 32 x 32 pixels, with its image processor."""
    import transformers as T

    torch.manual_seed(seed)
    common = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, num_labels=num_labels)
    if kind == "vit":
        model = T.ViTForImageClassification(T.ViTConfig(**common))
    else:
        model = T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(**common))
    with torch.no_grad():  # spread the blocks apart, so that an allocation has something to tell
        for i, block in enumerate(model.base_model.layers):
            for p in block.parameters():
                if p.dim() == 2:
                    p.mul_(1 + i)
    model.eval().save_pretrained(out)
    T.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    return build_tiny_classifier(tmp_path_factory.mktemp("tiny_vit"))


def _load(path):
    from ecoflap.models.loading import load_model
    from ecoflap.models.registry import adapter_for

    model, procs = load_model(path, CPU, torch.float32, family="image_classifier")
    return model, procs, adapter_for(model, "image_classifier")


@pytest.mark.parametrize("kind", ["vit", "deit"])
def test_layout_loss_and_logits_are_the_models_own(kind, tmp_path):
    from ecoflap.data import fashion_mnist as fm
    from ecoflap.models.image_calibration import build_image_caption_calibration
    from ecoflap.models.layout import layout_of_folder

    path = build_tiny_classifier(tmp_path / kind, kind)
    laid = layout_of_folder(path)
    base = "vit" if kind == "vit" else "deit"
    assert laid["family"] == "image_classifier"
    assert list(laid["layout"]) == [f"{base}.layers.{i}" for i in range(2)]
    model, procs, adapter = _load(path)
    assert procs.tokenizer is None
    batch = build_image_caption_calibration(path, "fashion-mnist", 6, 0, {})
    pairs = fm.labelled_pairs(6, 0)
    assert batch["labels"].tolist() == [y for _, y in pairs]
    own = model(pixel_values=batch["pixel_values"]).logits
    assert torch.equal(adapter.loss(model, batch), F.cross_entropy(own, batch["labels"]))
    assert torch.equal(adapter.classify(model, procs, [im for im, _ in pairs]), own)


def test_top1_is_the_argmax_of_the_models_logits(vit_dir):
    from ecoflap.data import fashion_mnist as fm
    from ecoflap.evaluation.vision_language import evaluate_vision_language

    model, procs, adapter = _load(vit_dir)
    metrics, _ = evaluate_vision_language(model, procs, adapter, {"task": "classification",
                                                                 "dataset": "fashion_mnist", "limit": 40,
                                                                 "batch_size": 16})
    images, labels = fm.load_split("test")
    pix = procs.pixels([fm.to_image(a) for a in images[:40]])
    with torch.no_grad():
        top1 = (model(pixel_values=pix).logits.argmax(-1) == torch.tensor(labels[:40].astype("int64"))).float().mean()
    assert metrics["top1"] == pytest.approx(100 * top1.item())


def test_a_classifier_with_other_classes_is_refused(tmp_path):
    from ecoflap.evaluation.vision_language import evaluate_vision_language

    model, procs, adapter = _load(build_tiny_classifier(tmp_path / "c5", num_labels=5))
    with pytest.raises(ValueError, match="predicts 5 classes and fashion_mnist has 10"):
        evaluate_vision_language(model, procs, adapter, {"task": "classification", "dataset": "fashion_mnist",
                                                         "limit": 4})


def test_imagenet_training_folder_gives_labels_by_wnid(tmp_path):
    from ecoflap.data.imagenet_classes import WNID_TO_INDEX
    from ecoflap.data.pairs import load_imagenet_train

    root = FIX / "imagenet" / "val"  # the fixture's per-wnid layout is the training set's too
    picks = load_imagenet_train(root, 3, seed=0)
    assert len(picks) == 3 and all(p.label == WNID_TO_INDEX[p.image_path.parent.name] for p in picks)
    assert [p.image_path for p in load_imagenet_train(root, 3, seed=0)] == [p.image_path for p in picks]
    with pytest.raises(FileNotFoundError, match="calibration.train_dir"):
        load_imagenet_train(tmp_path / "absent", 3)
    with pytest.raises(ValueError, match="fewer than calibration.n_samples"):
        load_imagenet_train(root, 10_000)


def test_config_checks_for_the_family(vit_dir):
    from ecoflap.config import ConfigError, validate_config

    cfg = classifier_config(vit_dir)
    validate_config(cfg)
    cfg["calibration"] = {"source": "cc3m", "pairs": "x.tsv", "n_samples": 4}
    with pytest.raises(ConfigError, match="labelled images"):
        validate_config(cfg)
    clip = classifier_config(vit_dir)
    clip["models"]["vit"]["family"] = "clip"
    clip["calibration"] = {"source": "imagenet", "train_dir": "train", "n_samples": 4}
    with pytest.raises(ConfigError, match="class labels only"):
        validate_config(clip)


def classifier_config(model_dir):
    return {
        "models": {"vit": {"source": "local", "path": str(model_dir), "family": "image_classifier"}},
        "device": "cpu", "dtype": "float32", "threads": 1, "seed": 0, "sparsities": [0.5],
        "calibration": {"source": "fashion-mnist", "n_samples": 8},
        "scorers": {"zo": {"kind": "zeroth_order", "granularity": "block", "reuse_block_inputs": False,
                           "n_samples": 4, "batch_size": 4}},
        "methods": {
            "dense": {"pruner": "none"},
            "wanda": {"pruner": "wanda"},
            "ecoflap_zo_wanda": {"pruner": "wanda", "allocation": "ecoflap", "scorer": "zo"},
        },
        "pruning": {"n_samples": 8, "batch_size": 4},
        "evaluation": {"fashion": {"task": "classification", "dataset": "fashion_mnist", "limit": 40}},
    }


def test_workflow_end_to_end(vit_dir, tmp_path):
    (tmp_path / "vit.yaml").write_text(yaml.safe_dump(classifier_config(vit_dir)))
    out = run_snakemake(tmp_path, tmp_path / "vit.yaml", "--cores", "2")
    assert out.returncode == 0, out.stderr[-4000:]
    table = pd.read_csv(tmp_path / "results/vit/summary/summary.csv")
    assert set(table["method"]) == {"dense", "wanda", "ecoflap_zo_wanda"}
    assert table["fashion top1"].between(0, 100).all()
    pruned = table[table["method"] != "dense"]
    assert (pruned["achieved_sparsity"].sub(0.5).abs() < 5e-3).all()
    alloc = json.loads((tmp_path / "results/vit/ecoflap_zo_wanda/0.5/allocation.json").read_text())
    assert set(alloc["unit_sparsity"]) == {"vit.layers.0", "vit.layers.1"}
    assert max(alloc["unit_sparsity"].values()) - min(alloc["unit_sparsity"].values()) > 0.005


def test_hub_config_dry_run(tmp_path):
    out = run_snakemake(tmp_path, REPO / "config/hub/vit_imagenet.yaml", "-n", "-p", "--cores", "1", timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    for model in ("vit-b16", "deit-b16-distilled"):
        assert f"results/{model}/ecoflap_zo_wanda/0.6/eval/imagenet.json" in text
    assert "--train-dir data/imagenet/train" in text or '"train_dir": "data/imagenet/train"' in text

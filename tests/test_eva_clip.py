"""EVA-CLIP (family eva_clip) in the core environment: open_clip itself cannot be imported here (it
needs torchvision), so these tests run our plumbing against a test double of open_clip's API
(tests/fake_open_clip) that builds a toy model with EVA01-g-14's vision module tree and names.
What they check: a missing open_clip names the environment to use; an open_clip hub folder is
converted, laid out and loaded strictly; the q/v-bias quirk of timm's attention is switched so
that hooks see the qkv input without changing the output; the calibration loss is the authors';
and the workflow runs the model's jobs with the interpreter its config entry names."""
import json
import os
import sys

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file

from conftest import REPO, run_snakemake

FAKE = REPO / "tests" / "fake_open_clip"
IMAGENET = REPO / "tests" / "fixtures" / "vl" / "imagenet" / "val"
CONFIG = {
    "model_cfg": {"embed_dim": 16,
                  "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 4,
                                 "mlp_hidden": 64},
                  "text_cfg": {"context_length": 16, "vocab_size": 512, "width": 32, "heads": 4, "layers": 1}},
    "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
                       "interpolation": "bicubic", "resize_mode": "shortest"},
}


@pytest.fixture
def fake_open_clip(monkeypatch):
    monkeypatch.syspath_prepend(str(FAKE))
    yield
    sys.modules.pop("open_clip", None)


def make_hub_folder(out, seed=0, timm_files=True):
    """What the hub holds for an open_clip EVA model: open_clip's config and safetensors weights,
    beside (timm_files) timm's vision-only config.json and model.safetensors."""
    sys.path.insert(0, str(FAKE))
    try:
        import open_clip

        out.mkdir(parents=True)
        (out / "tiny-eva.json").write_text(json.dumps(CONFIG["model_cfg"]))
        open_clip.add_model_config(out / "tiny-eva.json")
        (out / "tiny-eva.json").unlink()
        torch.manual_seed(seed)
        model = open_clip.create_model("tiny-eva")
    finally:
        sys.path.remove(str(FAKE))
        sys.modules.pop("open_clip", None)
    with torch.no_grad():  # blocks of different scales, so the allocation has something to tell apart
        for i, block in enumerate(model.visual.trunk.blocks):
            for p in block.parameters():
                p.mul_(0.5 + i)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "open_clip_model.safetensors")
    (out / "open_clip_config.json").write_text(json.dumps(CONFIG))
    if timm_files:
        (out / "config.json").write_text(json.dumps({"architecture": "eva_giant_patch14_clip_224"}))
        save_file({"head.weight": torch.zeros(2, 2)}, out / "model.safetensors")
    return out


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory):
    return make_hub_folder(tmp_path_factory.mktemp("eva") / "hub")


@pytest.fixture
def model_dir(hub_folder, tmp_path):
    from ecoflap.models.loading import fetch_model

    fetch_model({"source": "local", "path": str(hub_folder)}, tmp_path / "model")
    return tmp_path / "model"


def test_without_open_clip_the_error_names_the_environment(model_dir, monkeypatch):
    from ecoflap.models.layout import layout_of_folder

    monkeypatch.setitem(sys.modules, "open_clip", None)  # as in the core environment
    with pytest.raises(ImportError, match=r"setup_env\.sh --eva.*models\.<name>\.python"):
        layout_of_folder(model_dir)


def test_the_hub_folder_is_converted_and_laid_out(model_dir, fake_open_clip):
    from safetensors import safe_open

    from ecoflap.models.layout import layout_of_folder

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        assert "visual.trunk.blocks.0.attn.qkv.weight" in f.keys()  # open_clip's weights, renamed
    assert (model_dir / "timm_model.safetensors").exists() and (model_dir / "timm_config.json").exists()
    assert not (model_dir / "config.json").exists()
    laid = layout_of_folder(model_dir)
    assert laid["family"] == "eva_clip" and laid["architecture"] == "CustomTextCLIP"
    assert list(laid["layout"]) == ["visual.trunk.blocks.0", "visual.trunk.blocks.1"]
    assert laid["layout"]["visual.trunk.blocks.0"] == {
        "visual.trunk.blocks.0.attn.qkv": 32 * 96, "visual.trunk.blocks.0.attn.proj": 32 * 32,
        "visual.trunk.blocks.0.mlp.fc1": 32 * 64, "visual.trunk.blocks.0.mlp.fc2": 64 * 32}
    assert set(laid["submodel_of_block"].values()) == {"vision"}  # the text tower is not pruned


def test_loading_makes_the_qkv_linear_visible_to_hooks_without_changing_outputs(model_dir, fake_open_clip):
    from ecoflap.models.loading import load_model

    model, procs = load_model(model_dir, torch.device("cpu"), torch.float32, family="eva_clip")
    attn = model.visual.trunk.blocks[0].attn
    assert attn.qkv_bias_separate
    seen = []
    handle = attn.qkv.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        separate = model.encode_image(x)
        handle.remove()
        for block in model.visual.trunk.blocks:
            block.attn.qkv_bias_separate = False  # timm's default: the hook would see nothing
        fused = model.encode_image(x)
    assert seen == [(2, 17, 32)]
    assert torch.allclose(separate, fused, atol=1e-5)
    with pytest.raises(ValueError, match="family 'clip'"):
        load_model(model_dir, torch.device("cpu"), torch.float32, family="clip")


def test_a_weight_file_that_disagrees_with_the_config_is_refused(hub_folder, tmp_path, fake_open_clip):
    from ecoflap.models.loading import fetch_model, load_model

    fetch_model({"source": "local", "path": str(hub_folder)}, tmp_path / "m")
    config = json.loads((tmp_path / "m/open_clip_config.json").read_text())
    config["model_cfg"]["vision_cfg"]["layers"] = 3
    (tmp_path / "m/open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="open_clip_config.json differs from when it was written"):
        load_model(tmp_path / "m", torch.device("cpu"), torch.float32)
    os.remove(tmp_path / "m/ecoflap_checksums.json")  # a user's own folder, never recorded
    with pytest.raises(ValueError, match="do not match open_clip_config.json"):
        load_model(tmp_path / "m", torch.device("cpu"), torch.float32)


def test_calibration_loss_is_the_cross_entropy_of_cosine_similarities(model_dir, fake_open_clip):
    from PIL import Image

    from ecoflap.models.families.eva_clip import zero_shot_classifier
    from ecoflap.models.loading import load_model
    from ecoflap.models.registry import adapter_for

    model, procs = load_model(model_dir, torch.device("cpu"), torch.float32)
    adapter = adapter_for(model)
    images = [Image.open(p).convert("RGB") for p in sorted(IMAGENET.rglob("*.JPEG"))[:3]]
    batch = adapter.labelled_batch(model, procs, images, [0, 1, 975])
    classifier = zero_shot_classifier(model)
    assert classifier.shape == (1000, 16) and torch.allclose(classifier.norm(dim=-1), torch.ones(1000))
    tokens = procs.tokenizer([t.format(model.config.classnames[1]) for t in model.config.templates])
    by_hand = F.normalize(F.normalize(model.encode_text(tokens), dim=-1).mean(0), dim=-1)
    assert torch.allclose(classifier[1], by_hand, atol=1e-6)
    with torch.no_grad():
        feats = F.normalize(model.encode_image(batch["pixel_values"]), dim=-1)
        expected = F.cross_entropy(feats @ classifier.t(), batch["labels"])  # temperature 1, as loss_vision
        assert torch.allclose(adapter.loss(model, batch), expected)
        assert torch.equal(adapter.classify(model, procs, images).argmax(1), (feats @ classifier.t()).argmax(1))


def test_a_template_set_the_zero_shot_head_does_not_use_is_refused(model_dir, fake_open_clip):
    """EVA-CLIP classifies with the prompts of its own zero-shot head (CLIP's 80): an entry asking
    for the 7 simple ones was evaluated with the 80 and said nothing."""
    from ecoflap.evaluation.vision_language import evaluate_vision_language
    from ecoflap.models.loading import load_model
    from ecoflap.models.registry import adapter_for

    model, procs = load_model(model_dir, torch.device("cpu"), torch.float32)
    spec = {"task": "classification", "dataset": "imagenet", "name": "imagenet", "val_dir": str(IMAGENET),
            "limit": 2, "batch_size": 2}
    with pytest.raises(ValueError, match="templates: simple would not apply; remove it"):
        evaluate_vision_language(model, procs, adapter_for(model), {**spec, "templates": "simple"})
    metrics, _ = evaluate_vision_language(model, procs, adapter_for(model), {**spec, "templates": "ensemble"})
    assert 0 <= metrics["top1"] <= 100


def test_workflow_runs_the_model_with_its_own_interpreter(tmp_path):
    """The model's jobs run with `models.<name>.python` (here a wrapper that puts the test double
    on the path; Snakemake's own interpreter has no open_clip): download, layout, ImageNet
    calibration in folder order, zeroth-order scores, ECoFLaP and Wanda (whole-matrix groups,
    as the authors' EVA pruner) at 0.5, the pruned checkpoint reloaded and evaluated."""
    hub_folder = make_hub_folder(tmp_path / "hub", timm_files=False)  # open_clip's files alone
    wrapper = tmp_path / "python-eva"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH="{FAKE}${{PYTHONPATH:+:$PYTHONPATH}}" exec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    config = {
        "models": {"tiny-eva": {"source": "local", "path": str(hub_folder), "family": "eva_clip",
                                "python": str(wrapper)}},
        "device": "cpu", "dtype": "float32", "threads": 1, "seed": 0, "sparsities": [0.5],
        "calibration": {"source": "imagenet", "train_dir": str(IMAGENET), "protocol": "ecoflap", "n_samples": 4},
        "scorers": {"zo": {"kind": "zeroth_order", "granularity": "block", "perturb": "tensor",
                           "reuse_block_inputs": False, "n_samples": 4, "batch_size": 2}},
        "methods": {"dense": {"pruner": "none"}, "wanda": {"pruner": "wanda"},
                    "ecoflap_zo_wanda": {"pruner": "wanda", "allocation": "ecoflap", "scorer": "zo",
                                         "max_sparsity_offset": 0.1},
                    # the authors' evaluation puts the last vision block back dense
                    "ecoflap_zo_wanda_last_dense": {"pruner": "wanda", "allocation": "ecoflap", "scorer": "zo",
                                                    "max_sparsity_offset": 0.1,
                                                    "dense_blocks": ["visual.trunk.blocks.1"]}},
        "pruning": {"batch_size": 2, "comparison": {"vision": "matrix"}},
        "evaluation": {"imagenet": {"task": "classification", "dataset": "imagenet", "val_dir": str(IMAGENET),
                                    "limit": 4, "batch_size": 2}},
    }
    (tmp_path / "eva.yaml").write_text(yaml.safe_dump(config))
    out = run_snakemake(tmp_path, tmp_path / "eva.yaml", "--cores", "2", timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    table = pd.read_csv(tmp_path / "results/tiny-eva/summary/summary.csv")
    assert set(table["method"]) == {"dense", "wanda", "ecoflap_zo_wanda", "ecoflap_zo_wanda_last_dense"}
    assert table["imagenet top1"].between(0, 100).all()
    pruned = table[table["method"].isin(["wanda", "ecoflap_zo_wanda"])]
    assert (pruned["achieved_sparsity"].sub(0.5).abs() < 5e-3).all()
    full = json.loads((tmp_path / "results/tiny-eva/ecoflap_zo_wanda/0.5/pruning.json").read_text())
    last = json.loads((tmp_path / "results/tiny-eva/ecoflap_zo_wanda_last_dense/0.5/pruning.json").read_text())
    block1 = [k for k in full["layer_sparsity"] if k.startswith("visual.trunk.blocks.1.")]
    assert all(last["layer_sparsity"][k] == 0 for k in block1) and all(full["layer_sparsity"][k] > 0 for k in block1)
    assert all(abs(last["layer_sparsity"][k] - full["layer_sparsity"][k]) < 1e-3
               for k in full["layer_sparsity"] if k not in block1)  # block 0: the same mask
    alloc = json.loads((tmp_path / "results/tiny-eva/ecoflap_zo_wanda/0.5/allocation.json").read_text())
    assert set(alloc["unit_sparsity"]) == {"visual.trunk.blocks.0", "visual.trunk.blocks.1"}
    assert max(alloc["unit_sparsity"].values()) - min(alloc["unit_sparsity"].values()) > 0.005
    checkpoint = tmp_path / "results/tiny-eva/wanda/0.5/model"
    assert (checkpoint / "open_clip_config.json").exists() and (checkpoint / "model.safetensors.index.json").exists()

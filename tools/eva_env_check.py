"""The EVA-CLIP environment check: the family eva_clip with the real open_clip, timm and torchvision
(.venv-eva), which the core environment cannot import. No hub access is needed.

  bash workflow/scripts/setup_env.sh --eva
  .venv-eva/bin/python tools/eva_env_check.py --out /tmp/eva_check

  A. open_clip's EVA01-g-14 built on the meta device from its own model config: our layout of it
     (40 vision blocks of attn.qkv / attn.proj / mlp.fc1 / mlp.fc2 at the published sizes).
  B. A toy EVA01-layout trunk registered with timm (EVA01-g-14's block code at width 64, 2 blocks)
     inside a real open_clip model: timm's fused q/v bias switched by our loader, so a hook on
     attn.qkv fires, with the same output.
  C. That toy model through the Snakemake workflow, its jobs run by this environment's interpreter
     (models.<name>.python): calibration on ImageNet images in folder order, zeroth-order scores,
     ECoFLaP and Wanda (whole-matrix groups) at 0.5, the pruned checkpoint reloaded, zero-shot
     ImageNet on the fixture images; then our zero-shot logits beside open_clip's own recipe
     (its transform, its tokenizer, the 80-prompt classifier) on the pruned checkpoint.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
IMAGENET = REPO / "tests" / "fixtures" / "vl" / "imagenet" / "val"
TINY = "ecoflap_eva01_tiny_patch14_224"

# registers the toy trunk in every process that imports it (the workflow's jobs, through the launcher)
REGISTER = f'''
from timm.models import register_model
from timm.models.eva import _create_eva


@register_model
def {TINY}(pretrained=False, **kwargs):
    """EVA01-g/14's block code (eva_giant_patch14_224) at toy width and depth."""
    args = dict(patch_size=14, embed_dim=64, depth=2, num_heads=4, mlp_ratio=6144 / 1408)
    return _create_eva("eva_giant_patch14_224", pretrained=False, **dict(args, **kwargs))
'''
LAUNCH = '''import runpy
import sys

import ecoflap_tiny_eva  # noqa: F401  (registers the toy trunk with timm)

assert sys.argv[1] == "-m", sys.argv
module, sys.argv = sys.argv[2], [sys.argv[2], *sys.argv[3:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
'''


def section_a() -> dict:
    import open_clip

    from ecoflap.models.layout import layout_of_folder

    with tempfile.TemporaryDirectory() as tmp:
        cfg = {"model_cfg": open_clip.get_model_config("EVA01-g-14"), "preprocess_cfg": {}}
        (Path(tmp) / "open_clip_config.json").write_text(json.dumps(cfg))
        laid = layout_of_folder(tmp)
    blocks = laid["layout"]
    first = blocks["visual.trunk.blocks.0"]
    return {"family": laid["family"], "architecture": laid["architecture"], "blocks": len(blocks),
            "layers_per_block": {k.rsplit("blocks.0.", 1)[1]: v for k, v in first.items()},
            "prunable_weights": sum(sum(b.values()) for b in blocks.values())}


def build_tiny_folder(out: Path) -> None:
    import open_clip

    cfg = {"embed_dim": 32,
           "vision_cfg": {"image_size": 224, "timm_model_name": TINY, "timm_model_pretrained": False,
                          "timm_pool": "token", "timm_proj": None},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 1},
           "custom_text": True}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tiny-eva.json").write_text(json.dumps(cfg))
        open_clip.add_model_config(tmp)
        torch.manual_seed(0)
        model = open_clip.create_model("tiny-eva", pretrained=None)
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "open_clip_model.safetensors")
    preprocess = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
                  "interpolation": "bicubic", "resize_mode": "shortest"}
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess}))


def section_b(folder: Path, work: Path) -> dict:
    from ecoflap.models.loading import fetch_model, load_model

    fetch_model({"source": "local", "path": str(folder)}, work / "b_model")
    model, _ = load_model(work / "b_model", torch.device("cpu"), torch.float32, family="eva_clip")
    attn = model.visual.trunk.blocks[0].attn
    seen = []
    handle = attn.qkv.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        separate = model.encode_image(x)
        handle.remove()
        for block in model.visual.trunk.blocks:
            block.attn.qkv_bias_separate = False
        fused = model.encode_image(x)
    return {"hook_saw_qkv_input": seen, "max_abs_diff_separate_vs_fused": float((separate - fused).abs().max())}


def section_c(folder: Path, work: Path) -> dict:
    launcher = work / "python-eva"
    (work / "ecoflap_tiny_eva.py").write_text(REGISTER)
    (work / "launch.py").write_text(LAUNCH)
    launcher.write_text(f'#!/bin/sh\nPYTHONPATH="{work}${{PYTHONPATH:+:$PYTHONPATH}}" exec "{sys.executable}" '
                        f'"{work / "launch.py"}" "$@"\n')
    launcher.chmod(0o755)
    config = {
        "models": {"tiny-eva": {"source": "local", "path": str(folder), "family": "eva_clip",
                                "python": str(launcher)}},
        "device": "cpu", "dtype": "float32", "threads": 1, "seed": 0, "sparsities": [0.5],
        "calibration": {"source": "imagenet", "train_dir": str(IMAGENET), "protocol": "ecoflap", "n_samples": 4},
        "scorers": {"zo": {"kind": "zeroth_order", "granularity": "block", "perturb": "tensor",
                           "reuse_block_inputs": False, "n_samples": 4, "batch_size": 2}},
        "methods": {"dense": {"pruner": "none"}, "wanda": {"pruner": "wanda"},
                    "ecoflap_zo_wanda": {"pruner": "wanda", "allocation": "ecoflap", "scorer": "zo",
                                         "max_sparsity_offset": 0.1}},
        "pruning": {"batch_size": 2, "comparison": {"vision": "matrix"}},
        "evaluation": {"imagenet": {"task": "classification", "dataset": "imagenet", "val_dir": str(IMAGENET),
                                    "limit": 5, "batch_size": 5}},
    }
    import yaml

    (work / "eva.yaml").write_text(yaml.safe_dump(config))
    core = REPO / ".venv" / "bin" / "python"
    out = subprocess.run([str(core), "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(work),
                          "--cores", "2", "--configfile", str(work / "eva.yaml")], capture_output=True, text=True)
    if out.returncode != 0:
        return {"workflow": "failed", "stderr": out.stderr[-3000:]}
    import pandas as pd

    table = pd.read_csv(work / "results/tiny-eva/summary/summary.csv")
    summary = table[["method", "sparsity", "achieved_sparsity", "imagenet top1", "imagenet top5"]]
    return {"workflow": "ok", "summary": summary.to_dict(orient="records"),
            "parity": parity(work / "results/tiny-eva/ecoflap_zo_wanda/0.5/model", work)}


def parity(checkpoint: Path, work: Path) -> dict:
    """Our zero-shot logits on the pruned checkpoint beside open_clip's own recipe."""
    sys.path.insert(0, str(work))
    import ecoflap_tiny_eva  # noqa: F401  (the toy trunk, registered in this process too)
    import open_clip
    import torch.nn.functional as F
    from PIL import Image

    from ecoflap.data.imagenet_classes import IMAGENET_CLASSNAMES, IMAGENET_TEMPLATES
    from ecoflap.models.loading import load_model
    from ecoflap.models.registry import adapter_for
    from ecoflap.models.shards import CheckpointFiles

    ours, procs = load_model(checkpoint, torch.device("cpu"), torch.float32)
    images = [Image.open(p).convert("RGB") for p in sorted(IMAGENET.rglob("*.JPEG"))]
    our_logits = adapter_for(ours).classify(ours, procs, images)

    cfg = json.loads((checkpoint / "open_clip_config.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "native.json").write_text(json.dumps(cfg["model_cfg"]))
        open_clip.add_model_config(tmp)
        native, _, preprocess = open_clip.create_model_and_transforms("native", pretrained=None)
    files = CheckpointFiles(checkpoint)
    native.load_state_dict(files.read(files.names()), strict=True)
    native.eval()
    tokenizer = open_clip.get_tokenizer("native")
    with torch.no_grad():
        rows = []
        for name in IMAGENET_CLASSNAMES:
            emb = F.normalize(native.encode_text(tokenizer([t.format(name) for t in IMAGENET_TEMPLATES])), dim=-1)
            rows.append(F.normalize(emb.mean(0), dim=-1))
        classifier = torch.stack(rows)
        feats = F.normalize(native.encode_image(torch.stack([preprocess(im) for im in images])), dim=-1)
        native_logits = 100.0 * feats @ classifier.t()
    return {"images": len(images), "max_abs_logit_diff": float((our_logits - native_logits).abs().max()),
            "same_top1": bool(torch.equal(our_logits.argmax(1), native_logits.argmax(1)))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="eva_check")
    args = parser.parse_args()
    import open_clip
    import timm
    import torchvision

    work = Path(args.out).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "ecoflap_tiny_eva.py").write_text(REGISTER)
    sys.path.insert(0, str(work))
    import ecoflap_tiny_eva  # noqa: F401  (the toy trunk, registered in this process)

    report = {"versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                           "open_clip": open_clip.__version__, "timm": timm.__version__}}
    report["A_eva01_g14_layout"] = section_a()
    build_tiny_folder(work / "hub")
    report["B_qkv_hook"] = section_b(work / "hub", work)
    report["C_workflow"] = section_c(work / "hub", work)
    text = json.dumps(report, indent=1, default=str)
    (work / "report.json").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

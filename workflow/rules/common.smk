# Shared helpers: config validation before any job is planned, the interpreter, the rows
# (method x sparsity) the config asks for, and per-rule CLI arguments.
import json
import shlex
import sys

from ecoflap.config import ConfigError, validate_config

try:
    validate_config(config)
except ConfigError as err:
    raise WorkflowError(str(err)) from None
validate(config, "../schemas/config.schema.yaml")  # fills schema defaults

PY = config.get("python") or sys.executable
GPU = config["resources"]["gpu"]
MEM = config["resources"]["mem_mb"]
EVALS = [t for t in ("perplexity", "lm_eval") if t in config["evaluation"]]


wildcard_constraints:
    model="[A-Za-z0-9_.\-]+",
    method="[A-Za-z0-9_\-]+",
    sparsity="[0-9.]+|[0-9]+of[0-9]+",
    scorer="[A-Za-z0-9_\-]+",
    task="perplexity|lm_eval",


def sparsity_label(value):
    """0.5 -> '0.5'; '2:4' -> '2of4' (no colons in paths)."""
    return value.replace(":", "of") if isinstance(value, str) else f"{value:g}"


def parse_label(label):
    """'0.5' -> (0.5, None); '2of4' -> (0.5, '2:4')."""
    if "of" in label:
        n, m = (int(x) for x in label.split("of"))
        return n / m, f"{n}:{m}"
    return float(label), None


def rows():
    """'method/sparsity' folders: dense once, every pruned method at each sparsity, and the
    N:M patterns for uniform-allocation methods that opt in."""
    out = []
    for name, m in config["methods"].items():
        if m["pruner"] == "none":
            out.append(f"{name}/0")
            continue
        labels = [sparsity_label(s) for s in config["sparsities"]]
        if m["allocation"] == "uniform" and m.get("nm", True):
            labels += [sparsity_label(p) for p in config["nm_patterns"]]
        out += [f"{name}/{lab}" for lab in labels]
    return out


def method(wc):
    return config["methods"][wc.method]


def model_spec(wc):
    return config["models"][wc.model]


def model_args(wc):
    """Arguments every model-loading CLI call shares."""
    args = f"--device {config['device']} --dtype {config['dtype']} --seed {config['seed']}"
    if model_spec(wc).get("trust_remote_code"):
        args += " --trust-remote-code"
    return args


def model_dir(wc):
    """The checkpoint a row evaluates: the downloaded model for dense, else the pruned one."""
    if method(wc)["pruner"] == "none":
        return f"results/{wc.model}/model"
    return f"results/{wc.model}/{wc.method}/{wc.sparsity}/model"

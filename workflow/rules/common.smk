# Shared helpers: config validation before any job is planned, the interpreter, the rows
# (method x sparsity) the config asks for, and per-rule CLI arguments.
import functools
import json
from pathlib import Path
import shlex
import sys

from ecoflap.config import ConfigError, evaluation_task, model_calibration, model_evaluations, validate_config
from ecoflap.models.families import IMAGE_SOURCES, TEXT_EVALS

try:
    validate_config(config)
except ConfigError as err:
    raise WorkflowError(str(err)) from None
validate(config, "../schemas/config.schema.yaml")  # fills schema defaults

PY = config.get("python") or sys.executable
# appended to every model-running rule's shell: on failure the log ends with what the exit
# status means (a job killed by a memory limit or the scheduler says so), and the job still fails
EXPLAIN_EXIT = "|| {{{{ rc=$?; {py} -m ecoflap.utils.exits $rc >> {{log}}; exit $rc; }}}}".format(py=PY)
# torch threads per job of each model-running stage (Snakemake runs jobs side by side while
# their threads fit in --cores): `threads`, unless `stage_threads` says otherwise. The stages
# before evaluation carry `priority: 1`, so a freed core is not left idle beside one
# single-threaded evaluation while a two-threaded prune waits: evaluations gather and run in pairs.
THREADS = {stage: config["stage_threads"].get(stage, config["threads"]) for stage in ("score", "prune", "evaluate")}
GPU = config["resources"]["gpu"]


def estimated(stage, key):
    """A resource (mem_mb or runtime) of a model-running job, estimated from the model's size
    (ecoflap/utils/resources.py) once the download exists; Snakemake evaluates it again just
    before the job runs. An explicit value in config (resources.mem_mb / runtime, or
    resources.by_rule.<stage>) wins; before the download, the fallback is that value or 0."""
    explicit = config["resources"]["by_rule"].get(stage, {}).get(key) or config["resources"].get(key)

    def value(wildcards, attempt):
        if explicit:
            return explicit * attempt
        folder = Path(f"results/{wildcards.model}")
        if not (folder / "layout.json").exists() or not (folder / "model" / "config.json").exists():
            return 0  # not downloaded yet: re-evaluated before the job runs
        from ecoflap.utils.resources import estimate

        params, prunable, blocks = downloaded_size(str(folder))
        on_gpu = config["device"] != "cpu" and GPU > 0
        dtype = config["dtype"] if config["dtype"] != "auto" else ("bfloat16" if on_gpu else "float32")
        offload = config["models"][wildcards.model].get("offload", config["offload"])
        pruner = method(wildcards)["pruner"] if stage == "prune" else None
        return estimate(stage, params, prunable, blocks, dtype, on_gpu, offload, stage_tokens(stage, wildcards),
                        pruner, attempt)[key]
    return value


@functools.lru_cache(maxsize=None)
def downloaded_size(folder):
    """(parameters, prunable parameters, blocks) of results/<model>: read once per Snakemake run,
    not once per job and resource (only called once the download exists)."""
    from ecoflap.utils.resources import model_size

    return model_size(Path(folder) / "model", Path(folder) / "layout.json")


def stage_tokens(stage, wc):
    """Tokens a job pushes through the model, for its runtime estimate."""
    calib = model_calibration(config, wc.model)
    seq = calib.get("seq_len", 128)
    if stage == "score":
        return config["scorers"][wc.scorer].get("n_samples", calib["n_samples"]) * seq
    if stage == "prune":
        return config["pruning"].get("n_samples", calib["n_samples"]) * seq
    ppl = config["evaluation"].get("perplexity") or {}
    return (ppl.get("max_windows") or 256) * ppl.get("seq_len", 2048) + 1_000_000  # + lm-eval / VL tasks


# Text evaluations (perplexity, lm-eval) of a row run together in one job (one process, one
# model load); each vision-language entry is a job of its own.
TEXT_ENTRIES = [name for name in TEXT_EVALS if name in config["evaluation"]]
VL_ENTRIES = [name for name in config["evaluation"] if name not in TEXT_EVALS]


wildcard_constraints:
    model="[A-Za-z0-9_.\-]+",
    method="[A-Za-z0-9_\-]+",
    sparsity="[0-9.]+|[0-9]+of[0-9]+",
    scorer="[A-Za-z0-9_\-]+",
    task="|".join(VL_ENTRIES) or "(?!)",


def evals_of(model):
    """Evaluation entries this model runs (its family's tasks, or its `evaluate:` list)."""
    return model_evaluations(config, model)


def calibration_args(wc):
    c = model_calibration(config, wc.model)
    args = [f"--source {c['source']}", f"--n-samples {c['n_samples']}", f"--seed {config['seed']}"]
    if c["source"] in IMAGE_SOURCES:
        for key in ("pairs", "image_root", "captions", "image_dir", "cache_dir"):
            if c.get(key):
                args.append(f"--{key.replace('_', '-')} {shlex.quote(str(c[key]))}")
        args.append(f"--prompt {shlex.quote(c.get('prompt', ''))}")
        args.append(f"--protocol {c['protocol']} --max-txt-len {c['max_txt_len']}")
    else:
        args.append(f"--seq-len {c['seq_len']}")
    return " ".join(args)


def maybe_temp(path):
    return path if config["pruning"]["keep_checkpoints"] else temp(path)


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
    args += f" --offload {model_spec(wc).get('offload', config['offload'])}"
    if GPU:  # each job leases its own device(s): Snakemake's gpu resource only counts them
        args += f" --gpus {GPU}"
    if model_spec(wc).get("trust_remote_code"):
        args += " --trust-remote-code"
    return args


def model_dir(wc):
    """The checkpoint a row evaluates: the downloaded model for dense, else the pruned one."""
    if method(wc)["pruner"] == "none":
        return f"results/{wc.model}/model"
    return f"results/{wc.model}/{wc.method}/{wc.sparsity}/model"


# --- CLI arguments of each stage, built from the config -------------------------------


def scorer_args(wc):
    s = config["scorers"][wc.scorer]
    n = s.get("n_samples", model_calibration(config, wc.model)["n_samples"])
    args = [f"--kind {s['kind']}", f"--n-samples {n}", f"--batch-size {s['batch_size']}"]
    if s["kind"] == "zeroth_order":
        args += [f"--granularity {s['granularity']}", f"--eps {s['eps']}"]
        args += ["--reuse-block-inputs"] if s["reuse_block_inputs"] else []
        args += [f"--perturb {s['perturb']}"] if s["perturb"] != "unit" else []
    elif s["kind"] in ("first_order", "checkpointed"):
        args += [f"--granularity {s['granularity']}", f"--reduce {s['reduce']}"]
    else:
        args += [f"--owl-m {s['m']}"]
    if "seed" in s:
        args.append(f"--seed {s['seed']}")
    return " ".join(args)


def allocation_inputs(wc):
    inputs = {"layout": f"results/{wc.model}/layout.json"}
    if method(wc)["allocation"] != "uniform":
        inputs["scores"] = f"results/{wc.model}/scores/{method(wc)['scorer']}.json"
    return inputs


def allocation_args(wc, input):
    m = method(wc)
    target, _nm = parse_label(wc.sparsity)
    args = [f"--kind {m['allocation']}", f"--target {target}"]
    if m["allocation"] != "uniform":
        args.append(f"--scores {input.scores}")
    if m["allocation"] == "ecoflap":
        args += [f"--max-sparsity-offset {m['max_sparsity_offset']}", f"--aggregation {m['aggregation']}"]
    if m["allocation"] == "owl":
        args.append(f"--owl-lambda {m['lambda']}")
    args.append(f"--scope {m['scope']}")
    if m.get("submodels"):
        args.append(f"--submodels {' '.join(m['submodels'])}")
    return " ".join(args)


def prune_args(wc):
    p = config["pruning"]
    _target, nm = parse_label(wc.sparsity)
    n = p.get("n_samples", model_calibration(config, wc.model)["n_samples"])
    args = [f"--pruner {method(wc)['pruner']}", f"--n-samples {n}", f"--batch-size {p['batch_size']}",
            f"--sparsegpt-damp {p['sparsegpt_damp']}", f"--sparsegpt-block-size {p['sparsegpt_block_size']}"]
    if nm:
        args.append(f"--nm {nm}")
    if p["comparison"]:
        groups = " ".join(f"{sub}={group}" for sub, group in p["comparison"].items())
        args.append(f"--comparison {groups}")
    return " ".join(args)


def eval_kind(wc):
    """The CLI task of an evaluation entry: perplexity, lm_eval, or a vision-language task."""
    return evaluation_task(wc.task, config["evaluation"][wc.task])


def eval_args(wc):
    """A vision-language entry, as JSON."""
    spec = json.dumps({"name": wc.task, **config["evaluation"][wc.task]})
    return f"--spec {shlex.quote(spec)}"


def text_eval_args(wc):
    """Every text entry of the config, as JSON: one process evaluates them all."""
    spec = json.dumps({name: config["evaluation"][name] for name in TEXT_ENTRIES})
    return f"--spec {shlex.quote(spec)}"

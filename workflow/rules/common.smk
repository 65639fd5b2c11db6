# Shared helpers: config validation before any job is planned, the interpreter, the rows
# (method x sparsity) the config asks for, and per-rule CLI arguments.
import functools
import json
from pathlib import Path
import shlex
import shutil
import sys

from ecoflap.catalog import (ALLOCATION_SCORERS, FAMILIES, NO_PRUNER, NO_REFINE, REFINERS, SCORERS, TEXT_EVALS,
                             TRAINED_EMBEDDED)
from ecoflap.config import (ConfigError, evaluation_task, fill_defaults, model_calibration, model_evaluations,
                            validate_config)

try:
    validate_config(config)  # the schema (completed from ecoflap/catalog.py) and the cross-references
except ConfigError as err:
    raise WorkflowError(str(err)) from None
fill_defaults(config)  # every default the schema and the catalog name

PY = config.get("python") or sys.executable


# The interpreter is no rerun trigger: a moved or recreated environment, or Snakemake started as
# .venv/bin/python3 instead of .venv/bin/python, is not a different result (each result's provenance
# records the package versions). Snakemake leaves a param out of its params trigger when its function
# takes `threads` (as it does for `input`, `output`, `resources`), hence the argument nobody reads;
# with the interpreter a tracked param, any such change redid every job of the run.
def model_python(wc, threads):
    """The interpreter of a model's jobs: its own environment where the config names one (open_clip
    models need torchvision, which the core environment lacks), else PY."""
    return config["models"][wc.model].get("python") or PY


def run_python(wc, threads):
    """The interpreter of the summaries (aggregate, seed_group): PY, untracked as model_python."""
    return PY


if config.get("python") and not shutil.which(config["python"]):  # planning works without it; jobs do not
    logger.warning(f"python: {config['python']} is not an executable here; every job would fail (exit 127): "
                   "point it at an interpreter that has the ecoflap package, or leave it out (Snakemake's)")
for _name, _spec in config["models"].items():
    if _spec.get("python") and not shutil.which(_spec["python"]):
        logger.warning(f"models.{_name}.python: {_spec['python']} is not an executable here; create that "
                       "environment (bash workflow/scripts/setup_env.sh --eva) before running this model's jobs")


def reference_file():
    """config reference:, relative to the working directory, else to the workflow's folder (the
    published tables ship in config/paper/published/); an input of the aggregate, so an edited
    table redoes the comparison, and checked here rather than by the last job of the run."""
    if not config.get("reference"):
        return None
    for base in (Path.cwd(), Path(workflow.basedir)):
        if (base / config["reference"]).is_file():
            return str((base / config["reference"]).resolve())
    raise WorkflowError(f"config key reference: {config['reference']!r} is not a file (allowed: a YAML of published "
                        f"numbers, relative to {Path.cwd()} or {workflow.basedir}, e.g. config/paper/published/)")


REFERENCE = reference_file()

# appended to every model-running rule's shell: on failure the log ends with what the exit
# status means (a job killed by a memory limit or the scheduler says so), and the job still fails;
# Snakemake's interpreter explains it, which has the package even where the jobs' `python:` does not
# (its path reaches the shell as the untracked param `explain`, as the jobs' interpreter does:
# written into the command it was part of every rule's code, and another path to the same
# Snakemake, .venv/bin/python3 for .venv/bin/python, redid every job of the run)
EXPLAIN_EXIT = "|| {{ rc=$?; {params.explain:q} -m ecoflap.utils.exits $rc >> {log}; exit $rc; }}"


def explain_python(wc, threads):
    """Snakemake's interpreter, for EXPLAIN_EXIT (untracked, as model_python)."""
    return sys.executable


# torch threads per job of each model-running stage (Snakemake runs jobs side by side while
# their threads fit in --cores): `threads`, unless `stage_threads` says otherwise, or a scorer's
# or method's own `threads`. The stages before evaluation carry `priority: 1`, so the pruned
# rows become ready early. A job wider than one core starts only when enough cores are free at
# once, and Snakemake fills a lone free core with a one-core job meanwhile; on few cores,
# single-threaded jobs pack best (config.yaml keeps two threads for SparseGPT alone).
THREADS = {stage: config["stage_threads"].get(stage, config["threads"]) for stage in ("score", "prune", "evaluate")}
GPU = config["resources"]["gpu"]


def widest_job():
    """The most threads any job of the config asks for."""
    return max([*THREADS.values(), *(e.get("threads") or 0 for e in (*config["scorers"].values(),
                                                                     *config["methods"].values()))])


# --cores caps every job's threads, on a cluster too (Snakemake passes it to each job), and
# profiles/default/profile.yaml, which Snakemake reads beside any --profile and over it, says
# cores: 2 for this machine: `--profile profiles/slurm` ran the paper configs' `threads: 8` jobs
# with 2 torch threads (and SparseGPT's masks depend on the count), saying nothing. Checked once
# the executor is known (not while the Snakefile is read), before any job is submitted.
onstart:
    if (workflow.is_main_process and not workflow.local_exec and workflow.resource_settings.cores is not None
            and workflow.resource_settings.cores < widest_job()):
        raise WorkflowError(
            f"--cores {workflow.resource_settings.cores} would run every cluster job with at most "
            f"{workflow.resource_settings.cores} threads, while the config asks for up to {widest_job()} (threads, "
            "stage_threads, a scorer's or method's threads); Snakemake reads profiles/default/profile.yaml "
            "(cores: 2, for local runs) beside --profile and over it: add --workflow-profile none, or "
            f"--cores {widest_job()}")
    if workflow.is_main_process and workflow.local_exec and workflow.resource_settings.cores is not None:
        capped = [name for name, m in config["methods"].items()
                  if m["pruner"] == "sparsegpt" and (m.get("threads") or THREADS["prune"]) > workflow.resource_settings.cores]
        if capped:  # Snakemake lowers a job's threads to --cores; SparseGPT's masks depend on the count
            logger.warning(f"--cores {workflow.resource_settings.cores} runs {', '.join(capped)} with fewer threads than "
                           "the config gives them, and SparseGPT's masks depend on the thread count (each result "
                           "records the threads it ran with): give --cores at least the config's threads to match them")


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
        from ecoflap.utils.resources import estimate, score_passes

        params, prunable, blocks = downloaded_size(str(folder))
        on_gpu = config["device"] != "cpu" and GPU > 0
        scorer = config["scorers"][wildcards.scorer] if stage == "score" else {}
        auto = (SCORERS[scorer["kind"]].auto_dtype if scorer else None) or ("bfloat16" if on_gpu else "float32")
        dtype = config["dtype"] if config["dtype"] != "auto" else auto
        offload = config["models"][wildcards.model].get("offload", config["offload"])
        pruner = method(wildcards)["pruner"] if stage == "prune" else None
        passes = score_passes(scorer, blocks, *downloaded_layers(str(folder)), config["sparsities"]) if scorer else 1.0
        return estimate(stage, params, prunable, blocks, dtype, on_gpu, offload, stage_tokens(stage, wildcards),
                        pruner, attempt, passes)[key]
    return value


def download_stamp(folder):
    """When results/<model>'s download was last written (layout.json is written last, by every
    download job): the key of the caches below, so a download redone within the run (an edited
    model entry) is read again instead of sizing its jobs from the model it replaced."""
    stat = (Path(folder) / "layout.json").stat()
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


def downloaded_layers(folder):
    """(prunable layers, blocks of the largest sub-model) of results/<model>, read once per download."""
    return _downloaded_layers(folder, download_stamp(folder))


def downloaded_size(folder):
    """(parameters, prunable parameters, blocks) of results/<model>: read once per download, not
    once per job and resource (only called once the download exists)."""
    return _downloaded_size(folder, download_stamp(folder))


@functools.lru_cache(maxsize=None)
def _downloaded_layers(folder, _stamp):
    from ecoflap.utils.resources import layout_counts

    return layout_counts(Path(folder) / "layout.json")


@functools.lru_cache(maxsize=None)
def _downloaded_size(folder, _stamp):
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
    group="[A-Za-z0-9_.\-]+",
    task="|".join(VL_ENTRIES) or "(?!)",


def evals_of(model):
    """Evaluation entries this model runs (its family's tasks, or its `evaluate:` list)."""
    return model_evaluations(config, model)


def spec_arg(entry):
    """A stage's config entry, as the CLI's --spec (every stage takes its entry this way)."""
    return f"--spec {shlex.quote(json.dumps(entry, sort_keys=True))}"


def model_seed(wc):
    """The model's own seed (a replicate in a seed group), else the run's."""
    return config["models"][wc.model].get("seed", config["seed"])


def calibration_args(wc):
    return f"{spec_arg(model_calibration(config, wc.model))} --seed {model_seed(wc)}"


def maybe_temp(path):
    return path if config["pruning"]["keep_checkpoints"] else temp(path)


# keep_checkpoints: false deletes each pruned checkpoint once its evaluations are done. The
# evaluations then outrank every earlier stage (2 over their 1), so a checkpoint is evaluated
# as soon as it is written: the disk holds about one unevaluated checkpoint per running job
# instead of every checkpoint of the sweep (63 x 0.5 GB for one SmolLM2 seed, 63 x 13 GB at 7B)
EVALUATION_PRIORITY = 0 if config["pruning"]["keep_checkpoints"] else 2


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
        if m["pruner"] == NO_PRUNER:
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


# a models: entry's keys that other stages read and the download does not: the seed (replicates
# share weights), the interpreter (a moved environment is not a different model), offload and
# activations (model_args), the calibration override and the evaluate list. Passed to the
# download, each was a params change of download_model: the model fetched again and every row
# of it redone, dense included, for a setting that changes neither the weights nor layout.json
DOWNLOAD_UNREAD = ("seed", "python", "offload", "activations", "calibration", "evaluate")


def model_args(wc):
    """Arguments every model-loading CLI call shares."""
    args = f"--device {config['device']} --dtype {config['dtype']} --seed {model_seed(wc)}"
    args += f" --offload {model_spec(wc).get('offload', config['offload'])}"
    args += f" --activations {model_spec(wc).get('activations', config['activations'])}"
    if GPU:  # each job leases its own device(s): Snakemake's gpu resource only counts them
        args += f" --gpus {GPU}"
    if model_spec(wc).get("trust_remote_code"):
        args += " --trust-remote-code"
    return args + f" --family {model_spec(wc).get('family', 'causal_lm')}"


def model_dir(wc):
    """The checkpoint a row evaluates: the downloaded model for dense, else the pruned one."""
    if method(wc)["pruner"] == NO_PRUNER:
        return f"results/{wc.model}/model"
    return f"results/{wc.model}/{wc.method}/{wc.sparsity}/model"


# --- CLI arguments of each stage, built from the config -------------------------------


def scorer_args(wc):
    """The scorers: entry; n_samples resolved against the model's calibration."""
    s = config["scorers"][wc.scorer]
    n = s.get("n_samples", model_calibration(config, wc.model)["n_samples"])
    targets = ""
    if SCORERS[s["kind"]].needs_targets:  # a search per target sparsity (atp_search): the config's sparsities
        targets = " --targets " + " ".join(f"{v:g}" for v in config["sparsities"])
    spec = {k: v for k, v in s.items() if k != "threads"}  # the job's threads: the rule's (scorer_threads)
    return spec_arg({**spec, "n_samples": n}) + targets


def prune_threads(wc):
    """A method's own `threads`, else the prune stage's."""
    return method(wc).get("threads") or THREADS["prune"]


def scorer_threads(wc):
    """A scorer's own `threads`, else the score stage's."""
    return config["scorers"][wc.scorer].get("threads") or THREADS["score"]


def allocation_inputs(wc):
    inputs = {"layout": f"results/{wc.model}/layout.json"}
    if ALLOCATION_SCORERS[method(wc)["allocation"]]:  # the allocation reads a scorer's output
        inputs["scores"] = f"results/{wc.model}/scores/{method(wc)['scorer']}.json"
    return inputs


def allocation_args(wc):
    """The methods: entry (its pruner, nm and refiner are the prune rule's business) and the row's target.
    A function of the wildcards only: Snakemake leaves a param whose function takes `input`, `output`,
    `threads` or `resources` out of its params rerun trigger, so an edited allocation option
    (max_sparsity_offset, lambda, scope, ...) would not redo the allocation and the rows after it."""
    target, _nm = parse_label(wc.sparsity)
    fine_stage = {"pruner", "nm", "refine", "threads", *(k for m in REFINERS.values() for k in m.options)}
    entry = {k: v for k, v in method(wc).items() if k not in fine_stage}
    args = [spec_arg(entry), f"--target {target}"]
    scores = allocation_inputs(wc).get("scores")
    if scores:
        args.append(f"--scores {scores}")
    return " ".join(args)


def prune_args(wc):
    """The pruning: entry plus the method's pruner; n_samples resolved against the model's calibration."""
    p = config["pruning"]
    _target, nm = parse_label(wc.sparsity)
    n = p.get("n_samples", model_calibration(config, wc.model)["n_samples"])
    entry = {k: v for k, v in p.items() if k != "keep_checkpoints"}
    # the config's groups for this model's towers only (prune refuses a group for a tower it lacks)
    towers = FAMILIES[model_spec(wc).get("family", "causal_lm")].submodels
    entry["comparison"] = {sub: group for sub, group in p.get("comparison", {}).items() if sub in towers}
    refine = method(wc).get("refine", NO_REFINE)
    if refine != NO_REFINE:  # the method's refiner and its options (a method without one passes nothing)
        entry.update({"refine": refine, **{k: method(wc)[k] for k in REFINERS[refine].options if k in method(wc)}})
    args = spec_arg({**entry, "n_samples": n, "pruner": method(wc)["pruner"]})
    return args + (f" --nm {nm}" if nm else "")


def eval_kind(wc):
    """The CLI task of an evaluation entry: perplexity, lm_eval, or a vision-language task."""
    return evaluation_task(wc.task, config["evaluation"][wc.task])


def eval_args(wc):
    """A vision-language entry."""
    return spec_arg({"name": wc.task, **config["evaluation"][wc.task]})


def text_eval_args(wc):
    """Every text entry of the config: one process evaluates them all."""
    return spec_arg({name: config["evaluation"][name] for name in TEXT_ENTRIES})

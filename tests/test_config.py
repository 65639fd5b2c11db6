import copy
import subprocess
import sys
import time

import pytest
import yaml

from conftest import REPO
from ecoflap.config import ConfigError, load_config, validate_config

DEFAULT = yaml.safe_load((REPO / "config.yaml").read_text())


def check(mutate):
    cfg = copy.deepcopy(DEFAULT)
    mutate(cfg)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    return str(err.value)


def test_default_and_paper_configs_are_valid():
    validate_config(copy.deepcopy(DEFAULT))
    for path in [*(REPO / "config" / "paper").glob("*.yaml"), *(REPO / "config" / "embedded").glob("*.yaml")]:
        load_config(path)


def test_every_workflow_config_is_valid():
    """paper/ and embedded/ above; investigations/ and hub/ too (published/ holds tables, not configs)."""
    paths = [p for d in ("investigations", "hub") for p in (REPO / "config" / d).glob("*.yaml")]
    assert len(paths) >= 5
    for path in paths:
        load_config(path)


def test_options_of_another_allocation_or_refiner_and_unread_scorers_are_rejected():
    """Accepted and silently unused before: lambda on a uniform method, DSnoT's max_cycles without
    refine, a scorer (even one that does not exist) on an allocation that reads no scores."""
    msg = check(lambda c: c["methods"].update(x={"pruner": "wanda", "allocation": "uniform", "lambda": 0.3,
                                                 "max_cycles": 3, "scorer": "nonexistent"}))
    assert "methods.x.lambda: an option of allocation owl" in msg
    assert "methods.x.max_cycles: an option of refine: dsnot" in msg
    assert "methods.x.scorer: allocation uniform reads no scores" in msg
    ok = copy.deepcopy(DEFAULT)
    ok["methods"]["x"] = {"pruner": "wanda", "allocation": "owl", "scorer": "owl", "lambda": 0.1,
                          "refine": "dsnot", "max_cycles": 3}
    validate_config(ok)


def test_names_patterns_and_seed_groups_that_would_mislead():
    """Accepted before: a model named .. wrote results/../summary/, a method named model collided with
    the download's folder, 02:04 pruned 2:4 twice, a seed group of one seed twice had no spread."""
    assert "does not match" in check(lambda c: c["models"].update({"..": c["models"]["smollm2-135m"]}))
    assert "methods.model: results/<model>/model/ holds the model's download" in check(
        lambda c: c["methods"].update(model={"pruner": "wanda"}))
    assert "nm_patterns[1]: '02:04' repeats '2:4'" in check(lambda c: c.update(nm_patterns=["2:4", "02:04"]))

    def same_seed(c):
        c["models"]["a"] = {**c["models"]["smollm2-135m"], "seed": 1}
        c["models"]["b"] = {**c["models"]["smollm2-135m"], "seed": 1}
        c["seed_groups"] = {"g": ["a", "b"]}
    assert "seed_groups.g: its models run seeds [1, 1]" in check(same_seed)


def test_sparsity_out_of_range_names_key_and_range():
    msg = check(lambda c: c.update(sparsities=[0.5, 1.5]))
    assert "sparsities[1]" in msg and "1.5" in msg and "< 1" in msg


def test_unknown_pruner_lists_allowed():
    msg = check(lambda c: c["methods"].update(foo={"pruner": "obs"}))
    assert "methods.foo.pruner" in msg and "'wanda'" in msg and "'sparsegpt'" in msg


def test_unknown_model_source_and_name():
    msg = check(lambda c: c["models"].update(x={"source": "s3", "name": "y"}))
    assert "models.x.source" in msg and "'hub'" in msg and "'embedded'" in msg
    msg = check(lambda c: c["models"].update(x={"source": "embedded", "name": "gpt2"}))
    assert "models.x.name" in msg and "smollm2-135m" in msg
    msg = check(lambda c: c["models"].update(x={"source": "hub", "id": "not a hub id", "revision": "main"}))
    assert "models.x.id" in msg
    msg = check(lambda c: c["models"].update(x={"source": "hub", "id": "meta-llama/Llama-2-7b-hf"}))
    assert "revision" in msg


def test_other_rejections():
    assert "eps" in check(lambda c: c["scorers"]["zo"].update(eps=0))
    assert "nm_patterns[0]" in check(lambda c: c.update(nm_patterns=["4:2"]))
    assert "methods.ecoflap_zo_wanda.scorer" in check(lambda c: c["methods"]["ecoflap_zo_wanda"].update(scorer="nope"))
    assert "outliers" in check(lambda c: c["methods"]["owl_wanda"].update(scorer="zo"))
    assert "max_sparsity_offset" in check(lambda c: c["methods"]["ecoflap_zo_wanda"].update(max_sparsity_offset=-0.1))
    assert "typo_key" in check(lambda c: c.update(typo_key=1))
    assert "scorers.owl.n_samples" in check(lambda c: c["scorers"]["owl"].update(n_samples=1000))


def _snakemake(*args, configfile=REPO / "config.yaml", workdir, targets=()):
    """Dry runs plan from an empty folder, so results of earlier runs do not hide jobs.
    Targets go before --configfile, which would take them as more config files."""
    return subprocess.run([sys.executable, "-m", "snakemake", *targets, "-s", str(REPO / "Snakefile"),
                           "--directory", str(workdir), "--configfile", str(configfile), "--cores", "1", *args],
                          capture_output=True, text=True, timeout=120)


def test_dry_run_default_is_fast(tmp_path):
    t0 = time.perf_counter()
    out = _snakemake("-n", "--quiet", "rules", workdir=tmp_path)
    assert out.returncode == 0, out.stderr
    assert time.perf_counter() - t0 < 10
    for rule in ("download_model", "calibration", "score", "allocate", "prune", "evaluate", "aggregate"):
        assert rule in out.stdout + out.stderr


def test_dry_run_paper_config_plans_everything(tmp_path):
    out = _snakemake("-n", configfile=REPO / "config/paper/llama7b_unstructured.yaml", workdir=tmp_path)
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    assert "results/llama-7b/ecoflap_zo_wanda/0.7/model" in text
    assert "results/llama-7b/wanda/2of4/pruning.json" in text
    assert "results/llama-7b/ecoflap_zo_wanda/2of4" not in text  # N:M only for uniform methods
    assert '"dataset": "wikitext2"' in text and "boolq" in text


def test_scorers_and_methods_take_their_own_threads(tmp_path):
    """config.yaml runs every job on one thread except SparseGPT's prunes (two: its masks depend
    on the thread count); a scorer's own `threads` overrides the stage's. `threads` stays out of
    the stages' specs."""
    cfg = copy.deepcopy(DEFAULT)
    cfg["scorers"]["fo"]["threads"] = 2
    (tmp_path / "threads.yaml").write_text(yaml.safe_dump(cfg))
    targets = ("results/smollm2-135m/scores/zo.json", "results/smollm2-135m/scores/fo.json",
               "results/smollm2-135m/wanda/0.5/pruning.json", "results/smollm2-135m/sparsegpt/0.5/pruning.json",
               "results/smollm2-135m/magnitude/0.5/pruning.json")
    out = _snakemake("-n", "-p", "--cores", "2", configfile=tmp_path / "threads.yaml", workdir=tmp_path,
                     targets=targets)
    assert out.returncode == 0, out.stderr
    commands = [line for line in out.stdout.splitlines() if " score --model" in line or " prune --model" in line
                or " allocate --layout" in line]
    threads = {line.split("--out results/smollm2-135m/")[1].split()[0]: line.split("--threads ")[1].split()[0]
               for line in commands if "--threads" in line}
    assert threads == {"scores/zo.json": "1", "scores/fo.json": "2", "wanda/0.5/model": "1",
                       "sparsegpt/0.5/model": "2", "magnitude/0.5/model": "1"}
    assert all('"threads"' not in line for line in commands)


def test_bad_config_fails_before_any_job(tmp_path):
    bad = copy.deepcopy(DEFAULT)
    bad["sparsities"] = [1.5]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    out = _snakemake("-n", configfile=tmp_path / "bad.yaml", workdir=tmp_path)
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "sparsities[0]" in text and "< 1" in text
    assert "rule download_model" not in text


def test_a_missing_reference_or_interpreter_is_named_while_planning(tmp_path):
    """A missing reference: file validated and planned; the aggregate, the run's last job, failed on it.
    A missing top-level python: every job failed with exit 127 and nothing said why."""
    cfg = copy.deepcopy(DEFAULT)
    cfg["reference"] = "nope.yaml"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = _snakemake("-n", configfile=tmp_path / "c.yaml", workdir=tmp_path)
    assert out.returncode != 0 and "config key reference: 'nope.yaml' is not a file" in out.stdout + out.stderr
    cfg["reference"] = "config/paper/published/blip2_table1.yaml"  # the workflow's own, from any working directory
    cfg["python"] = "/nonexistent/python"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = _snakemake("-n", configfile=tmp_path / "c.yaml", workdir=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "python: /nonexistent/python is not an executable here" in out.stdout + out.stderr


def test_lint_is_clean():
    out = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout[-3000:]


def test_dry_run_blip2_table1_plans_every_stage_and_task(tmp_path):
    t0 = time.perf_counter()
    out = _snakemake("-n", configfile=REPO / "config/paper/blip2_table1.yaml", workdir=tmp_path)
    assert out.returncode == 0, out.stderr
    assert time.perf_counter() - t0 < 15
    text = out.stdout + out.stderr
    for rule in ("download_model", "calibration", "score", "allocate", "prune", "evaluate", "aggregate"):
        assert f"rule {rule}:" in text or f"localrule {rule}:" in text, rule
    for model, task in (("blip2-flant5-xl", "vqav2"), ("blip2-flant5-xl", "okvqa"), ("blip2-flant5-xl", "gqa"),
                        ("blip2-flant5-xl-coco", "nocaps"), ("blip2-itm-vit-g-coco", "flickr30k")):
        assert f"results/{model}/ecoflap_zo_wanda/0.5/eval/{task}.json" in text
    assert "results/blip2-flant5-xl/ecoflap_fo_wanda/0.5/model" in text
    assert f"--reference {REPO}/config/paper/published/blip2_table1.yaml" in text
    # every stage gets its config entry as --spec JSON
    assert '"submodels": ["vision", "language"]' in text and '"source": "cc3m"' in text


def _vl(mutate):
    cfg = yaml.safe_load((REPO / "config/paper/blip2_table1.yaml").read_text())
    mutate(cfg)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    return str(err.value)


def test_evaluation_the_family_cannot_do_is_rejected():
    msg = _vl(lambda c: c["models"]["blip2-itm-vit-g-coco"].update(evaluate=["vqav2"]))
    assert "models.blip2-itm-vit-g-coco.evaluate" in msg and "blip2_retrieval cannot do 'vqav2'" in msg
    msg = check(lambda c: c["models"]["smollm2-135m"].update(evaluate=["perplexity", "nope"]))
    assert "'nope' is not a key of evaluation" in msg


def test_calibration_source_must_suit_the_family():
    msg = _vl(lambda c: c["calibration"].update(source="c4"))
    assert "blip2 calibrates on image-caption pairs" in msg
    msg = check(lambda c: c["calibration"].update(source="cc3m", pairs="x.tsv"))
    assert "causal_lm calibrates on text" in msg


def test_calibration_keys_the_source_does_not_read_are_rejected():
    """`calibrate` ignores a key its source, protocol and family do not read: a seq_len on
    image-caption pairs, a prompt on text windows, cc3m's pairs under coco."""
    msg = _vl(lambda c: c["calibration"].update(seq_len=256))
    assert "calibration.seq_len: no model's calibration source" in msg
    msg = check(lambda c: c["calibration"].update(prompt="a photo of"))
    assert "calibration.prompt: no model's" in msg
    msg = check(lambda c: c["models"]["smollm2-135m"].update(calibration={"max_txt_len": 16}))
    assert "models.smollm2-135m.calibration.max_txt_len: causal_lm on calibration source austen-emma" in msg
    assert "reads: n_samples, seq_len, source" in msg
    # the authors' prefix/target split takes no prompt: read only by the retrieval model's caption protocol
    msg = _vl(lambda c: (c["calibration"].update(prompt="a photo of"),
                         c["models"]["blip2-itm-vit-g-coco"].pop("calibration")))
    assert "calibration.prompt: no model's" in msg
    cfg = yaml.safe_load((REPO / "config/paper/blip2_table1.yaml").read_text())
    validate_config({**cfg, "calibration": {**cfg["calibration"], "prompt": "a photo of"}})
    msg = _vl(lambda c: c["models"]["blip2-flant5-xl"].update(calibration={"source": "coco", "captions": "c.json",
                                                                           "image_dir": "i", "pairs": "p.tsv"}))
    assert "models.blip2-flant5-xl.calibration.pairs: blip2 on calibration source coco" in msg
    # a key some model reads, a default restated and a key every model overrides
    cfg = yaml.safe_load((REPO / "config/paper/blip2_table1.yaml").read_text())
    validate_config({**cfg, "calibration": {**cfg["calibration"], "max_txt_len": 32}})
    msg = check(lambda c: (c["calibration"].update(seq_len=64),
                           c["models"]["smollm2-135m"].update(calibration={"seq_len": 32})))
    assert "calibration.seq_len: every model overrides it" in msg


def test_a_comparison_group_for_a_tower_no_model_has_is_rejected():
    msg = check(lambda c: c.setdefault("pruning", {}).update(comparison={"qformer": "matrix"}))
    assert "pruning.comparison.qformer: no model of this config has a qformer sub-model (present: language)" in msg
    cfg = yaml.safe_load((REPO / "config/paper/blip2_table1.yaml").read_text())
    cfg.setdefault("pruning", {})["comparison"] = {"qformer": "matrix", "vision": "matrix"}
    validate_config(cfg)


def test_each_prune_job_gets_the_comparison_groups_of_its_own_towers(tmp_path):
    """A config's groups are shared by its models; each prune job is handed those of the towers
    its model has (prune refuses a group for a tower it lacks)."""
    cfg = yaml.safe_load((REPO / "config/paper/blip2_table1.yaml").read_text())
    cfg["pruning"]["comparison"] = {"vision": "matrix", "language": "matrix"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = _snakemake("-n", "-p", configfile=tmp_path / "c.yaml", workdir=tmp_path / "w",
                     targets=[f"results/{m}/wanda/0.5/pruning.json" for m in ("blip2-itm-vit-g-coco", "blip2-flant5-xl")])
    assert out.returncode == 0, out.stderr
    commands = [line for line in out.stdout.splitlines() if " prune --model " in line]
    itm, = [c for c in commands if "blip2-itm-vit-g-coco/model" in c]
    t5, = [c for c in commands if "blip2-flant5-xl/model" in c]
    assert '"comparison": {"vision": "matrix"}' in itm
    assert '"comparison": {"language": "matrix", "vision": "matrix"}' in t5


def test_vision_language_dataset_checks():
    msg = _vl(lambda c: c["evaluation"]["gqa"].pop("questions"))
    assert "evaluation.gqa.questions: missing" in msg
    msg = _vl(lambda c: c["evaluation"]["nocaps"].update(task="vqa"))
    assert "'nocaps' is a caption dataset, not vqa" in msg


def test_a_vqa_prompt_needs_one_slot_for_the_question():
    """str.format ignores an argument without a field: every image got the same text, silently."""
    msg = _vl(lambda c: c["evaluation"]["vqav2"].update(prompt="Short answer:"))
    assert "evaluation.vqav2.prompt: 'Short answer:' has 0 {} fields" in msg
    assert "has 2 {} fields" in _vl(lambda c: c["evaluation"]["vqav2"].update(prompt="Q: {} {} A:"))


def test_block_rerunning_scorer_is_refused_for_multi_stack_models():
    msg = _vl(lambda c: c["scorers"]["zo"].update(reuse_block_inputs=True))
    assert "scorers.zo" in msg and "several stacks" in msg


def test_dry_run_blip2_at_0_6_plans_vqav2_beside_the_figure(tmp_path):
    out = _snakemake("-n", "-p", configfile=REPO / "config/paper/blip2_0.6.yaml", workdir=tmp_path)
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    for method in ("wanda", "sparsegpt", "ecoflap_zo_wanda", "ecoflap_fo_wanda"):
        assert f"results/blip2-flant5-xl/{method}/0.6/eval/vqav2.json" in text
    assert "--target 0.6" in text and f"--reference {REPO}/config/paper/published/blip2_0.6.yaml" in text

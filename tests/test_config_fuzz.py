"""Property-based fuzzing of `validate_config`.

Start from a valid config (the repo's config.yaml) and apply random mutations: drop a key, add
an unknown key, replace a value with a random int/float/str/list/None/negative/huge value, swap
the sparsities for random floats, random N:M strings, random scorer kinds and method fields,
random model sources. Property: `validate_config` either

* accepts the config, and then `violations()` -- independent checks written here, not derived
  from the schema -- finds nothing wrong with it, or
* raises `ConfigError` (the documented error, a ValueError) whose every line names a key path
  related to one of the mutations.

Any other exception escaping is a bug. The bugs this file found (NaN/inf accepted, trailing
newlines matching `$`, sparsity folder labels that do not round-trip or collide, non-string keys,
shell characters in lm-eval task names, 64.0 as an integer, an OSError for an over-long path, a
bare ValueError for a huge N:M) are fixed; each keeps its minimal example in BUGS, which must be
rejected with its key. A new finding goes into KNOWN (tolerated by the property) while it is open.
"""
from __future__ import annotations

import copy
import datetime
import math
import re
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from conftest import REPO
from ecoflap.config import ConfigError, validate_config

BASE = yaml.safe_load((REPO / "config.yaml").read_text())
FUZZ = "zz_fuzz_"  # prefix of every key this file invents; none may survive validation...
USER_NAMED = ("config.models", "config.methods", "config.scorers", "config.evaluation")  # ...except as a name here

SCORER_KINDS = ("zeroth_order", "first_order", "checkpointed", "outliers")
NEEDS = {"ecoflap": ("zeroth_order", "first_order", "checkpointed"), "owl": ("outliers",)}
NAME = re.compile(r"[A-Za-z0-9_.\-]+")
METHOD_NAME = re.compile(r"[A-Za-z0-9_\-]+")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+")
SAFE_TASK = re.compile(r"[A-Za-z0-9_.\-]+")  # goes unquoted into a shell command line

# Bugs found by this file, not fixed yet (config.py / the schema / common.smk are not ours to edit).
# Bugs this file found are fixed (ecoflap/config.py, the schema, common.smk); the property
# tolerates no category. A new finding goes here while it is open, with a test in BUGS.
KNOWN: dict[str, str] = {}


# --- independent validity checks --------------------------------------------------------------

def is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def is_num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def violations(cfg) -> list[tuple[str, str]]:
    """(category, description) of everything wrong with an accepted config.

    Written from what the code downstream needs (common.smk, the CLI), not from the schema. Keys
    this file does not know are not judged -- the schema grows (model families, vision-language
    evaluations) while this file stays -- but no key this file invented may ever be accepted."""
    out = []

    def bad(cat, msg):
        out.append((cat, msg))

    def walk_keys(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                if not isinstance(k, str):
                    bad("key-type", f"{path}: key {k!r} is not a string")
                elif k.startswith(FUZZ) and path not in USER_NAMED:
                    bad("unknown-key", f"{path}.{k}: invented key accepted")
                walk_keys(v, f"{path}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk_keys(v, f"{path}[{i}]")
        elif isinstance(node, str) and node.endswith("\n"):
            bad("newline", f"{path}: {node!r}")
        elif isinstance(node, float) and not math.isfinite(node):
            bad("nonfinite", f"{path}: {node!r}")

    def pos_int(x, where, lo=1):
        if isinstance(x, float) and x.is_integer() and x >= lo:
            bad("integral-float", f"{where}: {x!r}")
        elif not (is_int(x) and x >= lo):
            bad("range", f"{where}: {x!r} is not an int >= {lo}")

    def number(x, where, lo=None, hi=None, lo_open=False, hi_open=False):
        if not is_num(x):
            bad("type", f"{where}: {x!r} is not a number")
        elif not math.isfinite(x):
            pass  # reported by walk_keys as nonfinite
        elif (lo is not None and (x <= lo if lo_open else x < lo)) or (hi is not None and (x >= hi if hi_open else x > hi)):
            bad("range", f"{where}: {x!r} out of range")

    def one_of(x, allowed, where):
        if x not in allowed:
            bad("enum", f"{where}: {x!r} not in {allowed}")

    walk_keys(cfg, "config")
    if not isinstance(cfg, dict):
        return [("type", "config is not a mapping")]
    for key in ("models", "sparsities", "methods", "calibration", "evaluation"):
        if key not in cfg:
            bad("required", f"{key} missing")
    if out and any(c == "required" for c, _ in out):
        return out

    if not (isinstance(cfg["models"], dict) and cfg["models"]):
        bad("type", "models is not a non-empty mapping")
    else:
        for name, spec in cfg["models"].items():
            if isinstance(name, str) and not NAME.fullmatch(name):
                bad("newline" if name.endswith("\n") else "name", f"model name {name!r}")
            src = spec.get("source") if isinstance(spec, dict) else None
            if src == "embedded":
                one_of(spec.get("name"), ("smollm2-135m",), f"models.{name}.name")
            elif src == "hub":
                rid, rev = spec.get("id"), spec.get("revision")
                if not (isinstance(rid, str) and HUB_ID.fullmatch(rid)):
                    bad("newline" if isinstance(rid, str) and rid.endswith("\n") else "hub", f"hub id {rid!r}")
                if not (isinstance(rev, str) and rev):
                    bad("hub", f"revision {rev!r}")
            elif src == "local":
                p = spec.get("path")
                if not (isinstance(p, str) and p and (Path(p) / "config.json").is_file()):
                    bad("local", f"local path {p!r} holds no config.json")
            else:
                bad("enum", f"models.{name}.source {src!r}")
            for flag in ("trust_remote_code", "allow_pickle"):
                if flag in spec and not isinstance(spec[flag], bool):
                    bad("type", f"models.{name}.{flag}")

    if "device" in cfg and not (isinstance(cfg["device"], str)
                                and re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", cfg["device"])):
        bad("newline" if str(cfg["device"]).endswith("\n") else "device", f"device {cfg['device']!r}")
    if "dtype" in cfg:
        one_of(cfg["dtype"], ("auto", "float32", "bfloat16", "float16"), "dtype")
    if "threads" in cfg:
        pos_int(cfg["threads"], "threads")
    if "seed" in cfg:
        pos_int(cfg["seed"], "seed", lo=0)
    if "python" in cfg and not isinstance(cfg["python"], str):
        bad("type", "python")

    sp = cfg["sparsities"]
    if not (isinstance(sp, list) and sp):
        bad("type", "sparsities is not a non-empty list")
    else:
        labels = []
        for i, s in enumerate(sp):
            number(s, f"sparsities[{i}]", 0, 1, hi_open=True)
            if is_num(s) and math.isfinite(s):
                label = f"{s:g}"  # the folder name the workflow derives (common.smk: sparsity_label)
                if not re.fullmatch(r"[0-9.]+", label) or float(label) != s or label in labels:
                    bad("label", f"sparsities[{i}] = {s!r} gets label {label!r}")
                labels.append(label)

    nm = cfg.get("nm_patterns", [])
    if not isinstance(nm, list):
        bad("type", "nm_patterns")
    else:
        for i, pat in enumerate(nm):
            if isinstance(pat, str) and pat.endswith("\n"):
                continue  # reported as newline
            m = re.fullmatch(r"([0-9]+):([0-9]+)", pat) if isinstance(pat, str) else None
            if not m:
                bad("nm", f"nm_patterns[{i}] = {pat!r}")
            elif not 0 < int(m[1]) < int(m[2]):
                bad("nm", f"nm_patterns[{i}] = {pat!r} needs 0 < N < M")

    cal = cfg["calibration"]
    calib_n = None
    if not isinstance(cal, dict):
        bad("type", "calibration")
    else:
        one_of(cal.get("source"), ("austen-emma", "c4", "cc3m", "coco"), "calibration.source")
        pos_int(cal.get("n_samples"), "calibration.n_samples")
        if "seq_len" in cal:
            pos_int(cal["seq_len"], "calibration.seq_len")
        calib_n = cal.get("n_samples")

    scorers = cfg.get("scorers", {})
    if not isinstance(scorers, dict):
        bad("type", "scorers")
        scorers = {}
    for name, s in scorers.items():
        w = f"scorers.{name}"
        if not isinstance(s, dict):
            bad("type", w)
            continue
        one_of(s.get("kind"), SCORER_KINDS, f"{w}.kind")
        if "granularity" in s:
            one_of(s["granularity"], ("block", "layer"), f"{w}.granularity")
        if "eps" in s:
            number(s["eps"], f"{w}.eps", 0, lo_open=True)
        if "m" in s:
            number(s["m"], f"{w}.m", 0, lo_open=True)
        if "reuse_block_inputs" in s and not isinstance(s["reuse_block_inputs"], bool):
            bad("type", f"{w}.reuse_block_inputs")
        if "reduce" in s:
            ok = ("abs_g", "abs_wg") if s.get("kind") == "first_order" else ("l2", "projection", "abs_g", "abs_wg")
            one_of(s["reduce"], ok, f"{w}.reduce")
        for k in ("n_samples", "batch_size"):
            if k in s:
                pos_int(s[k], f"{w}.{k}")
        if is_int(s.get("n_samples")) and is_int(calib_n) and s["n_samples"] > calib_n:
            bad("range", f"{w}.n_samples exceeds calibration.n_samples")
        if "seed" in s:
            pos_int(s["seed"], f"{w}.seed", lo=0)

    methods = cfg["methods"]
    if not (isinstance(methods, dict) and methods):
        bad("type", "methods")
        methods = {}
    for name, m in methods.items():
        w = f"methods.{name}"
        if isinstance(name, str) and not METHOD_NAME.fullmatch(name):
            bad("newline" if name.endswith("\n") else "name", f"method name {name!r}")
        if not isinstance(m, dict):
            bad("type", w)
            continue
        one_of(m.get("pruner"), ("none", "magnitude", "wanda", "sparsegpt"), f"{w}.pruner")
        alloc = m.get("allocation", "uniform")
        one_of(alloc, ("uniform", "ecoflap", "owl"), f"{w}.allocation")
        if "scorer" in m and not isinstance(m["scorer"], str):
            bad("type", f"{w}.scorer")
        if m.get("pruner") != "none" and alloc in NEEDS:
            sc = scorers.get(m.get("scorer")) if isinstance(m.get("scorer"), str) else None
            if not isinstance(sc, dict):
                bad("ref", f"{w}.scorer {m.get('scorer')!r} is not a scorer")
            elif sc.get("kind") not in NEEDS[alloc]:
                bad("ref", f"{w}.scorer has kind {sc.get('kind')!r}, {alloc} needs {NEEDS[alloc]}")
        if "max_sparsity_offset" in m:
            number(m["max_sparsity_offset"], f"{w}.max_sparsity_offset", 0, 1)
        if "lambda" in m:
            number(m["lambda"], f"{w}.lambda", 0, 0.5)
        if "aggregation" in m:
            one_of(m["aggregation"], ("sum", "avg"), f"{w}.aggregation")
        if "nm" in m and not isinstance(m["nm"], bool):
            bad("type", f"{w}.nm")

    pr = cfg.get("pruning", {})
    if not isinstance(pr, dict):
        bad("type", "pruning")
    else:
        for k in ("n_samples", "batch_size", "sparsegpt_block_size"):
            if k in pr:
                pos_int(pr[k], f"pruning.{k}")
        if is_int(pr.get("n_samples")) and is_int(calib_n) and pr["n_samples"] > calib_n:
            bad("range", "pruning.n_samples exceeds calibration.n_samples")
        if "sparsegpt_damp" in pr:
            number(pr["sparsegpt_damp"], "pruning.sparsegpt_damp", 0, lo_open=True)
        if "keep_checkpoints" in pr and not isinstance(pr["keep_checkpoints"], bool):
            bad("type", "pruning.keep_checkpoints")

    ev = cfg["evaluation"]
    if not (isinstance(ev, dict) and ev):
        bad("type", f"evaluation {ev!r}")
    else:
        ppl = ev.get("perplexity")
        if ppl is not None:
            if not isinstance(ppl, dict):
                bad("type", "evaluation.perplexity")
            else:
                one_of(ppl.get("dataset"), ("brown-heldout", "wikitext2"), "evaluation.perplexity.dataset")
                for k in ("seq_len", "batch_size"):
                    if k in ppl:
                        pos_int(ppl[k], f"evaluation.perplexity.{k}")
                if ppl.get("max_windows") is not None:
                    pos_int(ppl["max_windows"], "evaluation.perplexity.max_windows")
        lm = ev.get("lm_eval")
        if lm is not None:
            if not isinstance(lm, dict):
                bad("type", "evaluation.lm_eval")
            else:
                tasks = lm.get("tasks")
                if not (isinstance(tasks, list) and tasks and all(isinstance(t, str) for t in tasks)):
                    bad("type", f"evaluation.lm_eval.tasks {tasks!r}")
                else:
                    for t in tasks:
                        if not SAFE_TASK.fullmatch(t) and not t.endswith("\n"):
                            bad("task", f"lm_eval task {t!r}")
                if lm.get("limit") is not None:
                    pos_int(lm["limit"], "evaluation.lm_eval.limit")
                if "num_fewshot" in lm:
                    pos_int(lm["num_fewshot"], "evaluation.lm_eval.num_fewshot", lo=0)
                if "batch_size" in lm:
                    pos_int(lm["batch_size"], "evaluation.lm_eval.batch_size")

    res = cfg.get("resources", {})
    if not isinstance(res, dict):
        bad("type", "resources")
    else:
        for k in ("gpu", "mem_mb"):
            if k in res:
                pos_int(res[k], f"resources.{k}", lo=0)
    return out


def test_checker_accepts_base_and_catches_breakage():
    assert violations(copy.deepcopy(BASE)) == []
    cfg = copy.deepcopy(BASE)
    cfg["sparsities"] = [1.0]
    cfg["scorers"]["zo"]["eps"] = 0
    cfg["methods"]["owl_wanda"]["scorer"] = "zo"
    assert {c for c, _ in violations(cfg)} == {"range", "ref"}


# --- key paths as validate_config prints them ------------------------------------------------

def key_str(path) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


LINE = re.compile(r"^  - config key (.*?): (.*)$")


def related(line_key: str, text: str, path: tuple, dropped: bool = False) -> bool:
    """Does an error line (`config key <line_key>: <text>`) point at the mutation at `path`?
    A dropped key's parent is itself at fault ("'kind' is a required property", "{} should be
    non-empty"), so it counts as exact."""
    p = key_str(path)
    if line_key == p or (dropped and line_key == (key_str(path[:-1]) or "(top level)")):
        return True
    ancestors = ["(top level)"] + [key_str(path[:i]) for i in range(1, len(path))]
    if line_key in ancestors:
        # reported at the enclosing mapping (required, additionalProperties, if/then): a named entry
        # (models.X, scorers.X, methods.X, ...) is precise enough, a section must name the key
        depth = ancestors.index(line_key)
        return depth >= 2 or repr(path[depth]) in text or f"'{path[depth]}'" in text
    if line_key.startswith(p) and line_key[len(p):len(p) + 1] in (".", "["):  # inside the replaced value
        return True
    if len(path) >= 3 and line_key.startswith(key_str(path[:2])) and line_key[len(key_str(path[:2]))] in ".[":
        return True  # another key of the same method/scorer/model entry
    if p in text:  # cross-reference: "... exceeds calibration.n_samples"
        return True
    if path[0] == "scorers" and len(path) >= 2 and repr(path[1]) in text:  # "'zo' is not a key of scorers"
        return True
    return False


# --- mutation strategies ---------------------------------------------------------------------

EDGE_STR = ["", " ", "none", "auto", "cpu", "cuda:0", "wanda", "uniform", "ecoflap", "owl", "zo", "fo", "fast",
            "zeroth_order", "outliers", "2:4", "0.5", "-1", "1e9", "smollm2-135m", "block", "l2", "abs_g",
            "a b; touch x", "x\n", "cpu\n", "ünïcode", "../../etc"]
scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(-3, 70),
    st.sampled_from([0, -1, 1, 2, 2 ** 31, 10 ** 18, -10 ** 18, 2 ** 70]),
    st.floats(width=64),  # nan, inf, huge, tiny, negative
    st.sampled_from([0.0, -0.0, 0.5, 0.999999, 1.0, 1e-7, -1e-9, 1e308, float("inf"), float("nan")]),
    st.text(max_size=10),
    st.sampled_from(EDGE_STR),
    st.dates(min_value=datetime.date(2000, 1, 1), max_value=datetime.date(2030, 1, 1)),  # YAML timestamps
)
values = st.one_of(scalars, st.lists(scalars, max_size=3),
                   st.dictionaries(st.sampled_from(["kind", "source", "pruner", "a"]), scalars, max_size=2))
fuzz_key = st.text(alphabet="abcxyz_-.", min_size=1, max_size=6).map(lambda s: FUZZ + s)
sparsity = st.one_of(st.floats(-0.5, 1.5), st.floats(0, 1, exclude_max=True).map(lambda x: round(x, 3) + 0.0),
                     st.sampled_from([0.0, 0.5, 0.6, 1.0, 1 - 1e-12, -0.0, 1e-7, float("nan")]), scalars)
nm_string = st.one_of(
    st.builds("{}:{}".format, st.integers(-2, 10), st.integers(-2, 10)),
    st.sampled_from(["2:4", "4:8", "0:4", "4:4", "4:2", "2of4", "2:4:8", ":", "2 :4", "2:4\n", "1:" + "9" * 40,
                     "١:٤"]),
    st.text(alphabet="0123456789:", max_size=6), scalars)
METHOD_FIELDS = {
    "pruner": st.sampled_from(["none", "magnitude", "wanda", "sparsegpt", "obs", ""]),
    "allocation": st.sampled_from(["uniform", "ecoflap", "owl", "lamp"]),
    "scorer": st.sampled_from(["zo", "fo", "fast", "owl", "missing", ""]),
    "max_sparsity_offset": st.one_of(st.floats(-0.5, 1.5), st.sampled_from([0, 1, 0.1])),
    "aggregation": st.sampled_from(["sum", "avg", "max"]),
    "lambda": st.one_of(st.floats(-0.2, 0.8), st.sampled_from([0, 0.5, 0.08])),
    "nm": st.booleans(),
}
SCORER_FIELDS = {
    "kind": st.sampled_from(SCORER_KINDS + ("random",)),
    "granularity": st.sampled_from(["block", "layer", "head"]),
    "eps": st.one_of(st.floats(-1, 1), st.sampled_from([0, 1e-3, 1e-300, 5e-324])),
    "reuse_block_inputs": st.booleans(),
    "reduce": st.sampled_from(["l2", "projection", "abs_g", "abs_wg", "l1"]),
    "m": st.one_of(st.floats(-2, 10), st.just(0)),
    "n_samples": st.integers(-1, 100),
    "batch_size": st.integers(-1, 10),
    "seed": st.integers(-2, 3),
}


def paths(node, prefix=()):
    """Every key/index path below `node`."""
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            out.append(prefix + (k,))
            out += paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.append(prefix + (i,))
            out += paths(v, prefix + (i,))
    return out


def get(cfg, path):
    for p in path:
        cfg = cfg[p]
    return cfg


@pytest.fixture(scope="module")
def local_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("local_models")
    good = root / "good"
    good.mkdir()
    (good / "config.json").write_text("{}")
    (root / "empty").mkdir()
    return [str(good), str(root / "empty"), str(root / "missing"), "relative/nowhere", ""]


def mutate(data, cfg, local_dirs) -> list[tuple]:
    """Apply 1-3 random mutations in place; return (path, dropped) for each one."""
    touched = []
    for _ in range(data.draw(st.integers(1, 3), label="n_mutations")):
        op = data.draw(st.sampled_from(["drop", "add", "replace", "sparsities", "nm", "scorer", "method",
                                        "model"]), label="op")
        if op == "drop":
            ps = paths(cfg)
            if not ps:
                continue
            path = data.draw(st.sampled_from(ps), label="drop")
            parent = get(cfg, path[:-1])
            del parent[path[-1]]
            touched.append((path, True))
            continue
        elif op == "add":
            dicts = [()] + [p for p in paths(cfg) if isinstance(get(cfg, p), dict)]
            where = data.draw(st.sampled_from(dicts), label="add under")
            key = data.draw(fuzz_key, label="key")
            get(cfg, where)[key] = data.draw(values, label="value")
            path = where + (key,)
        elif op == "replace":
            ps = paths(cfg)
            if not ps:
                continue
            path = data.draw(st.sampled_from(ps), label="replace")
            get(cfg, path[:-1])[path[-1]] = data.draw(values, label="value")
        elif op == "sparsities":
            cfg["sparsities"] = data.draw(st.lists(sparsity, max_size=4), label="sparsities")
            path = ("sparsities",)
        elif op == "nm":
            cfg["nm_patterns"] = data.draw(st.lists(nm_string, max_size=3), label="nm_patterns")
            path = ("nm_patterns",)
        elif op in ("scorer", "method"):
            table_key, fields = ("scorers", SCORER_FIELDS) if op == "scorer" else ("methods", METHOD_FIELDS)
            table = cfg.get(table_key)
            if not isinstance(table, dict):
                continue
            name = data.draw(st.sampled_from(sorted(map(str, table)) + ["new_entry"]), label=op)
            entry = table.setdefault(name, {"kind": "outliers"} if op == "scorer" else {"pruner": "wanda"})
            if not isinstance(entry, dict):
                continue
            field = data.draw(st.sampled_from(sorted(fields)), label="field")
            entry[field] = data.draw(st.one_of(fields[field], values) if data.draw(st.booleans()) else fields[field],
                                     label="field value")
            path = (table_key, name, field)
        else:  # model
            models = cfg.get("models")
            if not isinstance(models, dict):
                continue
            name = data.draw(st.sampled_from(sorted(map(str, models)) + ["other"]), label="model")
            source = data.draw(st.sampled_from(["embedded", "hub", "local", "s3"]), label="source")
            spec = {"source": source}
            if source == "local":
                spec["path"] = data.draw(st.one_of(st.sampled_from(local_dirs), st.text(max_size=8)), label="path")
            elif source == "hub":
                spec["id"] = data.draw(st.sampled_from(["meta-llama/Llama-2-7b-hf", "bad id", "a/b", "x/"]))
                if data.draw(st.booleans()):
                    spec["revision"] = data.draw(st.sampled_from(["main", "", "0" * 40]))
            else:
                spec["name"] = data.draw(st.sampled_from(["smollm2-135m", "gpt2"]))
            if data.draw(st.booleans()):
                spec[data.draw(st.sampled_from(["trust_remote_code", "allow_pickle", FUZZ + "x"]))] = \
                    data.draw(st.one_of(st.booleans(), scalars))
            models[name] = spec
            path = ("models", name)
        touched.append((path, False))
    return touched


def check_one(cfg, touched):
    note(f"mutations at {[key_str(p) for p, _ in touched]}")
    snapshot = copy.deepcopy(cfg)
    try:
        validate_config(cfg)
    except ConfigError as err:
        msg = str(err)
        lines = msg.splitlines()
        assert lines[0] == "invalid configuration:", msg
        assert len(lines) > 1, msg
        for line in lines[1:]:
            m = LINE.match(line)
            assert m, f"error line without a key path: {line!r}"
            assert any(related(m[1], m[2], p, dropped) for p, dropped in touched), \
                f"error line names no mutated key {[key_str(p) for p, _ in touched]}: {line!r}"
        return "rejected"
    except Exception as exc:  # anything else escaping is a bug
        return ("escape", f"{type(exc).__name__}: {exc}"[:300])
    assert repr(cfg) == repr(snapshot), "validate_config modified the config it was given"
    return violations(cfg)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_configs_are_rejected_with_their_key_or_really_valid(data, local_dirs):
    cfg = copy.deepcopy(BASE)
    touched = mutate(data, cfg, local_dirs)
    result = check_one(cfg, touched)
    if result == "rejected":
        return
    if isinstance(result, tuple):  # an escaped exception
        assert False, f"{result[1]} escaped validate_config (mutations at {[key_str(p) for p, _ in touched]})"
    unknown = [v for v in result if v[0] not in KNOWN]
    for v in result:
        note(f"violation: {v}")
    assert not unknown, f"validate_config accepted an invalid config: {unknown}"


# --- bugs this file found, with their minimal examples (all fixed: each must be rejected) ----

def _mutated(**updates):
    cfg = copy.deepcopy(BASE)
    for dotted, value in updates.items():
        *parents, last = dotted.split("__")
        get(cfg, tuple(parents))[last] = value
    return cfg


def _assert_rejected(cfg, key):
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert key in str(err.value)


BUGS = {
    "nan_sparsity": (_mutated(sparsities=[float("nan")]), "sparsities[0]"),
    "nan_eps": (_mutated(scorers__zo__eps=float("nan")), "scorers.zo.eps"),
    "inf_eps": (_mutated(scorers__zo__eps=float("inf")), "scorers.zo.eps"),
    "nan_lambda": (_mutated(methods__owl_wanda__lambda=float("nan")), "methods.owl_wanda.lambda"),
    "nm_trailing_newline": (_mutated(nm_patterns=["2:4\n"]), "nm_patterns[0]"),
    "device_trailing_newline": (_mutated(device="cpu\n"), "device"),
    "method_name_trailing_newline": (_mutated(methods={"wanda\n": {"pruner": "wanda"}}), "methods"),
    "sparsity_label_exponent": (_mutated(sparsities=[1e-07]), "sparsities[0]"),
    "sparsity_label_negative_zero": (_mutated(sparsities=[-0.0]), "sparsities[0]"),
    "sparsity_label_collision": (_mutated(sparsities=[0.1234561, 0.1234562]), "sparsities"),
    "sparsity_duplicate": (_mutated(sparsities=[0.5, 0.5]), "sparsities"),
    "int_model_key": (_mutated(models={1: {"source": "embedded", "name": "smollm2-135m"}}), "models"),
    "task_with_shell_chars": (_mutated(evaluation__lm_eval__tasks=["brown_cloze; touch /tmp/x"]),
                              "evaluation.lm_eval.tasks[0]"),
    "n_samples_as_float": (_mutated(calibration__n_samples=64.0), "calibration.n_samples"),
    "local_path_too_long": (_mutated(models={"x": {"source": "local", "path": "x" * 300}}), "models.x.path"),
    "nm_more_digits_than_int_allows": (_mutated(nm_patterns=["1:" + "9" * (sys.get_int_max_str_digits() + 1)]),
                                       "nm_patterns[0]"),
}


@pytest.mark.parametrize("name", sorted(BUGS))
def test_found_bug_stays_fixed(name):
    cfg, key = BUGS[name]
    _assert_rejected(copy.deepcopy(cfg), key)

"""The GPU check: what the CPU machines cannot run, on one CUDA device, in a few minutes.

Runs on a bare GPU machine that has PyTorch, transformers and accelerate but no network and
none of our other dependencies (no Snakemake, lm-eval, datasets). The embedded SmolLM2 file
(98 MB) does not travel, so the language-model checks use a random-weight model of its exact
shape (with its real tokenizer, 3.5 MB), and a LLaMA-2-7B-shaped model of 4 blocks built in
place; the fashion CLIP is trained in place. Random weights make the metrics meaningless as
quality numbers; what is checked is that every mode gives the same masks, scores and
perplexities, and what each costs in time and GPU memory.

  python3 tools/device_check.py --tokenizer .device/smollm2-tokenizer --out "$OUT"

Sections (each reports, and one failing does not stop the others):
  A. SmolLM2 shape, bf16: scoring (checkpointed, zeroth-order in fp32, outliers, first-order), Wanda,
     Wanda 2:4, SparseGPT and magnitude pruning, perplexity; offload none vs cpu vs disk: identical?
  B. LLaMA-2-7B shape (4 blocks), bf16: Wanda and SparseGPT peak GPU memory, none vs cpu vs disk,
     beside what one block, its activations and the pruner's statistics take.
  C. fashion CLIP (two towers): Wanda masks, gradient scores, zero-shot accuracy, none vs cpu.
  D. the scoring benchmark (benchmark-scoring) on CUDA.
  E. GPU leases: two concurrent one-GPU jobs on one GPU run one after the other; with a
     simulated second device each job sees only its own.
  F. the memory benchmark (tools/memory_benchmark.py) on CUDA, 6 blocks of LLaMA-2-7B's
     shape: offload disk vs none, uncapped; peak GPU memory per stage, identical results.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from ecoflap.allocation import ratios  # noqa: E402
from ecoflap.data.calibration import batches, build_calibration  # noqa: E402
from ecoflap.models.base import model_layout  # noqa: E402
from ecoflap.models.registry import adapter_for  # noqa: E402
from ecoflap.models.loading import load_model  # noqa: E402
from ecoflap.models.offload import model_bytes  # noqa: E402
from ecoflap.pruning.engine import prune_sequential  # noqa: E402
from ecoflap.pruning.methods import make_pruner  # noqa: E402

CUDA = torch.device("cuda")  # main() replaces it with --device cpu for a rehearsal on a CPU machine
REPORT: dict = {}
QUICK = False  # --quick
SHAPE_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_attention_heads=32)
SHAPE_REHEARSAL = dict(vocab_size=3200, hidden_size=256, intermediate_size=688, num_attention_heads=4)


def say(*parts) -> None:
    print(*parts, flush=True)


def measured(fn):
    """(result, seconds, peak GPU MB) of fn() (peak RSS MB in a CPU rehearsal)."""
    from ecoflap.utils.runtime import peak_rss_mb, reset_peak_rss

    if CUDA.type != "cuda":
        reset_peak_rss()
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0, peak_rss_mb()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0, torch.cuda.max_memory_allocated() / 2**20


def section(name):
    def wrap(fn):
        def run(*a, **k):
            say(f"\n=== {name} ===")
            t0 = time.perf_counter()
            try:
                REPORT[name] = fn(*a, **k)
            except Exception as exc:  # report and go on: one broken section must not hide the others
                traceback.print_exc()
                REPORT[name] = {"error": f"{type(exc).__name__}: {exc}"}
            say(f"--- {name}: {time.perf_counter() - t0:.1f} s")
        return run
    return wrap


def empty_cache() -> None:
    if CUDA.type == "cuda":
        torch.cuda.empty_cache()


def checkpoint_writer(model, adapter, source: Path):
    """Where each pruned block goes, as the CLI's prune does it: its own shard, written the moment
    it is pruned. offload: disk needs it (a block it drops is read again from the source unless
    it was written out, and the engine refuses to prune without it); the other modes write the
    same, so that every mode's timing includes the writes."""
    from ecoflap.pruning.checkpoint import PrunedCheckpoint

    return PrunedCheckpoint(model, adapter, source, Path(tempfile.mkdtemp(prefix="pruned-", dir=source.parent)))


def uniform(model, adapter, target):
    layout = model_layout(model, adapter)
    return ratios.expand_to_layers(ratios.uniform(ratios.unit_sizes(layout, "block"), target), layout)


# --- A ---------------------------------------------------------------------------------------

def build_smollm2_shape(tokenizer_dir: Path, out: Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():  # default init makes every block alike; spread them so allocations differ
        for i, layer in enumerate(model.model.layers):
            for p in layer.parameters():
                if p.dim() == 2:
                    p.mul_(1 + 0.05 * i)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


@section("A. SmolLM2 shape (random weights), bf16: none vs cpu vs disk")
def check_smollm2(folder: Path) -> dict:
    from ecoflap.evaluation.perplexity import evaluation_text, perplexity
    from ecoflap.scoring.checkpointed import checkpointed_gradient_scores
    from ecoflap.scoring.first_order import first_order_scores
    from ecoflap.scoring.outliers import outlier_ratios
    from ecoflap.scoring.zeroth_order import zeroth_order_scores

    results: dict = {}
    text = evaluation_text("brown-heldout")
    for mode in ("none", "cpu", "disk"):
        row = results[mode] = {}

        def fresh(dtype=torch.bfloat16):
            model, tok = load_model(folder, CUDA, dtype, offload=mode)
            return model, tok, adapter_for(model)

        def zeroth_order_float32():  # refused in bfloat16, whose steps round eps z away
            model32, _tok, adapter32 = fresh(torch.float32)
            return zeroth_order_scores(model32, adapter32, batches(calib[:4 if QUICK else 8], 1), CUDA,
                                       granularity="block", reuse_block_inputs=True)

        model, tok, adapter = fresh()
        calib = build_calibration(tok, "austen-emma", 64, 128, 0)
        scorers = {
            "checkpointed_l2": lambda: checkpointed_gradient_scores(model, adapter, batches(calib[:16], 4), CUDA,
                                                                    "block", "l2"),
            "checkpointed_abs_wg_layer": lambda: checkpointed_gradient_scores(model, adapter, batches(calib[:16], 4),
                                                                              CUDA, "layer", "abs_wg"),
            "zeroth_order_block_reuse_fp32": zeroth_order_float32,
            "outliers": lambda: outlier_ratios(model, adapter, batches(calib, 8), CUDA),
        }
        if mode == "none":
            scorers["first_order"] = lambda: first_order_scores(model, adapter, batches(calib[:16], 4), CUDA)
        for name, fn in scorers.items():
            scores, sec, peak = measured(fn)
            row[f"score {name}"] = {"values": scores, "seconds": sec, "peak_mb": peak}
            say(f"{mode:>4} score {name:<28} {sec:7.2f} s  peak {peak:8.1f} MB")
        prunes = [("wanda 0.5", "wanda", None), ("wanda 2:4", "wanda", (2, 4)),
                  ("sparsegpt 0.5", "sparsegpt", None), ("magnitude 0.5", "magnitude", None)]
        for name, pruner, nm in [p for p in prunes if not (QUICK and p[1] == "sparsegpt")]:
            model, tok, adapter = fresh()
            written = checkpoint_writer(model, adapter, folder)
            rep, sec, peak = measured(lambda: prune_sequential(model, adapter, make_pruner(pruner),
                                                               uniform(model, adapter, 0.5), batches(calib, 8), CUDA,
                                                               nm, on_block_pruned=written.write_block))
            row[f"prune {name}"] = {"mask_sha256": rep.mask_sha256, "seconds": sec, "peak_mb": peak,
                                    "sparsity": rep.global_sparsity}
            say(f"{mode:>4} prune {name:<28} {sec:7.2f} s  peak {peak:8.1f} MB  sparsity {rep.global_sparsity:.4f}"
                f"  mask {rep.mask_sha256[:12]}")
            if name == "wanda 0.5":  # as evaluate-text runs it: block by block when offloaded
                ppl, sec, peak = measured(lambda: perplexity(model, tok, text, 256, CUDA, 32, 8, adapter))
                row["perplexity wanda 0.5"] = {"value": ppl["perplexity"], "seconds": sec, "peak_mb": peak}
                say(f"{mode:>4} perplexity (wanda 0.5, 32x256)  {sec:7.2f} s  peak {peak:8.1f} MB  "
                    f"ppl {ppl['perplexity']:.6f}")
        del model
        empty_cache()
    same = {}
    for mode in ("cpu", "disk"):
        for key, v in results[mode].items():
            w = results["none"][key]
            if "mask_sha256" in v:
                same[(mode, key)] = v["mask_sha256"] == w["mask_sha256"]
            elif "values" in v:
                same[(mode, key)] = v["values"] == w["values"]
            else:
                same[(mode, key)] = abs(v["value"] / w["value"] - 1)
    say("\nagainst none (True: bit-identical; a number: relative difference)")
    for (mode, key), v in same.items():
        t = results[mode][key]["seconds"] / results["none"][key]["seconds"]
        p = results[mode][key]["peak_mb"] / results["none"][key]["peak_mb"]
        say(f"  {mode:>4} {key:<36} {str(v):<8} time {mode}/none {t:5.2f}  peak {mode}/none {p:5.2f}")
    same = {f"{mode} {key}": v for (mode, key), v in same.items()}
    return {"runs": results, "identical": same}


# --- B ---------------------------------------------------------------------------------------

@section("B. LLaMA-2-7B shape (4 blocks), bf16: peak GPU memory, none vs cpu vs disk")
def check_llama7b_blocks(work: Path) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = SHAPE_7B if CUDA.type == "cuda" else SHAPE_REHEARSAL
    cfg = LlamaConfig(**shape, num_hidden_layers=4, num_key_value_heads=shape["num_attention_heads"],
                      max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    folder = work / "llama7b_4blocks"
    torch.manual_seed(0)
    with torch.device(CUDA):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(folder)
    del model
    empty_cache()
    n, seq = 32, 128
    ids = torch.randint(3, cfg.vocab_size, (n, seq), generator=torch.Generator().manual_seed(0))
    out: dict = {}
    for pruner in ("wanda", "sparsegpt"):
        for mode in ("none", "cpu", "disk"):
            model, _ = _load_no_tok(folder, mode)
            adapter = adapter_for(model)
            blocks = adapter.blocks(model)
            moves = _watch_moves(blocks) if mode == "cpu" else []
            layers = None  # the previous model's block (a stale reference would count in this peak)
            written = checkpoint_writer(model, adapter, folder)
            rep, sec, peak = measured(lambda: prune_sequential(model, adapter, make_pruner(pruner),
                                                               uniform(model, adapter, 0.5),
                                                               batches(ids, 8), CUDA,
                                                               on_block_pruned=written.write_block))
            block_mb = model_bytes(blocks[0]) / 2**20
            outside_mb = (model_bytes(model) - sum(model_bytes(b) for b in blocks)) / 2**20
            act_mb = 2 * n * seq * cfg.hidden_size * 2 / 2**20  # block inputs and outputs, bf16
            layers = adapter.prunable_layers(blocks[0])
            stats_mb = (sum(l.in_features ** 2 * 4 for l in layers.values()) if pruner == "sparsegpt"
                        else sum(l.in_features * 4 for l in layers.values())) / 2**20
            big = max(layers.values(), key=lambda l: l.weight.numel())
            # the largest layer's transient working set: Wanda's fp32 scores, topk values and int64
            # indices of the pruned half, the mask; SparseGPT's fp32 copy of W, the mask and one
            # in x in fp32 matrix beside H (its Cholesky factor, then the inverse)
            work_mb = (big.weight.numel() * (4 + 1 + 12 * 0.5) if pruner == "wanda"
                       else big.weight.numel() * 5 + big.in_features ** 2 * 4) / 2**20
            bound = 1.1 * (outside_mb + block_mb + act_mb + stats_mb + work_mb)
            out[f"{pruner} {mode}"] = {"mask_sha256": rep.mask_sha256, "seconds": sec, "peak_mb": peak,
                                       "model_mb": model_bytes(model) / 2**20, "block_mb": block_mb,
                                       "outside_blocks_mb": outside_mb, "activations_mb": act_mb,
                                       "pruner_stats_mb": stats_mb, "largest_layer_work_mb": work_mb,
                                       "bound_mb": bound}
            if moves:
                out[f"{pruner} {mode}"]["moves"] = moves
                say("    allocated MB after each move: " + ", ".join(f"{e}{b}={mb:.0f}" for e, b, mb in moves[:10])
                    + f" ...; after the stage {_allocated_mb():.0f}")
            say(f"{pruner:>9} {mode:>4}: {sec:6.2f} s  peak {peak:8.1f} MB  (model {model_bytes(model) / 2**20:.0f}, "
                f"one block {block_mb:.0f}, outside blocks {outside_mb:.0f}, activations {act_mb:.0f}, "
                f"{pruner} statistics {stats_mb:.0f}, largest layer's working set {work_mb:.0f}; bound 1.1x their "
                f"sum {bound:.0f})  mask {rep.mask_sha256[:12]}")
            del model, adapter, blocks, layers
            shutil.rmtree(written.out, ignore_errors=True)  # 2 GB per run at the 7B shape
            empty_cache()
        a = out[f"{pruner} none"]
        for mode in ("cpu", "disk"):
            b = out[f"{pruner} {mode}"]
            say(f"{pruner:>9}: {mode} masks identical {a['mask_sha256'] == b['mask_sha256']}; peak {mode}/none "
                f"{b['peak_mb'] / a['peak_mb']:.2f}; {mode} peak within bound {b['peak_mb'] <= b['bound_mb']}; "
                f"time {mode}/none {b['seconds'] / a['seconds']:.2f}")
    return out


def _allocated_mb() -> float:
    return torch.cuda.memory_allocated() / 2**20 if CUDA.type == "cuda" else 0.0


def _watch_moves(blocks) -> list:
    """Device memory allocated after each move of a block (+: to the device, -: back to host)."""
    moves = []
    for i, block in enumerate(blocks):
        plain = block.to

        def to(target, *a, _i=i, _plain=plain, **k):
            result = _plain(target, *a, **k)
            moves.append(("-" if str(target) == "cpu" else "+", _i, _allocated_mb()))
            return result
        block.to = to
    return moves


def _load_no_tok(folder: Path, mode: str):
    """load_model wants a tokenizer; this random model has none, so place it the same way by hand."""
    from transformers import AutoModelForCausalLM

    from ecoflap.models.offload import choose_offload, model_bytes, place_model

    if mode == "disk":  # load_model's disk path, without the processors this folder lacks
        from ecoflap.models.loading import _model_without_block_weights, _skeleton
        from ecoflap.models.shards import CheckpointFiles

        files = CheckpointFiles(folder)
        skeleton = _skeleton(folder, AutoModelForCausalLM, torch.bfloat16, False)
        model = _model_without_block_weights(folder, skeleton, files, None).eval()
        named = adapter_for(model).named_blocks(model)
        place_model(model, [b for _, b in named], CUDA, "disk", [n for n, _ in named], files)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
        place_model(model, adapter_for(model).blocks(model), CUDA, choose_offload(mode, model_bytes(model), CUDA))
    model.config.use_cache = False
    return model, None


# --- C ---------------------------------------------------------------------------------------

@section("C. fashion CLIP (two towers): none vs cpu")
def check_fashion_clip(work: Path) -> dict:
    from ecoflap.models.image_calibration import build_image_caption_calibration
    from ecoflap.evaluation.vision_language import evaluate_vision_language
    from ecoflap.models.fashion_clip import train_fashion_clip
    from ecoflap.scoring.checkpointed import checkpointed_gradient_scores

    folder = work / "fashion_clip"
    t0 = time.perf_counter()
    record = train_fashion_clip(folder, epochs=3)  # on the CPU, as the download rule does (fewer epochs)
    say(f"trained in {time.perf_counter() - t0:.1f} s on the CPU ({record['trained']})")
    calib = build_image_caption_calibration(folder, "fashion-mnist", 128, 0, {})
    out: dict = {}
    for mode in ("none", "cpu"):
        model, procs = load_model(folder, CUDA, torch.float32, offload=mode)
        adapter = adapter_for(model)
        data = {k: v for k, v in calib.items()}
        scores = checkpointed_gradient_scores(model, adapter, batches(data, 32), CUDA, "block", "l2")
        rep, sec, peak = measured(lambda: prune_sequential(model, adapter, make_pruner("wanda"),
                                                           uniform(model, adapter, 0.7), batches(data, 32), CUDA))
        acc, _ = evaluate_vision_language(model, procs, adapter, {"task": "classification",
                                                                  "dataset": "fashion_mnist", "batch_size": 100})
        out[mode] = {"scores": scores, "mask_sha256": rep.mask_sha256, "seconds": sec, "peak_mb": peak,
                     "top1": acc["top1"]}
        say(f"{mode:>4}: wanda 0.7 {sec:.2f} s peak {peak:.1f} MB mask {rep.mask_sha256[:12]}  top1 {acc['top1']}")
    same = {"scores": out["none"]["scores"] == out["cpu"]["scores"],
            "mask": out["none"]["mask_sha256"] == out["cpu"]["mask_sha256"],
            "top1": out["none"]["top1"] == out["cpu"]["top1"]}
    say(f"identical: {same}")
    return {"runs": out, "identical": same}


# --- D ---------------------------------------------------------------------------------------

@section("D. scoring benchmark on CUDA (SmolLM2 shape, random weights)")
def check_benchmark(folder: Path) -> dict:
    from ecoflap.benchmark import benchmark_scoring, format_summary

    summary = benchmark_scoring(str(folder), n_samples=8, seq_len=128, batch_size=8, seeds=[0], sparsities=[0.6],
                                device=CUDA.type, threads=8 if CUDA.type == "cuda" else 2, eval_dataset="brown-heldout", eval_seq_len=256,
                                eval_windows=32)
    say(format_summary(summary))
    say("(perplexities of a random-weight model: costs and ratios are the point here, not quality)")
    return summary


# --- E ---------------------------------------------------------------------------------------

@section("E. GPU leases")
def check_leases(folder: Path, work: Path) -> dict:
    def job(tag: str, device: str, env: dict) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "ecoflap", "evaluate", "--model", str(folder), "--task", "perplexity",
               "--dataset", "brown-heldout", "--seq-len", "256", "--max-windows", "32", "--batch-size", "8",
               "--device", device, "--gpus", "1", "--out", str(work / f"{tag}.json")]
        return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **env},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    out: dict = {}
    # on a CPU rehearsal there is no GPU: simulate one, and the jobs run on the CPU (device auto)
    one = (None, "cuda") if CUDA.type == "cuda" else ("0", "auto")
    for case, ids, device in (("one GPU, two jobs", *one), ("simulated second device", "0,1", "auto")):
        env = {"ECOFLAP_LEASE_DIR": str(work / f"locks-{len(out)}")}
        if ids:
            env["ECOFLAP_GPU_IDS"] = ids
        t0 = time.time()
        procs = {tag: job(f"{len(out)}-{tag}", device, env) for tag in ("job1", "job2")}
        rows = {}
        for tag, p in procs.items():
            log, _ = p.communicate(timeout=300)
            res = json.loads((work / f"{len(out)}-{tag}.json").read_text()) if p.returncode == 0 else {}
            where = res.get("provenance", {}).get("machine", {})
            rows[tag] = {"rc": p.returncode, "lease": where.get("gpu_lease"), "gpus_used": where.get("gpus", []),
                         "device": res.get("runtime", {}).get("device"),
                         "lease_lines": [ln for ln in log.splitlines() if "GPU lease" in ln or "waiting for" in ln],
                         "finished_s": round(time.time() - t0, 1)}
            if p.returncode:
                rows[tag]["log_tail"] = log.splitlines()[-5:]
        out[case] = rows
        say(f"{case}:")
        for tag, r in rows.items():
            say(f"  {tag}: rc {r['rc']} lease {r['lease']} ran on {r['device']} saw {[g['name'] for g in r['gpus_used']]}"
                f" finished after {r['finished_s']} s")
            for ln in r["lease_lines"]:
                say(f"     {ln}")
    waits = [r["lease"]["waited_s"] for r in out["one GPU, two jobs"].values() if r["lease"]]
    say(f"one GPU: lease waits {waits} (one job must have waited for the other)")
    return out


@section("F. memory benchmark on CUDA (offload disk vs none)")
def check_memory_benchmark(work: Path) -> dict:
    cmd = [sys.executable, str(REPO / "tools" / "memory_benchmark.py"), "--work", str(work / "membench"),
           "--blocks", "6", "--compare-none", "--no-cap", "--device", str(CUDA)]
    if CUDA.type != "cuda":
        cmd += ["--small"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    say(out.stdout[-4000:])
    summary = work / "membench" / "summary.json"
    return json.loads(summary.read_text()) if summary.exists() else {"error": out.stderr[-2000:]}


PPL_RTOL = 1e-5  # perplexity between offload modes: issue 11's tolerance


def verdict(report: dict) -> list[str]:
    """Every check the sections report that did not hold: a section that raised, results that
    differ between modes, a job that failed. Empty: all passed."""
    bad = [f"{name}: {r['error']}" for name, r in report.items() if isinstance(r, dict) and "error" in r]
    for name, r in report.items():
        if not isinstance(r, dict) or "error" in r:
            continue
        if name.startswith("A."):
            bad += [f"A: {key} differs from none ({v})" for key, v in r["identical"].items()
                    if v is not True and not (not isinstance(v, bool) and v <= PPL_RTOL)]
        elif name.startswith("B."):
            bad += [f"B: {key} masks differ from none" for key, v in r.items()
                    if not key.endswith(" none") and v["mask_sha256"] != r[key.rsplit(" ", 1)[0] + " none"]["mask_sha256"]]
        elif name.startswith("C."):
            bad += [f"C: {key} differs between none and cpu" for key, v in r["identical"].items() if v is not True]
        elif name.startswith("E."):
            bad += [f"E: {case} {tag} exited {job['rc']}" for case, jobs in r.items() for tag, job in jobs.items()
                    if job["rc"] != 0]
            one = r.get("one GPU, two jobs", {})
            if one and not any(j["lease"] and j["lease"].get("waited_s", 0) > 0 for j in one.values()):
                bad.append("E: on one GPU neither job waited for the other's lease")
            two = [j["lease"] for j in r.get("simulated second device", {}).values()]
            if len(two) == 2 and (None in two or two[0].get("devices") == two[1].get("devices")):
                bad.append(f"E: with a simulated second device the jobs' leases were {two}")
        elif name.startswith("F."):
            bad += [f"F: {key} {v}" for key, v in r.get("comparison", {}).items() if not str(v).startswith("identical")]
            bad += [f"F: {row['stage']} exited {row['exit']}" for row in r.get("rows", []) if row.get("exit")]
    return bad


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="folder with SmolLM2's config.json and tokenizer files")
    p.add_argument("--out", default=None, help="folder for device_check.json")
    p.add_argument("--skip", nargs="*", default=[], help="sections to skip (A B C D E)")
    p.add_argument("--quick", action="store_true", help="section A without SparseGPT, zeroth-order on 4 batches")
    p.add_argument("--device", default="cuda", help="cpu: a rehearsal of the script on a CPU machine (small shapes)")
    args = p.parse_args()
    global CUDA, QUICK
    CUDA = torch.device(args.device)
    QUICK = args.quick
    if CUDA.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("device_check needs a CUDA device (torch.cuda.is_available() is False)")
    torch.set_num_threads(8 if CUDA.type == "cuda" else 2)
    import transformers

    REPORT["environment"] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                             "transformers": transformers.__version__}
    if CUDA.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        REPORT["environment"].update(gpu=props.name, memory_gb=round(props.total_memory / 1e9, 1))
    say(json.dumps(REPORT["environment"]))
    work = Path(tempfile.mkdtemp(prefix="ecoflap-device-"))
    small = build_smollm2_shape(Path(args.tokenizer), work / "smollm2_shape")
    t0 = time.perf_counter()
    if "A" not in args.skip:
        check_smollm2(small)
    if "B" not in args.skip:
        check_llama7b_blocks(work)
    if "C" not in args.skip:
        check_fashion_clip(work)
    if "E" not in args.skip:
        check_leases(small, work)
    if "D" not in args.skip:
        check_benchmark(small)
    if "F" not in args.skip:
        check_memory_benchmark(work)
    say(f"\ntotal {time.perf_counter() - t0:.1f} s")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "device_check.json").write_text(json.dumps(REPORT, indent=1, default=str))
    failed = verdict(REPORT)
    say("\nVERDICT: " + ("every check held" if not failed else f"{len(failed)} check(s) failed:"))
    for line in failed:
        say(f"  {line}")
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

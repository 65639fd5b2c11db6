"""Time of offload: disk (or cpu) against offload: none on the embedded default, stage by
stage, measured side by side: each stage's command runs for both modes back to back (none, disk;
in the next repeat disk, none), so that a drift in the machine's speed falls on both, and the
ratio is taken pair by pair (use an even --repeats). Also checks that both modes wrote the same scores, masks, checkpoints and
perplexity.

  python tools/offload_timing.py --model results/smollm2-135m/model \\
      --calibration results/smollm2-135m/calibration.safetensors \\
      --allocation results/smollm2-135m/wanda/0.5/allocation.json --repeats 2

The stages are the default config's (config.yaml): the zeroth-order, checkpointed and OWL
scorers, Wanda and SparseGPT pruning at 0.5, perplexity and the cloze on the Wanda checkpoint.
Each is a whole CLI process (start-up and loading included, as a workflow job runs it).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCORERS = {
    "zeroth_order": {"kind": "zeroth_order", "granularity": "block", "eps": 1e-3, "reuse_block_inputs": True,
                     "n_samples": 16, "batch_size": 1},
    "checkpointed": {"kind": "checkpointed", "granularity": "block", "reduce": "l2", "n_samples": 16, "batch_size": 4},
    "outliers": {"kind": "outliers", "m": 5, "n_samples": 64, "batch_size": 8},
}
EVALUATION = {"perplexity": {"dataset": "brown-heldout", "seq_len": 256, "max_windows": 32, "batch_size": 8},
              "lm_eval": {"tasks": ["brown_cloze"], "limit": None, "num_fewshot": 0, "batch_size": 16}}


def stages(args: argparse.Namespace, mode: str, work: Path) -> list[tuple[str, list[str]]]:
    py = [sys.executable, "-m", "ecoflap", "--threads", str(args.threads)]
    common = ["--device", "cpu", "--dtype", "float32", "--offload", mode, "--seed", "0"]
    out = [(f"score {kind}", py + ["score", "--model", args.model, *common, "--calibration", args.calibration,
                                   "--spec", json.dumps(spec), "--out", str(work / f"scores_{kind}.json")])
           for kind, spec in SCORERS.items()]
    for pruner in ("wanda", "sparsegpt"):
        out.append((f"prune {pruner}", py + ["prune", "--model", args.model, *common, "--calibration", args.calibration,
                                            "--allocation", args.allocation, "--pruner", pruner, "--n-samples", "64",
                                            "--batch-size", "8", "--out", str(work / f"pruned_{pruner}"),
                                            "--report", str(work / f"report_{pruner}.json")]))
    out.append(("evaluate (ppl + cloze)", py + ["evaluate-text", "--model", str(work / "pruned_wanda"), *common,
                                               "--spec", json.dumps(EVALUATION), "--out-dir", str(work / "eval")]))
    return out


def run(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "a") as fh:
        code = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
    if code != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed ({code}); see {log}")
    return time.perf_counter() - t0


def results_of(work: Path) -> dict:
    def read(name: str) -> dict:
        return json.loads((work / name).read_text())

    out = {f"scores {k}": read(f"scores_{k}.json")["scores"] for k in SCORERS}
    for pruner in ("wanda", "sparsegpt"):
        report = read(f"report_{pruner}.json")
        out[f"{pruner} mask"] = report["mask_sha256"]
        out[f"{pruner} checkpoint"] = report["checkpoint_sha256"]
    out["perplexity"] = read("eval/perplexity.json")["metrics"]["perplexity"]
    out["cloze"] = read("eval/lm_eval.json")["metrics"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--calibration", required=True)
    ap.add_argument("--allocation", required=True, help="an allocation.json of this model (uniform 0.5)")
    ap.add_argument("--mode", default="disk", choices=["disk", "cpu"], help="compared against offload: none")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/offload_timing"))
    args = ap.parse_args()
    modes = ("none", args.mode)
    times: dict[str, dict[str, list[float]]] = {}
    for mode in modes:
        (args.work / mode).mkdir(parents=True, exist_ok=True)
    plans = {mode: stages(args, mode, args.work / mode) for mode in modes}
    for r in range(args.repeats):
        # stage by stage, the two modes back to back (a stage's pair is seconds apart, not a whole
        # pass of every stage: a machine slowing by 1 % a minute made equal costs read 1.05), the
        # first of the pair alternating between repeats (none, disk; then disk, none) so that
        # what running second brings (a warm page cache, the drift within the pair) cancels
        order = modes if r % 2 == 0 else modes[::-1]
        for i, (label, _cmd) in enumerate(plans[modes[0]]):
            for mode in order:
                seconds = run(plans[mode][i][1], args.work / mode / "log.txt")
                times.setdefault(label, {}).setdefault(mode, []).append(seconds)
                print(f"repeat {r + 1} {mode:>4} {label:<24} {seconds:7.1f} s", flush=True)
    print(f"\noffload {args.mode} vs none, {args.threads} threads, {args.repeats} pairs (median of pair ratios)")
    print(f"{'stage':<24} {'none s':>8} {args.mode + ' s':>8} {'ratio':>6}")
    total = {m: 0.0 for m in modes}
    for label, by_mode in times.items():
        ratios = [b / a for a, b in zip(by_mode["none"], by_mode[args.mode])]
        med = {m: statistics.median(by_mode[m]) for m in modes}
        for m in modes:
            total[m] += med[m]
        print(f"{label:<24} {med['none']:>8.1f} {med[args.mode]:>8.1f} {statistics.median(ratios):>6.2f}")
    print(f"{'all stages':<24} {total['none']:>8.1f} {total[args.mode]:>8.1f} {total[args.mode] / total['none']:>6.2f}")
    a, b = results_of(args.work / "none"), results_of(args.work / args.mode)
    for key in a:
        if key == "perplexity":
            same = abs(a[key] - b[key]) <= 1e-5 * abs(a[key])
        else:
            same = a[key] == b[key]
        print(f"{key:<24} {'identical' if same else 'DIFFERENT'}" + ("" if same else f": {a[key]} vs {b[key]}"))


if __name__ == "__main__":
    main()

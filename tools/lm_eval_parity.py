"""Check that the lm-eval numbers in a result JSON equal what lm-eval's own command line gives
for the same checkpoint, task, shots, limit and seed.

    .venv/bin/python tools/lm_eval_parity.py results/smollm2-135m/wanda/0.5/model \
        results/smollm2-135m/wanda/0.5/eval/lm_eval.json
"""
from __future__ import annotations

import argparse
import json
import sys

from ecoflap.evaluation.harness import lm_eval_cli


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="the checkpoint folder the result was computed on")
    p.add_argument("result", help="the pipeline's eval/lm_eval.json")
    a = p.parse_args()
    result = json.load(open(a.result))
    settings = result["provenance"]["config"]
    ours = result["metrics"]
    theirs = lm_eval_cli(a.model, settings["tasks"], settings["batch_size"], settings["limit"],
                         settings["num_fewshot"], settings["seed"])
    same = True
    for task in settings["tasks"]:
        for key in sorted(theirs[task]):  # ours also holds per-item correctness and its interval
            a_, b_ = ours[task].get(key), theirs[task].get(key)
            same &= a_ == b_
            print(f"{task:<16} {key:<14} pipeline {a_!s:<22} lm_eval CLI {b_!s:<22} {'equal' if a_ == b_ else 'DIFFERENT'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

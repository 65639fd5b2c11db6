"""Peak memory of Wanda-pruning a random T5 whose blocks take arguments of their own (the
relative position bias, the encoder's states: `Stack.per_block_inputs`), so the capture
records every block's call. Prints the peak RSS over the loaded model's and the mask hash.

    .venv/bin/python tools/capture_memory_check.py --blocks 24 --batches 8

Run it at two commits to compare: the capture used to keep every block's captured hidden
states until the walk ended, though only block 0's are inputs (the walk computes the rest)."""
from __future__ import annotations

import argparse
import resource

import torch
import transformers as T

from ecoflap.models.registry import adapter_for
from ecoflap.pruning.engine import prune_sequential
from ecoflap.pruning.methods import Wanda


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=24, help="encoder and decoder blocks each")
    ap.add_argument("--batches", type=int, default=8, help="calibration batches of 8 x 256 tokens")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = T.T5Config(vocab_size=512, d_model=256, d_kv=32, d_ff=512, num_layers=args.blocks,
                        num_decoder_layers=args.blocks, num_heads=8, decoder_start_token_id=0)
    model = T.T5ForConditionalGeneration(config).eval()
    adapter = adapter_for(model)
    batches = [{"input_ids": torch.randint(1, 512, (8, 256)), "attention_mask": torch.ones(8, 256, dtype=torch.long),
                "labels": torch.randint(1, 512, (8, 256))} for _ in range(args.batches)]
    ratios = {f"{stack.path}.{j}.{name}": 0.5
              for stack in adapter.stacks(model) for j, block in enumerate(adapter.stack_blocks(model, stack))
              for name in adapter.prunable_layers(block)}
    loaded = peak_mb()
    report = prune_sequential(model, adapter, Wanda(), ratios, batches, torch.device("cpu"))
    print(f"peak RSS {peak_mb():.0f} MB, {peak_mb() - loaded:.0f} MB over the loaded model's {loaded:.0f} MB; "
          f"mask sha256 {report.mask_sha256[:12]}")


if __name__ == "__main__":
    main()

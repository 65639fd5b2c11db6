"""Memory benchmark of offload: disk: a model several times larger than the memory its jobs
may use, pruned, scored and evaluated anyway.

Builds, in code, a random-weight LLaMA-2-7B-shaped model (hidden 4096, MLP 11008, 32 heads,
vocabulary 32000, untied head) of `--blocks` blocks in bfloat16, written shard by shard so
that building it never holds it whole. Then runs, each as the pipeline's own CLI command in a
fresh process inside a memory cgroup capped at `--cap` (default 40 %) of the model's bytes:

  score       checkpointed gradients (the fast coarse stage: exact gradients, one block alive)
  prune       Wanda, then SparseGPT, each writing its checkpoint shard by shard
  perplexity  the model, block by block

and prints, per stage: the model's bytes, the cap, the process's peak RSS, peak / model, the
cgroup's peak (page cache included), and the wall time. A job the cap kills is reported as
such. With `--compare-none` the same stages run again with offload: none and no cap, and the
scores, masks, checkpoints and perplexity are compared (use a size that fits host memory).

  python tools/memory_benchmark.py --work /tmp/membench --blocks 20 --compare-none

Needs root (it creates and removes the cgroups: cgroup v1's memory controller, or v2's) and
about 2 x the model's size of free disk. Random weights make the perplexity meaningless as a
quality number; what is measured is memory and time, and that the modes agree.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

SHAPE_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
GB = 1e9


def say(*parts) -> None:
    print(*parts, flush=True)


# --- the model, shard by shard ---------------------------------------------------------------

def build_model(out: Path, blocks: int, shape: dict, seed: int = 0) -> int:
    """A random LLaMA of `blocks` blocks in bfloat16: one shard per block and one for the rest.
    Returns the weights' bytes."""
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    from ecoflap.models.shards import ShardWriter

    out.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(num_hidden_layers=blocks, dtype="bfloat16", **shape)
    with init_empty_weights():
        skeleton = LlamaForCausalLM(config)
    names = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    writer = ShardWriter(out, blocks + 1)

    def random(shape: tuple[int, ...], name: str) -> torch.Tensor:
        if len(shape) == 1:  # norms
            return torch.ones(shape, dtype=torch.bfloat16)
        t = torch.empty(shape, dtype=torch.float32).normal_(0.0, 0.02, generator=generator)
        return t.to(torch.bfloat16)

    for j in range(blocks):
        prefix = f"model.layers.{j}."
        writer.write({n: random(s, n) for n, s in names.items() if n.startswith(prefix)})
        say(f"  wrote block {j + 1}/{blocks}")
    writer.write({n: random(s, n) for n, s in names.items() if not n.startswith("model.layers.")})
    writer.finish()
    config.save_pretrained(out)
    _tokenizer().save_pretrained(out)
    return writer.total_size


def _tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from ecoflap.data.corpora import embedded_text

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([embedded_text("austen-emma")[:200_000]], vocab_size=3000, min_frequency=2,
                            special_tokens=["<pad>", "<s>", "</s>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


# --- memory cgroups -------------------------------------------------------------------------

class MemoryCgroup:
    """A memory cgroup of its own for one job: created with a limit, the job started inside
    it, its peak read, removed afterwards (cgroup v1's memory controller, else v2)."""

    V1 = Path("/sys/fs/cgroup/memory")
    V2 = Path("/sys/fs/cgroup")

    def __init__(self, name: str, limit: int):
        if (self.V1 / "memory.limit_in_bytes").exists():
            self.path, self.v2 = self.V1 / name, False
        elif "memory" in (self.V2 / "cgroup.subtree_control").read_text(errors="ignore").split() \
                if (self.V2 / "cgroup.subtree_control").exists() else False:
            self.path, self.v2 = self.V2 / name, True
        else:
            raise SystemExit("no memory cgroup controller found (cgroup v1 /sys/fs/cgroup/memory, or v2 with memory "
                             "in cgroup.subtree_control); run as root on a machine with memory cgroups")
        try:
            self.path.mkdir(exist_ok=True)
        except PermissionError:
            raise SystemExit(f"cannot create {self.path}: the memory benchmark needs root") from None
        try:
            (self.path / ("memory.max" if self.v2 else "memory.limit_in_bytes")).write_text(str(limit))
            if not self.v2 and (self.path / "memory.memsw.limit_in_bytes").exists():
                (self.path / "memory.memsw.limit_in_bytes").write_text(str(limit))  # no escape into swap
        except BaseException:
            self.remove()
            raise

    def enter(self) -> None:
        """Called in the child before it runs the job (preexec_fn)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak(self) -> int:
        name = "memory.peak" if self.v2 else "memory.max_usage_in_bytes"
        f = self.path / name
        return int(f.read_text()) if f.exists() else 0

    def oom_kills(self) -> int:
        f = self.path / ("memory.events" if self.v2 else "memory.oom_control")
        for line in f.read_text().splitlines() if f.exists() else []:
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def remove(self) -> None:
        for _ in range(50):  # the kernel frees the group a moment after its last process exits
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)
        say(f"  could not remove the memory cgroup {self.path} (a process still in it?): remove it with "
            f"`rmdir {self.path}` once `cat {self.path}/cgroup.procs` is empty")


# The job's peak RSS, as the kernel accounts it (ru_maxrss), without this process's. A child's
# ru_maxrss starts at what the process it was forked from had resident: exec records the old
# address space's high-water mark (vfork: the parent's lifetime peak; fork: its resident set at
# the fork). This process holds torch and built the model, so wait4 on a direct child reported
# this process's peak, not the job's. So a small launcher runs the job as its own child (spawned
# from the launcher's few MB), waits for it and writes the job's ru_maxrss to a file, then exits
# as the job did (the same code, or the same signal).
_LAUNCHER = """
import os, signal, sys
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_pid, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as fh:
    fh.write(str(usage.ru_maxrss * 1024))
if os.WIFSIGNALED(status):
    if os.WTERMSIG(status) not in (signal.SIGKILL, signal.SIGSTOP):
        signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
    os.kill(os.getpid(), os.WTERMSIG(status))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_stage(label: str, cmd: list[str], log: Path, cap: int | None) -> dict:
    """Run one CLI command in a fresh process (inside a capped cgroup when `cap`); its peak RSS
    from the kernel's accounting of the finished job (ru_maxrss of the job alone, see
    _LAUNCHER; None when the job's launcher was killed before it could report)."""
    group = MemoryCgroup(f"ecoflap-membench-{os.getpid()}-{label}", cap) if cap else None
    say(f"  {label}: {' '.join(cmd[3:7])} ...")
    peak_file = log.with_name(log.name + ".peak_rss")
    peak_file.unlink(missing_ok=True)
    try:
        t0 = time.perf_counter()
        with open(log, "w") as fh:
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _LAUNCHER, str(peak_file), *cmd], stdout=fh,
                                    stderr=subprocess.STDOUT, cwd=REPO, preexec_fn=group.enter if group else None)
            _pid, status, _usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        code = os.waitstatus_to_exitcode(status)
        peak = int(peak_file.read_text()) if peak_file.exists() else None
        peak_file.unlink(missing_ok=True)
        row = {"stage": label, "exit": code, "wall_s": round(wall, 1), "peak_rss": peak, "cap": cap or 0}
        if group:
            row["cgroup_peak"] = group.peak()
            row["oom_kills"] = group.oom_kills()
    finally:  # a cgroup is removed however the stage ends (an interrupt, a failed start)
        if group:
            group.remove()
    if code != 0:
        from ecoflap.utils.exits import explain

        killed = " (the memory cap's out-of-memory killer)" if row.get("oom_kills") else ""
        say(f"  {label} FAILED{killed}: {explain(code if code > 0 else 128 - code)}")
        say("  " + "\n  ".join(log.read_text().splitlines()[-15:]))
    return row


def stage_commands(model: Path, work: Path, mode: str, device: str = "cpu") -> list[tuple[str, list[str], Path]]:
    """(label, command, the result file whose runtime records the stage's peak device memory)."""
    py = [sys.executable, "-m", "ecoflap", "--threads", str(torch.get_num_threads())]
    common = ["--device", device, "--dtype", "bfloat16", "--offload", mode]
    calib = ["--calibration", str(work / "calibration.safetensors")]
    score_spec = json.dumps({"kind": "checkpointed", "reduce": "l2", "granularity": "block", "n_samples": 4,
                             "batch_size": 2})
    ppl_spec = json.dumps({"perplexity": {"dataset": "brown-heldout", "seq_len": 128, "max_windows": 8,
                                          "batch_size": 4}})
    out = []
    out.append((f"score ({mode})", py + ["score", "--model", str(model), *common, *calib, "--spec", score_spec,
                                         "--out", str(work / f"scores_{mode}.json")], work / f"scores_{mode}.json"))
    for pruner in ("wanda", "sparsegpt"):
        out.append((f"prune {pruner} ({mode})",
                    py + ["prune", "--model", str(model), *common, *calib, "--allocation", str(work / "alloc.json"),
                          "--pruner", pruner, "--n-samples", "4", "--batch-size", "2",
                          "--out", str(work / f"pruned_{pruner}_{mode}"),
                          "--report", str(work / f"report_{pruner}_{mode}.json")],
                    work / f"report_{pruner}_{mode}.json"))
    out.append((f"perplexity ({mode})", py + ["evaluate-text", "--model", str(model), *common,
                                              "--spec", ppl_spec, "--out-dir", str(work / f"eval_{mode}")],
                work / f"eval_{mode}" / "perplexity.json"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="a folder with about 2 x the model's size free")
    ap.add_argument("--blocks", type=int, default=20, help="LLaMA-2-7B blocks (404 MB each in bf16)")
    ap.add_argument("--cap", type=float, default=0.4, help="each job's memory cap, as a share of the model's bytes")
    ap.add_argument("--compare-none", action="store_true",
                    help="run the stages again with offload: none, uncapped, and compare")
    ap.add_argument("--small", action="store_true", help="a small shape for a quick rehearsal (hidden 256)")
    ap.add_argument("--no-cap", action="store_true", help="no cgroup (a rehearsal of a --small model, not root)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: the stages' peak GPU memory is reported too")
    ap.add_argument("--keep", action="store_true", help="keep the model and checkpoints afterwards")
    args = ap.parse_args()
    from ecoflap.utils.runtime import setup_logging

    setup_logging()
    shape = dict(SHAPE_7B, vocab_size=3200, hidden_size=256, intermediate_size=688, num_attention_heads=4,
                 num_key_value_heads=4) if args.small else SHAPE_7B
    work = args.work
    model = work / "model"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    say(f"building a {args.blocks}-block LLaMA-2-7B-shaped model in {model}")
    t0 = time.perf_counter()
    model_bytes = build_model(model, args.blocks, shape)
    say(f"  {model_bytes / GB:.2f} GB of weights in {time.perf_counter() - t0:.0f} s")

    from ecoflap.cli import main as cli
    from ecoflap.models.layout import layout_of_folder
    from ecoflap.utils.io import write_json

    laid_out = layout_of_folder(model)
    write_json(work / "layout.json", {**laid_out, "spec": {"source": "local"},
                                      "prunable_weights": sum(sum(b.values()) for b in laid_out["layout"].values())})
    cli(["calibrate", "--model", str(model), "--source", "austen-emma", "--n-samples", "4", "--seq-len", "128",
         "--out", str(work / "calibration.safetensors")])
    cli(["allocate", "--layout", str(work / "layout.json"), "--kind", "uniform", "--target", "0.5",
         "--out", str(work / "alloc.json")])
    cap = int(args.cap * model_bytes)
    rows = []
    modes = ["disk"] + (["none"] if args.compare_none else [])
    for mode in modes:
        capped = mode == "disk" and not args.no_cap
        say(f"stages with offload {mode}" + (f", each capped at {cap / GB:.2f} GB" if capped else ", no cap"))
        for label, cmd, result in stage_commands(model, work, mode, args.device):
            row = run_stage(label.replace(" ", "_").replace("(", "").replace(")", ""), cmd,
                            work / f"{label.split(' (')[0].replace(' ', '_')}_{mode}.log",
                            cap if capped else None)
            if args.device != "cpu" and result.exists():
                row["peak_gpu_mb"] = json.loads(result.read_text())["runtime"]["peak_mem_mb"]
            rows.append({**row, "stage": label, "mode": mode, "model_bytes": model_bytes})
            if label.startswith("prune") and not args.keep:  # hashed in its report; disk space is 2 x the model
                shutil.rmtree(work / f"pruned_{label.split()[1]}_{mode}", ignore_errors=True)

    cap_text = "no cap" if args.no_cap else f"cap {args.cap:.0%} of it = {cap / GB:.2f} GB"
    lines = [f"model: {args.blocks} blocks of LLaMA-2-7B's shape + embeddings and head, bfloat16, "
             f"{model_bytes / GB:.2f} GB; {cap_text}; threads {torch.get_num_threads()}",
             f"{'stage':<26} {'exit':>4} {'model GB':>8} {'cap GB':>7} {'peak RSS GB':>11} {'peak/model':>10} "
             f"{'cgroup peak GB':>14} {'wall s':>7}"]
    for r in rows:
        lines.append(f"{r['stage']:<26} {r['exit']:>4} {r['model_bytes'] / GB:>8.2f} "
                     f"{(r['cap'] / GB if r['cap'] else float('nan')):>7.2f} {_or_nan(r['peak_rss']) / GB:>11.2f} "
                     f"{_or_nan(r['peak_rss']) / r['model_bytes']:>10.3f} "
                     f"{(r.get('cgroup_peak', 0) / GB if r.get('cgroup_peak') else float('nan')):>14.2f} "
                     f"{r['wall_s']:>7.1f}" + (f"  peak GPU {r['peak_gpu_mb']:.0f} MB" if "peak_gpu_mb" in r else ""))
    comparison = compare(work) if args.compare_none else {}
    for key, value in comparison.items():
        lines.append(f"disk vs none, {key}: {value}")
    say("\n".join(lines))
    (work / "summary.txt").write_text("\n".join(lines) + "\n")
    write_json(work / "summary.json", {"rows": rows, "comparison": comparison, "blocks": args.blocks,
                                       "model_bytes": model_bytes, "cap_share": args.cap})
    if not args.keep:
        shutil.rmtree(model, ignore_errors=True)
    failed = [r["stage"] for r in rows if r["exit"] != 0]
    over = [r["stage"] for r in rows if r["mode"] == "disk" and (r["peak_rss"] or 0) > 0.35 * model_bytes
            and not args.small and not args.no_cap]
    differ = [k for k, v in comparison.items() if not str(v).startswith("identical")]
    if failed or over or differ:
        raise SystemExit(f"failed: {failed}; peak RSS over 0.35 x the model: {over}; disk and none differ: {differ}")


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else value


def compare(work: Path) -> dict[str, str]:
    def read(name: str) -> dict:
        path = work / name
        return json.loads(path.read_text()) if path.exists() else {}

    out = {}
    a, b = read("scores_disk.json").get("scores"), read("scores_none.json").get("scores")
    out["checkpointed scores"] = "identical" if a and a == b else f"DIFFER ({a} vs {b})"
    for pruner in ("wanda", "sparsegpt"):
        a, b = read(f"report_{pruner}_disk.json"), read(f"report_{pruner}_none.json")
        same = a and all(a.get(k) == b.get(k) for k in ("mask_sha256", "checkpoint_sha256"))
        out[f"{pruner} masks and checkpoint"] = "identical (sha256 of masks and of the checkpoint files)" if same \
            else f"DIFFER ({a.get('mask_sha256')} vs {b.get('mask_sha256')})"
    pa = read("eval_disk/perplexity.json").get("metrics", {}).get("perplexity")
    pb = read("eval_none/perplexity.json").get("metrics", {}).get("perplexity")
    if pa and pb:
        rel = abs(pa - pb) / pb
        out["perplexity"] = (f"identical within 1e-5 ({pa:.6g} vs {pb:.6g}, relative {rel:.1e})" if rel <= 1e-5
                             else f"DIFFER ({pa} vs {pb})")
    else:
        out["perplexity"] = "DIFFER (missing)"
    return out


if __name__ == "__main__":
    main()

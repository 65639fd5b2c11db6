"""The scoring benchmark runs every phase and prints the ratios issue 4 asks for."""
import json

from ecoflap.cli import main


def test_benchmark_scoring_on_tiny_model(tiny_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    main(["--threads", "1", "benchmark-scoring", "--model", str(tiny_dir), "--n-samples", "4", "--seq-len", "32",
          "--batch-size", "2", "--seeds", "0", "1", "--sparsities", "0.6", "--device", "cpu",
          "--eval-seq-len", "64", "--eval-windows", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    for ratio in ("time(paper) / time(fast)", "time(fast) / time(wanda pass)", "peak(fast) / peak(dense inference)",
                  "peak(first-order paper) / peak(fast)"):
        assert ratio in printed
    summary = json.loads(out.read_text())
    assert set(summary["cost"]) == {"dense_inference", "wanda_pass", "fast", "first_order_paper", "zo_paper"}
    assert all(v["seconds"] > 0 and v["peak_mb"] > 0 for v in summary["cost"].values())
    for scorer in ("paper", "fast"):
        assert len(summary["perplexity"][scorer]["0.6"]["values"]) == 2
    assert (tmp_path / "bench.txt").read_text().startswith("phase")


def test_offload_timing_pairs_each_stage_side_by_side(monkeypatch, capsys):
    """tools/offload_timing.py ran every stage of `none`, then every stage of `disk`: a stage's two
    runs were a whole pass apart, and a machine slowing by 1 % a minute read 1.05 for equal costs."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    try:
        import offload_timing as ot
    finally:
        sys.path.pop(0)
    cost = {"score zeroth_order": 160, "score checkpointed": 15, "prune wanda": 26, "evaluate (ppl + cloze)": 33}
    clock = [0.0]

    def run(cmd, log):
        seconds = cost[cmd[1]] * (1 + 0.01 * clock[0] / 60)  # the same work in both modes, a drifting machine
        clock[0] += seconds
        return seconds

    monkeypatch.setattr(ot, "stages", lambda args, mode, work: [(label, [mode, label]) for label in cost])
    monkeypatch.setattr(ot, "run", run)
    monkeypatch.setattr(ot, "results_of", lambda work: {})
    monkeypatch.setattr(sys, "argv", ["offload_timing.py", "--model", "m", "--calibration", "c", "--allocation", "a",
                                      "--repeats", "2", "--work", "/nonexistent/offload_timing"])
    monkeypatch.setattr(Path, "mkdir", lambda self, *a, **k: None)
    ot.main()
    table = capsys.readouterr().out.split("(median of pair ratios)")[1]
    ratios = [float(line.split()[-1]) for line in table.strip().splitlines()[1:]]
    assert len(ratios) == len(cost) + 1 and all(abs(r - 1) <= 0.005 for r in ratios), table

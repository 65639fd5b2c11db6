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

"""The GPU check's verdict (tools/device_check.py): its exit code says whether every check held,
so a run whose sections raised or whose modes disagreed is not read as a pass."""
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import device_check  # noqa: E402

sys.path.remove(str(REPO / "tools"))


def _passing() -> dict:
    lease = lambda dev, waited: {"devices": [dev], "waited_s": waited}  # noqa: E731
    return {
        "environment": {"torch": "2.11"},
        "A. SmolLM2": {"identical": {"cpu prune wanda 0.5": True, "disk perplexity wanda 0.5": 3e-7}},
        "B. LLaMA": {f"wanda {m}": {"mask_sha256": "ab"} for m in ("none", "cpu", "disk")},
        "C. CLIP": {"identical": {"scores": True, "mask": True, "top1": True}},
        "E. GPU leases": {"one GPU, two jobs": {"job1": {"rc": 0, "lease": lease("0", 0.0)},
                                               "job2": {"rc": 0, "lease": lease("0", 4.2)}},
                          "simulated second device": {"job1": {"rc": 0, "lease": lease("0", 0.0)},
                                                      "job2": {"rc": 0, "lease": lease("1", 0.0)}}},
        "F. memory": {"comparison": {"perplexity": "identical (relative difference 0)"}, "rows": [{"stage": "s", "exit": 0}]},
    }


def test_a_passing_report_has_no_failures():
    assert device_check.verdict(_passing()) == []


@pytest.mark.parametrize("break_it, expected", [
    (lambda r: r.update({"D. benchmark": {"error": "RuntimeError: boom"}}), "D. benchmark: RuntimeError: boom"),
    (lambda r: r["A. SmolLM2"]["identical"].update({"disk score outliers": False}), "A: disk score outliers differs"),
    (lambda r: r["A. SmolLM2"]["identical"].update({"cpu perplexity wanda 0.5": 2e-3}), "A: cpu perplexity"),
    (lambda r: r["B. LLaMA"]["wanda disk"].update(mask_sha256="cd"), "B: wanda disk masks differ"),
    (lambda r: r["C. CLIP"]["identical"].update(top1=False), "C: top1 differs"),
    (lambda r: r["E. GPU leases"]["one GPU, two jobs"]["job2"]["lease"].update(waited_s=0.0), "neither job waited"),
    (lambda r: r["E. GPU leases"]["simulated second device"]["job2"]["lease"].update(devices=["0"]),
     "simulated second device"),
    (lambda r: r["E. GPU leases"]["one GPU, two jobs"]["job1"].update(rc=1), "job1 exited 1"),
    (lambda r: r["F. memory"]["comparison"].update(perplexity="differ: 0.01"), "F: perplexity differ"),
])
def test_each_broken_check_is_named(break_it, expected):
    report = _passing()
    break_it(report)
    failed = device_check.verdict(report)
    assert len(failed) == 1 and expected in failed[0], failed

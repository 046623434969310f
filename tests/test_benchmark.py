"""The benchmark runs end to end and reports what it claims (no timing assertions)."""

import json

import pytest

from madry_ns import benchmark


@pytest.mark.slow
@pytest.mark.extended
def test_quick_benchmark_reports_every_measurement_and_target(tmp_path):
    out = tmp_path / "report.json"
    assert benchmark.main(["--quick", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    kinds = {r["kind"] for r in report["results"]}
    assert kinds == {"train_step", "eval_pgd", "shaped", "pipeline"}
    assert report["peak"]["gflops"] > 0 and report["peak_end"]["gflops"] > 0
    assert report["environment"]["tensorflow"].startswith("2.")
    ours = next(r for r in report["results"] if r["name"] == "eval PGD-10 ours")
    assert ours["identical_to_cleverhans"]
    for r in report["results"]:
        assert r["min_s"] <= r["median_s"] <= r["max_s"]
    assert {t["target"] for t in report["targets"]} >= {
        "train_step_peak_fraction", "eval_pgd_speedup_vs_cleverhans",
        "pipeline_vs_training_consumption"}


def test_flop_count_matches_the_architecture():
    from madry_ns.models import MadryWRN, ResNet20

    # ResNet-20: about 81 MFLOP per image (perf.md); Madry's WRN-34-10: 13.26 GFLOP.
    assert 80e6 < benchmark.forward_flops(ResNet20(1).build_for_input()) < 83e6
    assert 13.2e9 < benchmark.forward_flops(MadryWRN(10).build_for_input()) < 13.35e9

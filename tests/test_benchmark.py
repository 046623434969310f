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
        "train_step_peak_fraction", "train_step_fraction_of_fastest_kernel",
        "eval_pgd_speedup_vs_cleverhans", "pipeline_vs_training_consumption"}
    assert report["conv"]["gflops"] > 0


def test_flop_count_matches_the_architecture():
    from madry_ns.models import MadryWRN, ResNet20

    # ResNet-20: about 81 MFLOP per image (perf.md); Madry's WRN-34-10: 13.26 GFLOP.
    assert 80e6 < benchmark.forward_flops(ResNet20(1).build_for_input()) < 83e6
    assert 13.2e9 < benchmark.forward_flops(MadryWRN(10).build_for_input()) < 13.35e9


def test_timing_skips_the_warm_up_and_keeps_the_first_call(monkeypatch):
    clock = {"t": 0.0}
    monkeypatch.setattr(benchmark.time, "perf_counter", lambda: clock["t"])
    durations = iter([5.0, 1.0, 3.0, 2.0, 7.0])

    def call():  # each call "takes" the next duration on the fake clock
        clock["t"] += next(durations)

    assert benchmark._timeit(call, reps=3, warmup=1) == {
        "median_s": 2.0, "min_s": 1.0, "max_s": 3.0, "reps": 3, "warmup": 1, "first_s": 5.0}
    cold = benchmark._timeit(call, reps=1, warmup=0)
    assert cold["median_s"] == cold["first_s"] == 7.0 and cold["warmup"] == 0


def test_only_wrn_excludes_the_options_that_drop_the_wide_model(capsys):
    for other in ("--no-wide", "--quick"):
        with pytest.raises(SystemExit) as e:
            benchmark.main(["--only-wrn", other])
        assert e.value.code == 2 and "--only-wrn" in capsys.readouterr().err


def test_the_table_says_which_rows_include_tracing():
    row = {"name": "train madry madry_wrn w10 b64", "median_s": 60.0, "min_s": 60.0,
           "max_s": 60.0, "images_per_s": 1.0, "warmup": 0}
    report = {"environment": {"cpu": "cpu", "cores": 2, "tensorflow": "2.21", "date": "d"},
              "peak": {"size": 4096, "gflops": 400.0}, "peak_end": {"gflops": 400.0},
              "results": [row, {**row, "name": "train madry madry_wrn w1 b64", "warmup": 1}],
              "targets": []}
    text = benchmark.table(report)
    assert "| train madry madry_wrn w10 b64 (one step, tracing included) |" in text
    assert "| train madry madry_wrn w1 b64 |" in text


def test_the_step_is_also_judged_against_the_faster_roof():
    """On a host whose matmul is slow, the fraction of the matmul peak overstates; the
    second target divides by the faster of the two roofs."""
    row = {"name": "train madry resnet20 w1 b64", "kind": "train_step", "method": "madry",
           "gflops": 60.0, "peak_fraction": 0.75, "images_per_s": 16.0, "median_s": 4.0}
    by = {t["target"]: t for t in benchmark.targets([row], roof=150.0)}
    assert by["train_step_peak_fraction"]["value"] == 0.75
    assert by["train_step_peak_fraction"]["met"]
    assert by["train_step_fraction_of_fastest_kernel"]["value"] == pytest.approx(0.4)
    assert not by["train_step_fraction_of_fastest_kernel"]["met"]


def test_roofs_alone(capsys):
    assert benchmark.main(["--roofs", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert "fp32 matmul 4096^2:" in out and "3x3 convolution [64, 8, 8, 640]" in out


def _trace_cost():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks",
                        "trace_cost.py")
    spec = importlib.util.spec_from_file_location("trace_cost", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trace_cost_table_gives_each_rows_ratio_and_says_which_miss_the_target():
    trace_cost = _trace_cost()
    row = {"model": "madry_wrn", "width": 1,
           "autograph_on": {"trace_s": 10.0, "first_call_s": 5.0},
           "autograph_off": {"trace_s": 6.0, "first_call_s": 5.1}}
    report = {"what": "trace", "reps": 3, "target_trace_ratio": 0.75, "machine": "m",
              "load_average": 1.0, "tensorflow": "2", "time": "t", "command": "c",
              "rows": [{**row, "settings": {}, "trace_ratio": 0.6, "meets_target": True},
                       {**row, "settings": {"training_method": "trades"}, "trace_ratio": 0.8,
                        "meets_target": False}]}
    lines = trace_cost.markdown(report).splitlines()
    pgd, trades = [line for line in lines if line.startswith("| madry_wrn")]
    assert pgd == "| madry_wrn width 1 | PGD | 10.00 | 6.00 | 0.60 | 5.00 | 5.10 |"
    assert "| 0.80 (missed) |" in trades and "training_method trades" in trades


def test_trace_cost_refuses_zero_repetitions(capsys):
    with pytest.raises(SystemExit):
        _trace_cost().main(["--reps", "0"])
    assert "--reps must be at least 1, got 0" in capsys.readouterr().err

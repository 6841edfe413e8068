"""bench_dp's protocol pieces: the per-T noise calibration, the configuration grid and the
selection rule (fast: one 2-round FedAvg run on digits)."""

from __future__ import annotations

import math

import bench_dp as B
import pytest
from fedng.federated.aggregation.dp import epsilon_spent, noise_multiplier_for


def test_noise_is_recalibrated_for_each_number_of_rounds() -> None:
    zs = [noise_multiplier_for(4.0, 1e-5, t) for t in (1, 3, 10, 20)]
    assert zs == sorted(zs) and zs[0] < zs[-1] / 3  # fewer releases, less noise per release
    args = B.parse(["--clients", "5"])
    r = B.run_one(args, "digits", "fedavg", 4.0, 0, B.DpConfig(2), "tune")
    assert r["dp"]["noise_multiplier"] == noise_multiplier_for(4.0, 1e-5, 2)
    assert r["dp"]["rounds"] == 2 and len(r["curve"]) == 3
    assert r["dp"]["epsilon"] == epsilon_spent(r["dp"]["noise_multiplier"], 1e-5, 2)
    assert 3.99 <= r["dp"]["epsilon"] <= 4.0 and r["config"] == "T2"
    assert math.isfinite(r["val"])


def test_grid_gives_every_method_the_shared_axes_and_its_own_knobs() -> None:
    args = B.parse(
        ["--rounds", "5,10", "--knob", "fedng:damping=0.1,10", "--knob", "fedavg:lr=0.05,0.2"]
    )
    ng, avg = B.grid(args, "fedng"), B.grid(args, "fedavg")
    assert len(ng) == len(avg) == 4  # the same budget
    assert [c.label() for c in ng] == [
        "T5 damping=0.1",
        "T5 damping=10",
        "T10 damping=0.1",
        "T10 damping=10",
    ]
    assert avg[1].settings() == {"lr": 0.2} and avg[1].rounds == 5
    assert B.grid(args, "fedng+curv") == ng
    knobs = B.method_knobs(["all:local_steps=5,20", "fedng:precond=none"], "fedng")
    assert B.DpConfig(3, knobs=knobs[1]).settings() == {"local_steps": 20, "precond": "none"}
    with pytest.raises(ValueError, match="METHOD:KEY=V1,V2"):
        B.method_knobs(["fedng-damping"], "fedng")


def test_selection_uses_the_tuning_seeds_final_validation_only() -> None:
    def run(config: str, val: float, role: str = "tune", eps: float = 4.0) -> dict[str, object]:
        return {
            "task": "digits",
            "method": "fedng",
            "config": config,
            "role": role,
            "target_epsilon": eps,
            "seed": 100,
            "val": val,
        }

    runs = [
        run("T5", 0.3),
        run("T10", 0.5),
        run("T20", 0.9, role="eval"),  # an evaluation run never selects
        run("T3", 0.95, eps=8.0),  # another ε
        run("T40", 0.99),  # not in this grid
        run("T2", math.nan),
    ]
    labels = ["T2", "T5", "T10", "T20", "T3"]
    assert B.chosen(runs, "digits", "fedng", 4.0, labels) == "T10"
    assert B.chosen(runs, "digits", "fedavg", 4.0, labels) is None


def test_curvature_clip_is_the_float_payload_norm_and_the_input_shapes_norm() -> None:
    """The curvature clip must be measured on what the DP clip sees (the dequantized payload),
    not on the int8 wire payload (~400x larger on digits); the "input" release is unit-trace
    input factors, norm <= sqrt(blocks)."""
    full = B.clips("digits", "fedng", 3, 0, {"compression": "int8"})[1]
    plain = B.clips("digits", "fedng", 3, 0, {"compression": "none"})[1]
    assert full == pytest.approx(plain, rel=0.05)
    shapes = B.clips("digits", "fedng", 3, 0, {"dp_curvature_release": "input"})[1]
    assert 0 < shapes <= math.sqrt(2) * (1 + 1e-6)


def test_verdict_compares_every_fedng_variant_with_fedavg() -> None:
    def row(method: str, acc: float) -> dict[str, object]:
        return {
            "task": "digits",
            "target_epsilon": 4.0,
            "method": method,
            "config": "T10",
            "seeds": 3,
            "final_median": acc,
        }

    out = B.verdicts([row("fedavg", 0.3), row("fedng", 0.2), row("fedng+metric", 0.31)])
    assert len(out) == 2
    assert "fedng (T10) 0.2000" in out[0] and out[0].endswith("MISSED")
    assert "fedng+metric" in out[1] and out[1].endswith("MET")
    assert B.verdicts([row("fedng", 0.2)]) == [
        "digits ε=4: not one evaluated configuration per method, no verdict"
    ]


def test_paired_comparison_is_per_seed_on_the_seeds_both_ran() -> None:
    def run(method: str, seed: int, acc: float, role: str = "eval") -> dict[str, object]:
        return {
            "task": "mnist1d",
            "target_epsilon": 4.0,
            "method": method,
            "role": role,
            "seed": seed,
            "final": acc,
        }

    runs = [
        *[run("fedavg", s, a) for s, a in [(5, 0.10), (6, 0.20), (7, 0.30)]],
        *[run("fedng+metric", s, a) for s, a in [(5, 0.12), (6, 0.19), (7, 0.34), (8, 0.9)]],
        run("fedng+metric", 100, 0.0, "tune"),  # tuning runs never count
        run("fedavg", 100, 0.5, "tune"),
        {**run("fedavg", 8, 0.5), "target_epsilon": 8.0},  # nor other ε
    ]
    (line,) = B.paired(runs)
    assert "per seed [5, 6, 7]: +0.020 / -0.010 / +0.040" in line
    assert "leads on 2, behind on 1 of 3" in line
    sd = math.sqrt(((0.02 - 0.05 / 3) ** 2 + (-0.01 - 0.05 / 3) ** 2 + (0.04 - 0.05 / 3) ** 2) / 2)
    assert f"mean {0.05 / 3:+.4f} ± {sd / math.sqrt(3):.4f}" in line
    assert B.paired([r for r in runs if r["method"] != "fedavg"]) == []


def test_subsampled_runs_are_accounted_at_the_rate_the_simulator_samples() -> None:
    # 5 clients at participation 0.3 sample round(1.5) = 2 a round: the rate is 0.4, not 0.3
    args = B.parse(["--clients", "5", "--participation", "0.3"])
    r = B.run_one(args, "digits", "fedavg", 4.0, 0, B.DpConfig(2), "tune")
    z = noise_multiplier_for(4.0, 1e-5, 2, 0.4)
    assert r["dp"]["sampling_rate"] == 0.4 and r["dp"]["noise_multiplier"] == z
    assert z < noise_multiplier_for(4.0, 1e-5, 2)  # amplification by subsampling
    assert r["dp"]["epsilon"] == epsilon_spent(z, 1e-5, 2, 0.4)
    assert 3.99 <= r["dp"]["epsilon"] <= 4.0
    assert (r["clients"], r["participation"]) == (5, 0.3)


def test_mnist1d_sample_count_and_alpha_are_options_of_the_data_only() -> None:
    task = B.task_of("mnist1d", 4, 0, samples=600, alpha=1.0)
    assert len(task.y_test) == 120  # 20% of the generated examples
    assert sum(len(c.y) + len(c.y_val) for c in task.clients) == 480
    assert task.name == "mnist1d(alpha=1)"
    assert len(B.task_of("mnist1d", 4, 0).y_test) == 1000  # the task's default 5000
    with pytest.raises(ValueError, match="only to the mnist1d tasks"):
        B.task_of("digits", 4, 0, samples=600)
    for bad in (
        ["--samples", "600"],  # digits is among the default tasks
        ["--tasks", "mnist1d", "--samples", "-1"],
        ["--participation", "0"],
        ["--participation", "1.5"],
    ):
        with pytest.raises(SystemExit):
            B.parse(bad)


def test_one_result_file_holds_one_scale() -> None:
    args = B.parse(["--tasks", "mnist1d", "--clients", "200", "--samples", "20000"])
    assert B.scale_clash(None, args) is None
    same = {"clients": 200, "participation": 1.0, "samples": 20000, "alpha": None}
    assert B.scale_clash(same, args) is None
    assert "clients: the file has 20" in str(B.scale_clash({"clients": 20}, args))
    assert "participation" in str(B.scale_clash({**same, "participation": 0.1}, args))

"""`mnv2 bench` (latency mode): the rows and fields it promises, beside the torchvision baseline. No timing asserts."""

import json

from deploy_helpers import assert_one_line_error, mnv2_cli, mnv2_inprocess

import mnv2
from mnv2.analysis import count_madds
from mnv2.bench.latency import measure


def test_measure_has_baseline_and_each_backend():
    result = measure("mobilenet_v2", width=0.35, resolution=32, batch=2, threads=1, backends=["torch", "torch-fast"],
                     repeats=12)
    assert [r["backend"] for r in result["rows"]] == ["torchvision", "torch", "torch-fast"]
    base = result["rows"][0]["round_ms"]
    for row in result["rows"]:
        assert 0 < row["median_ms"] <= row["p90_ms"]
        assert row["images_per_s"] > 0
        # ten rounds of two calls; the speed-up is the median of the per-round ratios to the baseline
        assert len(row["round_ms"]) == 10
        assert min(row["round_ms"]) <= row["median_ms"] <= max(row["round_ms"])
        ratios = sorted(b / t for b, t in zip(base, row["round_ms"]))
        assert abs(row["speedup"] - (ratios[4] + ratios[5]) / 2) < 1e-9
    assert result["rows"][0]["speedup"] == 1.0
    assert result["madds"] == count_madds(mnv2.create_model("mobilenet_v2", width_mult=0.35), 32)
    assert (result["threads"], result["batch"], result["resolution"]) == (1, 2, 32)


def test_bench_cli_json_and_errors():
    r = mnv2_cli("bench", "--width", "0.35", "--resolution", "32", "--batch", "2", "--threads", "1",
                 "--backends", "torch-fast", "--repeats", "3", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert [row["backend"] for row in data["rows"]] == ["torchvision", "torch-fast"]
    assert_one_line_error(mnv2_cli("bench", "--backends", "tensorrt", "--resolution", "32"), "unknown backend")
    assert_one_line_error(mnv2_inprocess("bench", "--resolution", "8"), "--resolution")
    assert_one_line_error(mnv2_inprocess("bench", "--batch", "0", "--resolution", "32"), "--batch")

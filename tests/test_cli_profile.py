"""`mnv2 profile` end to end, in a subprocess as a user runs it."""

import json
import subprocess
import sys


def mnv2(*args):
    return subprocess.run([sys.executable, "-m", "mnv2.cli.main", *args], capture_output=True, text=True,
                          timeout=300, check=False)


def test_profile_reports_paper_figures():
    r = mnv2("profile", "mobilenet_v2", "--width", "1.0", "--resolution", "224")
    assert r.returncode == 0, r.stderr
    assert "3,504,872 parameters" in r.stdout and "300.8M MAdds" in r.stdout


def test_profile_per_layer_json():
    r = mnv2("profile", "mobilenet_v2", "--width", "0.35", "--resolution", "96", "--per-layer", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["params"] == 1_677_128
    assert sum(layer["madds"] for layer in data["layers"]) == data["madds"]
    assert abs(data["madds"] / 1e6 - 11.9) < 0.5


def test_profile_grid_has_every_figure5_cell():
    r = mnv2("profile", "--grid", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert len(rows) == 4 * 5 + 2
    for row in rows:  # our MAdds agree with the paper's rounded MMACs to within rounding
        assert abs(row["madds"] / 1e6 - row["paper_madds_m"]) < 1.0, row


def test_bad_input_is_one_line():
    for args in (["profile", "resnet50"], ["profile", "--resolution", "8"], ["profile", "--width", "abc"]):
        r = mnv2(*args)
        assert r.returncode != 0
        assert "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_profile_ssdlite_json_equals_counters():
    from mnv2 import create_model
    from mnv2.analysis import count_madds, count_params
    r = mnv2("profile", "ssdlite_mobilenet_v2", "--resolution", "320", "--per-layer", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    model = create_model("ssdlite_mobilenet_v2")  # detectors default to 80 classes, not the classifiers' 1000
    assert data["num_classes"] == model.num_classes == 80
    assert data["params"] == count_params(model) == 4_337_013
    assert data["madds"] == count_madds(model, 320) == sum(layer["madds"] for layer in data["layers"])
    assert sum(layer["params"] for layer in data["layers"]) == data["params"]
    r = mnv2("profile", "ssdlite_mobilenet_v2", "--resolution", "64", "--num-classes", "90", "--json")
    data = json.loads(r.stdout)
    assert data["num_classes"] == 90
    assert data["params"] == count_params(create_model("ssdlite_mobilenet_v2", num_classes=90))


def test_profile_table5_beside_paper():
    r = mnv2("profile", "--table5", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    ssd, lite = data["table5"]
    assert (ssd["heads"], lite["heads"]) == ("ssd", "ssdlite") and ssd["num_classes"] == 80
    for row in (ssd, lite):  # prediction layers = extra layers + heads = everything but the backbone
        assert row["total_params"] - row["prediction_params"] == 2_223_872
        assert row["prediction_params"] > row["heads_params"]
        assert row["prediction_madds_300"] < row["prediction_madds_320"]
    # docs/detection.md "Complexity": params and SSD MAdds agree with the paper's rounding; SSDLite MAdds do not
    assert round(ssd["prediction_params"] / 1e6, 1) == ssd["paper_params_m"] == 14.8
    assert round(lite["prediction_params"] / 1e6, 1) == lite["paper_params_m"] == 2.1
    assert abs(ssd["prediction_madds_320"] / 1e9 - ssd["paper_madds_b"]) < 0.01
    assert round(lite["total_params"] / 1e6, 1) == data["table6_paper"]["paper_params_m"] == 4.3
    assert round(lite["total_madds_320"] / 1e9, 1) == data["table6_paper"]["paper_madds_b"] == 0.8

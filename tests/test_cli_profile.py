"""`mnv2 profile` end to end, in a subprocess as a user runs it."""

import json
import subprocess
import sys


def mnv2(*args):
    return subprocess.run([sys.executable, "-m", "mnv2.cli.main", *args], capture_output=True, text=True,
                          timeout=300)


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

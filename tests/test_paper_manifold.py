import json

import numpy as np
import pytest

from mnv2.paper import manifold
from mnv2.paper.manifold import DIMS, collapsed, embedding, expected_collapsed, mixed, roundtrip, spiral


@pytest.fixture(scope="module")
def result():
    return manifold.run()  # the defaults: 20 seeds, 600 points; about 1 s


def test_spiral_winds_around_the_origin():
    x = spiral()
    assert x.shape == (600, 2)
    radius = np.linalg.norm(x, axis=1)
    assert radius.max() == pytest.approx(1.0) and radius.min() > 0
    assert np.all(np.diff(radius) > 0)
    # every half-plane through the origin holds part of the spiral, so ReLU cuts it for any T
    for angle in np.linspace(0, 2 * np.pi, 16, endpoint=False):
        side = x @ [np.cos(angle), np.sin(angle)] > 0
        assert 0.2 < side.mean() < 0.8
    noisy = spiral(noise=0.01, seed=1)
    assert not np.allclose(noisy, x) and np.array_equal(noisy, spiral(noise=0.01, seed=1))


@pytest.mark.parametrize("t", [np.array([[1.0, 0.5], [-0.3, 1.0]]),
                               np.array([[1.0, 0.2], [0.8, 0.5], [0.6, 0.9], [0.3, 1.0], [1.0, -0.1]])])
def test_exact_where_relu_cuts_nothing(t):
    # points in the cone where every row is positive: ReLU is the identity there and T^+ T = I
    rng = np.random.default_rng(0)
    angle, radius = rng.uniform(np.pi / 6, np.pi / 3, 50), rng.uniform(0.1, 2.0, 50)
    x = radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    assert np.all(x @ t.T > 0)
    np.testing.assert_allclose(roundtrip(x, t), x, rtol=0, atol=1e-12)
    assert not collapsed(x, t).any()


def test_collapsed_on_hand_made_matrices():
    eye = np.eye(2)
    x = np.array([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    assert collapsed(x, eye).tolist() == [False, True, True, True]
    # a collapsed point shares its output with a whole ray: (1, -1) and (1, -2) both come back as (1, 0)
    np.testing.assert_array_equal(roundtrip(np.array([[1.0, -1.0], [1.0, -2.0]]), eye), [[1.0, 0.0], [1.0, 0.0]])
    # two active rows are not enough when they are parallel: rank, not count
    t = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    assert collapsed(x, t).tolist() == [False, True, True, True]
    t = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    assert collapsed(np.array([[1.0, -0.5], [1.0, -2.0], [-1.0, 2.0]]), t).tolist() == [False, True, False]


def test_collapsed_fraction_matches_its_expectation():
    # at any x != 0 the active rows of a Gaussian T are Binomial(n, 1/2): E = (n + 1) / 2^n whatever the points;
    # 200 seeds give a standard error of about 0.01 at n = 2 and 5
    x = spiral(200)
    for n in (2, 3, 5):
        measured = np.mean([collapsed(x, embedding(n, seed)).mean() for seed in range(200)])
        assert measured == pytest.approx(expected_collapsed(n), abs=0.05)
    assert expected_collapsed(2) == 0.75 and expected_collapsed(3) == 0.5


def test_large_n_returns_half_the_input():
    # why the raw error levels off: T^+ ReLU(T x) -> E[t relu(t . x)] = x / 2 as n grows
    x = spiral()
    for seed in range(3):
        y = roundtrip(x, embedding(2000, seed))
        assert np.abs(y - x / 2).max() < 0.1
        assert np.abs(y - x).max() > 0.4


def test_mixed_sees_folds_not_scale():
    x = spiral(200)
    assert not mixed(x).any() and not mixed(0.5 * x @ [[2.0, 1.0], [0.0, 1.0]]).any()
    # the outer half folded back onto the inner half of a line: the two halves land on each other
    line = np.linspace(-1.0, 1.0, 101)
    folded = np.stack([np.abs(line), np.zeros_like(line)], axis=1)
    assert mixed(folded).mean() > 0.9


def test_measures_fall_with_n(result):
    per = {n: result["per_dim"][str(n)] for n in DIMS}
    # each of these held for all of 60 disjoint sets of 20 seeds (seeds 1000-2199); the raw error's mean does not
    # fall reliably from 2 to 3 or from 15 to 30 (heavy tail at small n, a plateau near 1/2 at large n)
    assert per[2]["error_mean"] > per[5]["error_mean"] > per[30]["error_mean"]
    assert per[2]["aligned_error_mean"] > per[5]["aligned_error_mean"] > per[30]["aligned_error_mean"]
    for name in ("collapsed_mean", "mixed_mean"):
        assert per[2][name] > per[3][name] > per[5][name] > per[15][name] >= per[30][name]
    assert per[30]["collapsed_max"] == 0.0
    for n in DIMS:
        for name in ("error", "aligned_error", "collapsed", "mixed"):
            m = per[n]
            assert m[f"{name}_min"] <= m[f"{name}_mean"] <= m[f"{name}_max"]
            assert m[f"{name}_min"] <= m[f"{name}_median"] <= m[f"{name}_max"]


def test_result_layout_and_size(result):
    text = json.dumps(result)
    assert len(text) < 300_000
    assert json.loads(text) == result
    assert result["dims"] == list(DIMS) and result["seeds"] == 20 and result["points"] == 600
    assert set(result["example"]) == {str(n) for n in DIMS}
    assert all(len(pts) == len(result["input"]) == 300 for pts in result["example"].values())
    rows = manifold.summary_rows(result)
    assert [r["n"] for r in rows] == list(DIMS)
    assert rows[0]["collapsed_expected"] == "0.75"


def test_run_is_deterministic():
    a = manifold.run(dims=(2, 5), seeds=3, points=100)
    assert a == manifold.run(dims=(2, 5), seeds=3, points=100)
    assert a != manifold.run(dims=(2, 5), seeds=3, points=100, first_seed=3)
    # a dimension's matrices do not depend on which other dimensions are run
    assert manifold.run(dims=(5,), seeds=3, points=100)["per_dim"]["5"] == a["per_dim"]["5"]


def test_run_rejects_bad_arguments():
    with pytest.raises(ValueError, match="seeds"):
        manifold.run(seeds=0)
    with pytest.raises(ValueError, match="dims"):
        manifold.run(dims=(0, 2))


def test_draw_writes_pngs(tmp_path):
    result = manifold.run(dims=(2, 30), seeds=2, points=100)
    path = manifold.draw(result, tmp_path / "figure1.png")
    assert path == tmp_path / "figure1.png"
    for written in (path, tmp_path / "figure1_measure.png"):
        data = written.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figure1.png", "figure1_measure.png"]

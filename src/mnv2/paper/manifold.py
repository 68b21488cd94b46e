"""Paper Figure 1, computed: a 2-D spiral embedded into n dimensions by a random matrix T, passed through ReLU and
mapped back with the pseudo-inverse, y = T^+ ReLU(T x) (section 3.2, "manifold of interest"; Appendix A).

The spiral winds around the origin, so every hyperplane t_i . x = 0 cuts it and ReLU zeroes a part of every turn;
a spiral placed off the origin could sit inside the positive cone of T and would show no loss at all.

What is lost, and why the measures below read as they do:

- A point x keeps its information exactly when the rows of T that stay positive at x (the active set
  A(x) = {i : t_i . x > 0}) still span R^2: then x = T_A^+ ReLU(T x)_A. With rank(T_A) < 2 the point is
  *collapsed*: ReLU maps a whole line (or a sector, for A empty) onto the same output and no decoder can undo it.
  For Gaussian T the rows are rotation-invariant, so at every x != 0 the number of active rows is Binomial(n, 1/2)
  and the expected collapsed fraction is exactly P(|A| <= 1) = (n + 1) / 2^n (0.75, 0.5, 0.19, 5e-4, 3e-8 for
  n = 2, 3, 5, 15, 30) -- the paper's Appendix A statement that the collapsed volume falls quickly with n.
- The paper's decoder T^+ is not that ideal decoder. For large n, T^+ ~ T^T / n and (1/n) sum_i t_i relu(t_i . x)
  tends to E[t relu(t . x)] = x / 2, so y tends to x / 2, not x: the raw error ||y - x|| levels off near half the
  radius instead of going to zero. The halving is a linear map a following layer undoes, not lost information, so
  the error is also reported after the best linear map from y back to x ("aligned"); what remains of it is the
  piecewise-linear distortion, which shrinks like 1/sqrt(n).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..atomic import atomic_path

DIMS = (2, 3, 5, 15, 30)
_NEIGHBOURS = 2  # `mixed`: points within this many steps along the spiral count as the same piece of it


def spiral(points: int = 600, turns: float = 3.0, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """An Archimedean spiral around the origin, (points, 2), outer radius 1, points equally spaced along its length
    (angle theta with theta^2 evenly spaced), from a quarter turn out to `turns` turns. `noise` adds Gaussian jitter
    of that standard deviation (drawn from `seed`); the default spiral is noise-free and needs no seed."""
    if points < 2 * _NEIGHBOURS + 2:
        raise ValueError(f"points must be at least {2 * _NEIGHBOURS + 2}, got {points}")
    if turns <= 0.25:
        raise ValueError(f"turns must be more than 0.25 (the spiral starts a quarter turn out), got {turns}")
    end = 2 * math.pi * turns
    start = 0.5 * math.pi  # not at the origin itself, where every T maps the point to 0 exactly
    theta = np.sqrt(np.linspace(start**2, end**2, points))
    x = np.stack([np.cos(theta), np.sin(theta)], axis=1) * (theta / end)[:, None]
    if noise:
        x = x + noise * np.random.default_rng(seed).standard_normal(x.shape)
    return x


def embedding(n: int, seed: int) -> np.ndarray:
    """The random T (n, 2) with standard Gaussian entries; each (seed, n) has its own stream, so adding a dimension
    to `dims` leaves the other dimensions' matrices as they were."""
    return np.random.default_rng((seed, n)).standard_normal((n, 2))


def roundtrip(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """y = T^+ ReLU(T x) for each row x of `x` (points, 2)."""
    return np.maximum(x @ t.T, 0.0) @ np.linalg.pinv(t).T


def collapsed(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Per point: True where the rows of T active at x (t_i . x > 0) have rank < 2, so ReLU(T x) does not determine
    x (see the module docstring). Exact: a rank of at most n x 2 matrices, no tolerance on the output."""
    active = (x @ t.T) > 0
    return np.linalg.matrix_rank(active[:, :, None] * t[None]) < 2


def mixed(y: np.ndarray) -> np.ndarray:
    """Per point i of a curve sampled in order: True where some point more than `_NEIGHBOURS` steps away along the
    curve is at least as close to y_i as y_i's nearer neighbour (i - 1 or i + 1) -- different parts of the spiral
    land on top of each other, which is what collapse looks like in the figure. False for every point of the input
    spiral; independent of the output's scale; needs no rank, so it checks `collapsed` from the samples alone."""
    d = np.sqrt(((y[:, None, :] - y[None, :, :]) ** 2).sum(-1))
    step = np.diagonal(d, 1)
    own = np.minimum(np.r_[np.inf, step], np.r_[step, np.inf])
    index = np.arange(len(y))
    far = np.abs(index[:, None] - index[None, :]) > _NEIGHBOURS
    return np.where(far, d, np.inf).min(axis=1) <= own


def aligned(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """y after the 2 x 2 linear map L that best maps it to x (least squares over all points): y @ L."""
    lin, *_ = np.linalg.lstsq(y, x, rcond=None)
    return y @ lin


def expected_collapsed(n: int) -> float:
    """E over Gaussian T of the collapsed fraction: P(Binomial(n, 1/2) <= 1) = (n + 1) / 2^n, for any point set."""
    return (n + 1) / 2.0**n


def _spread(values: list[float], name: str) -> dict:
    v = np.asarray(values)
    return {f"{name}_mean": float(v.mean()), f"{name}_median": float(np.median(v)),
            f"{name}_min": float(v.min()), f"{name}_max": float(v.max())}


def run(dims=DIMS, seeds: int = 20, points: int = 600, turns: float = 3.0, first_seed: int = 0,
        example_points: int = 300) -> dict:
    """Figure 1 for each n in `dims` with T drawn from seeds first_seed .. first_seed + seeds - 1. Per n, over the
    seeds (mean, median, min, max of the per-seed values; the raw error's mean is heavy-tailed at n = 2, 3, where a
    nearly singular T blows half-cut points up, so read its median too):

    - error: mean over points of ||y - x|| / r, r the spiral's RMS radius (y = T^+ ReLU(T x), the paper's decoder).
    - aligned_error: the same after the best linear map from y to x (`aligned`): the shape error, with the ~1/2
      scale that T^+ leaves at large n (and any other invertible linear map) taken out.
    - collapsed: the fraction of points whose active rows of T have rank < 2 (`collapsed`): lost for any decoder.
      `collapsed_expected` is its exact expectation (n + 1) / 2^n.
    - mixed: the fraction of points whose output lands on another part of the spiral (`mixed`).

    `example` holds the outputs of the first seed, `example_points` of them (every k-th point, in order along the
    spiral), rounded to 1e-4, beside `input`, the same points of the input."""
    dims = [int(n) for n in dims]
    if not dims or min(dims) < 1:
        raise ValueError(f"dims must be positive integers, got {dims}")
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}")
    if example_points < 2:
        raise ValueError(f"example_points must be at least 2, got {example_points}")
    x = spiral(points, turns)
    radius = float(np.sqrt((x**2).sum(1).mean()))
    keep = np.unique(np.linspace(0, points - 1, min(example_points, points)).round().astype(int))
    per_dim, example = {}, {}
    for n in dims:
        values = {"error": [], "aligned_error": [], "collapsed": [], "mixed": []}
        for seed in range(first_seed, first_seed + seeds):
            t = embedding(n, seed)
            y = roundtrip(x, t)
            values["error"].append(float(np.linalg.norm(y - x, axis=1).mean() / radius))
            values["aligned_error"].append(float(np.linalg.norm(aligned(y, x) - x, axis=1).mean() / radius))
            values["collapsed"].append(float(collapsed(x, t).mean()))
            values["mixed"].append(float(mixed(y).mean()))
            if seed == first_seed:
                example[str(n)] = y[keep].round(4).tolist()
        per_dim[str(n)] = {"collapsed_expected": expected_collapsed(n)}
        for name, v in values.items():
            per_dim[str(n)].update(_spread(v, name))
    return {"dims": dims, "seeds": seeds, "first_seed": first_seed, "points": points, "turns": turns,
            "radius_rms": radius, "per_dim": per_dim, "input": x[keep].round(4).tolist(), "example": example}


def summary_rows(result: dict) -> list[dict]:
    """One row per n for a Markdown table: mean relative error (mean over seeds and the min-max), its median, the
    aligned error, the collapsed fraction (measured and expected) and the mixed fraction."""
    rows = []
    for n in result["dims"]:
        m = result["per_dim"][str(n)]
        rows.append({"n": n,
                     "error": f"{m['error_mean']:.3f} ({m['error_min']:.3f}-{m['error_max']:.3f})",
                     "error_median": f"{m['error_median']:.3f}",
                     "aligned_error": f"{m['aligned_error_mean']:.3f} "
                                      f"({m['aligned_error_min']:.3f}-{m['aligned_error_max']:.3f})",
                     "collapsed": f"{m['collapsed_mean']:.4f} ({m['collapsed_min']:.4f}-{m['collapsed_max']:.4f})",
                     "collapsed_expected": f"{m['collapsed_expected']:.2g}",
                     "mixed": f"{m['mixed_mean']:.4f} ({m['mixed_min']:.4f}-{m['mixed_max']:.4f})"})
    return rows


def draw(result: dict, path: str | Path) -> Path:
    """The paper's panels at `path` (PNG): "Input", then "Output/dim=n" for each n (the first seed), points coloured
    by their position along the spiral; each panel scaled to its own points, as the paper's are (at large n the
    output is about half the input's size, see the module docstring). The measures against n go beside it, at
    `<stem>_measure.png`: errors (left) and collapsed / mixed fractions with the exact expectation (right), mean over
    the seeds with min-max bars. Returns `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    dims = result["dims"]
    panels = [("Input", np.asarray(result["input"]))]
    panels += [(f"Output/dim={n}", np.asarray(result["example"][str(n)])) for n in dims]
    colour = np.linspace(0.0, 1.0, len(panels[0][1]))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.9))
    for ax, (title, pts) in zip(np.atleast_1d(axes), panels):
        ax.scatter(pts[:, 0], pts[:, 1], c=colour, cmap="turbo", s=4, linewidths=0)
        ax.set_title(title, fontsize=10)
        ax.set_aspect("equal", adjustable="datalim")
        ax.tick_params(labelsize=6)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)

    per = [result["per_dim"][str(n)] for n in dims]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, names in ((left, ("error", "aligned_error")), (right, ("collapsed", "mixed"))):
        for name in names:
            mean = np.array([m[f"{name}_mean"] for m in per])
            bars = [mean - [m[f"{name}_min"] for m in per], [m[f"{name}_max"] for m in per] - mean]
            ax.errorbar(dims, mean, yerr=bars, marker="o", capsize=3, label=name.replace("_", " "))
        ax.set_xscale("log")
        ax.set_xticks(dims, [str(n) for n in dims])
        ax.minorticks_off()
        ax.set_xlabel("n (embedding dimension)")
    right.plot(dims, [m["collapsed_expected"] for m in per], "k--", label="(n+1)/2^n")
    left.set_yscale("log")
    left.set_ylabel("mean ||y - x|| / RMS radius")
    right.set_ylabel("fraction of points")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.suptitle(f"y = T+ ReLU(T x), {result['seeds']} random T per n", fontsize=10)
    fig.tight_layout()
    _save(fig, path.with_name(f"{path.stem}_measure{path.suffix or '.png'}"))
    plt.close(fig)
    return path


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)

"""mnv2's native kernels (`mnv2.native`, csrc/): built here, and equal to PyTorch's."""

import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mnv2 import native

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels unavailable: {native.status()}")


def test_kernels_build_wherever_a_compiler_is():
    """CI machines have g++: there the kernels must build and load, or tsplit would silently run its slow path."""
    if shutil.which("g++") is None:
        pytest.skip("no g++ on this machine")
    assert native.available(), native.status()
    assert native.status() == "native"


def _fresh_state(monkeypatch, tmp_path, **env):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("MNV2_CACHE_DIR", str(tmp_path))
    for k, v in env.items():
        monkeypatch.setenv(k, v)


def test_turned_off_by_environment(monkeypatch, tmp_path):
    _fresh_state(monkeypatch, tmp_path, MNV2_NATIVE="0")
    assert not native.available() and "MNV2_NATIVE=0" in native.status()


@pytest.mark.parametrize("compiler, message", [("no-such-compiler-mnv2", "no C++ compiler 'no-such-compiler-mnv2'"),
                                               ("false", "false failed on mnv2's native kernels")])
def test_missing_or_failing_compiler_is_reported_not_raised(monkeypatch, tmp_path, capsys, compiler, message):
    _fresh_state(monkeypatch, tmp_path, CXX=compiler)
    assert not native.available()
    assert message in native.status()
    # a compile that starts says so on stderr (it takes 15-40 s on first use), one that cannot start does not
    said = "mnv2: compiling native kernels" in capsys.readouterr().err
    assert said == (compiler == "false")
    assert not list(tmp_path.rglob("*.so")) and not list(tmp_path.rglob("*.tmp"))  # nothing half-built left behind


def test_import_without_fcntl_falls_back(tmp_path):
    """Where there is no fcntl (Windows), `import mnv2.deploy` works and the kernels report why they are not used,
    so the t-split and torch-fast run their PyTorch path."""
    code = ("import sys\n"
            "sys.modules['fcntl'] = None  # `import fcntl` now raises ImportError, as on Windows\n"
            "import mnv2.deploy\n"
            "from mnv2 import native\n"
            "print(native.available(), native.status())\n")
    env = {**os.environ, "MNV2_NATIVE": "1", "MNV2_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    if platform.system() == "Linux":  # elsewhere the kernels are off before fcntl is needed
        assert proc.stdout.startswith("False ") and "fcntl" in proc.stdout, proc.stdout
    assert not list(tmp_path.rglob("*.so"))


def _reference(x, w, b, stride, padding, dilation, lo, hi, in_bias=None):
    """PyTorch's depthwise conv (NCHW) + clamp, with the optional input activation applied first."""
    if in_bias is not None:
        x = (x + in_bias.view(1, -1, 1, 1)).clamp(0, 6)
    return F.conv2d(x, w, b, stride, padding, dilation, groups=x.shape[1]).clamp(lo, hi)


def _geometry(h, w, k, stride, padding, dilation):
    ho = (h + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    wo = (w + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    return [k, k, stride, stride, padding, padding, dilation, dilation, ho, wo]


@needs_native
@pytest.mark.parametrize("channels", [1, 5, 13, 24, 40])  # 16-, 8-, 4-wide vectors and single-channel tails
@pytest.mark.parametrize("k, stride, padding, dilation", [(3, 1, 1, 1), (3, 2, 1, 1), (3, 2, 0, 1), (3, 1, 2, 2),
                                                          (5, 2, 2, 1)])
@pytest.mark.parametrize("threads", [1, 2])
def test_depthwise_equals_conv2d(channels, k, stride, padding, dilation, threads):
    torch.set_num_threads(threads)
    n, h, w = 2, 11, 8
    x = (torch.randn(n, channels, h, w) * 3).contiguous(memory_format=torch.channels_last)
    wt, b = torch.randn(channels, 1, k, k), torch.randn(channels)
    g = _geometry(h, w, k, stride, padding, dilation)
    ref = _reference(x, wt, b, stride, padding, dilation, -1.0, 2.0)
    rows = x.permute(0, 2, 3, 1).reshape(-1, channels)
    out = torch.ops.mnv2_native.depthwise_nhwc(rows, n, h, w, wt.flatten(1).t().contiguous(), b, -1.0, 2.0, g)
    assert out.shape == (n * g[8] * g[9], channels)
    torch.testing.assert_close(out.view(n, g[8], g[9], channels).permute(0, 3, 1, 2), ref, atol=1e-5, rtol=1e-5)


@needs_native
def test_depthwise_reads_a_column_slice_of_a_wider_matrix():
    """Rows `ldi` floats apart (an identity expansion's slice of the block input) are read in place."""
    n, h, w, c = 1, 9, 9, 40
    x = torch.randn(n, c, h, w).contiguous(memory_format=torch.channels_last)
    rows = x.permute(0, 2, 3, 1).reshape(-1, c)[:, 8:32]  # channels 8..31, row stride 40
    wt, b = torch.randn(24, 1, 3, 3), torch.randn(24)
    out = torch.ops.mnv2_native.depthwise_nhwc(rows, n, h, w, wt.flatten(1).t().contiguous(), b, 0.0, 6.0,
                                               _geometry(h, w, 3, 1, 1, 1))
    ref = _reference(x[:, 8:32], wt, b, 1, 1, 1, 0.0, 6.0)
    torch.testing.assert_close(out.view(n, h, w, 24).permute(0, 3, 1, 2), ref, atol=1e-5, rtol=1e-5)


@needs_native
@pytest.mark.parametrize("t", [1, 3])
def test_split_block_equals_expand_depthwise_project(t):
    """One bottleneck (expansion with bias + ReLU6 fused into the depthwise's reads, residual) against PyTorch."""
    n, c, h, w, hidden = 2, 8, 10, 7, 30
    x = torch.randn(n, c, h, w).contiguous(memory_format=torch.channels_last)
    aw, ab = torch.randn(hidden, c) / 3, torch.randn(hidden)
    dw, db = torch.randn(hidden, 1, 3, 3), torch.randn(hidden)
    pw, pb = torch.randn(c, hidden) / 5, torch.randn(c)
    e = F.conv2d(x, aw.view(hidden, c, 1, 1))  # the bias and clamp are the depthwise's input activation
    ref = F.conv2d(_reference(e, dw, db, 1, 1, 1, 0.0, 6.0, in_bias=ab), pw.view(c, hidden, 1, 1), pb) + x
    cuts = torch.tensor_split(torch.arange(hidden), t)
    out = torch.ops.mnv2_native.split_block(
        x, [aw[i].contiguous() for i in cuts], [ab[i] for i in cuts], [dw[i].flatten(1).t().contiguous() for i in cuts],
        [db[i] for i in cuts], [pw[:, i].t().contiguous() for i in cuts], pb, _geometry(h, w, 3, 1, 1, 1),
        [0.0, 6.0, 0.0, 6.0, -float("inf"), float("inf")], True)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
def test_nms_rows_equals_torchvision_nms_per_row(threads):
    """Per-row NMS in one call equals torchvision.ops.nms on each row, score ties included."""
    from torchvision.ops import nms

    torch.set_num_threads(threads)
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        rows, k = 37, 60
        xy = torch.rand(rows, k, 2, generator=g) * 0.8
        boxes = torch.cat([xy, xy + torch.rand(rows, k, 2, generator=g) * 0.3 + 1e-3], -1)
        scores = (torch.rand(rows, k, generator=g) * 10).round() / 10  # many ties
        got = torch.ops.mnv2_native.nms_rows(boxes, scores, 0.45, 0.15)
        expected = torch.zeros_like(got)
        for r in range(rows):
            cand = (scores[r] > 0.15).nonzero().squeeze(1)
            expected[r, cand[nms(boxes[r, cand], scores[r, cand], 0.45)]] = True
        assert torch.equal(got, expected), seed
        assert got.any() and not got.all()

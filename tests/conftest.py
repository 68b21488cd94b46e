import os
import socket

import pytest
import torch

# Tests are small: with pytest-xdist workers sharing the 2-core machine, one intra-op thread each.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def free_port() -> int:
    """A TCP port free on this machine now, for a test's torchrun rendezvous: fixed ports collide when two
    distributed tests run at once under pytest-xdist."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def randomize_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, so tests see BN's effect."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
            m.weight.data.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model


@pytest.fixture
def one_thread():
    """One intra-op thread for small forwards that gain nothing from more (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def umask_027():
    """umask 027 (restored afterwards): a file written as `open(path, "w")` writes it is then 0640, a folder 0750,
    neither mkstemp's 0600 nor the usual 0644."""
    old = os.umask(0o027)
    yield
    os.umask(old)


@pytest.fixture(params=["native", "pytorch"])
def split_path(request, monkeypatch):
    """Run a test on the t-split's native kernels (where they build) and on its PyTorch slice loop (restored
    afterwards)."""
    import sys

    from mnv2 import native

    if request.param == "native" and not native.available():
        pytest.skip(f"native kernels unavailable: {native.status()}")
    monkeypatch.setattr(sys.modules["mnv2.deploy.tsplit"], "_NATIVE", request.param == "native")
    return request.param


# The demo recipe trained once per session (shared across xdist workers by a file lock): test_engine_trainer.py's
# accuracy tests and test_deploy_quantize.py's int8 agreement gates use the same runs.
@pytest.fixture(scope="session")
def short_demo_run(tmp_path_factory):
    from test_engine_trainer import demo_run
    return demo_run(tmp_path_factory, "short")


@pytest.fixture(scope="session")
def full_demo_run(tmp_path_factory):
    from test_engine_trainer import demo_run
    return demo_run(tmp_path_factory, "full")

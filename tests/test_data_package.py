"""`mnv2.data` exports its names lazily: every advertised name resolves, and the synthetic writer (used by the CLI)
does not pull in torchvision."""

import subprocess
import sys

import mnv2.data


def test_every_exported_name_resolves():
    for name in mnv2.data.__all__:
        assert getattr(mnv2.data, name) is not None
    assert sorted(mnv2.data.__all__) == sorted(mnv2.data._EXPORTS)


def test_synthetic_writer_imports_without_torchvision():
    code = "import sys, mnv2.data.synthetic, mnv2.cli.data; print('torchvision' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"

"""The `mnv2` parser: every subcommand registered without importing torch, so `mnv2 --help` starts in a fraction of a
second (each subcommand imports its heavy modules in its `run`)."""

import subprocess
import sys

COMMANDS = ("train", "eval", "export", "predict", "profile", "bench", "data", "convert")
HEAVY = ("torch", "torchvision", "onnx", "onnxruntime", "openvino", "tqdm")


def _modules_after(code: str) -> set[str]:
    """The names in `sys.modules` after running `code` in a fresh interpreter."""
    script = f"{code}\nimport sys\nprint(' '.join(sys.modules))\n"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split())


def test_building_the_parser_imports_no_torch():
    modules = _modules_after("from mnv2.cli.main import build_parser\nbuild_parser()")
    # every subcommand's module was imported to register it...
    assert {f"mnv2.cli.{c}" for c in COMMANDS} <= modules
    # ... and none of them pulled in torch & co.
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


def test_subcommand_help_imports_no_torch():
    """`mnv2 SUBCOMMAND --help` prints and exits from inside argparse: still no torch."""
    modules = _modules_after("import contextlib, io\n"
                             "from mnv2.cli.main import main\n"
                             f"for command in {COMMANDS!r}:\n"
                             "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
                             "        main([command, '--help'])")
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


def test_data_synth_imports_no_torch(tmp_path):
    """Writing the shapes dataset needs NumPy and Pillow only."""
    modules = _modules_after("from mnv2.cli.main import main\n"
                             f"assert main(['data', 'synth', '--out', {str(tmp_path)!r}, '--task', 'classify', "
                             "'--images', '16', '--size', '16']) == 0")
    assert (tmp_path / "classify" / "train").is_dir()
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))

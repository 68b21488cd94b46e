"""`mnv2 data synth` and `mnv2 data check`: errors in a subprocess exactly as a user sees them; the reports through
`main()` in this process (each subprocess pays the torch import)."""

import shutil
import subprocess
import sys

import pytest

from mnv2.cli.main import main


def mnv2_subprocess(*args):
    return subprocess.run([sys.executable, "-m", "mnv2.cli.main", *map(str, args)], capture_output=True, text=True,
                          timeout=300, check=False)


def mnv2(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    assert main(["data", "synth", "--out", str(out), "--task", "classify", "--images", "40", "--size", "32"]) == 0
    return out / "classify"


def test_synth_writes_what_it_reports(tmp_path, capsys):
    code, out, _ = mnv2(capsys, "data", "synth", "--out", tmp_path, "--task", "segment", "--images", 10,
                        "--size", 24, "--seed", 4)
    assert code == 0 and f"{tmp_path / 'segment'}: segment, 10 images of 24x24 px, seed 4" in out
    assert len(list((tmp_path / "segment" / "JPEGImages").glob("*.jpg"))) == 10


def test_check_reports_classes_and_counts_per_split(synth, capsys):
    code, out, err = mnv2(capsys, "data", "check", synth)
    assert code == 0, err
    for split in ("train", "val"):
        n = len(list((synth / split).rglob("*.jpg")))
        assert f"{split}: {n} images in 8 classes" in out
        for cls in ("circle", "crescent", "star"):
            assert f"  {cls}: {len(list((synth / split / cls).glob('*.jpg')))}\n" in out


def test_check_lists_unreadable_files(synth, tmp_path, capsys):
    ds = shutil.copytree(synth, tmp_path / "ds")
    bad = min((ds / "val" / "ring").glob("*.jpg"))
    bad.write_bytes(b"\xff\xd8\xff garbage")
    code, out, _ = mnv2(capsys, "data", "check", ds)
    assert code == 1
    assert "1 unreadable image" in out and str(bad) in out


def test_check_flags_splits_with_different_classes(synth, tmp_path, capsys):
    ds = shutil.copytree(synth, tmp_path / "ds")
    shutil.rmtree(ds / "val" / "cross")
    code, out, _ = mnv2(capsys, "data", "check", ds, "--no-decode")
    assert code == 1 and "only in train ['cross']" in out


def assert_one_line_error(r, path):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert str(path) in lines[0] and lines[0].startswith("mnv2 data: error:")


def test_missing_folder_is_one_line(tmp_path):
    r = mnv2_subprocess("data", "check", tmp_path / "nowhere")
    assert_one_line_error(r, tmp_path / "nowhere")


def test_empty_class_folder_is_one_line(synth, tmp_path):
    ds = shutil.copytree(synth, tmp_path / "ds")
    for f in (ds / "train" / "hexagon").iterdir():
        f.unlink()
    r = mnv2_subprocess("data", "check", ds)
    assert_one_line_error(r, ds / "train" / "hexagon")
    assert "empty class folder" in r.stderr


def test_synth_bad_arguments_are_one_line_and_write_nothing(tmp_path, capsys):
    code, _, err = mnv2(capsys, "data", "synth", "--out", tmp_path / "o", "--images", 3)
    assert code != 0 and len(err.strip().splitlines()) == 1 and "--images" in err
    assert not (tmp_path / "o").exists()

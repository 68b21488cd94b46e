"""The one file writer (`mnv2.atomic`): a file appears whole or not at all, with the mode a plain open() gives."""

import os
import stat

import pytest

from mnv2.atomic import atomic_path, atomic_write, atomic_write_bytes, atomic_write_text


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_follow_the_umask(tmp_path, umask_027):
    assert _mode(atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01")) == 0o640
    assert _mode(atomic_write_text(tmp_path / "b.txt", "text")) == 0o640
    with atomic_path(tmp_path / "c.bin") as tmp:
        tmp.write_bytes(b"by name")
    assert _mode(tmp_path / "c.bin") == 0o640 and (tmp_path / "c.bin").read_bytes() == b"by name"


def test_replacing_a_file_is_whole(tmp_path):
    path = tmp_path / "m.onnx"
    atomic_write_bytes(path, b"old")
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["m.onnx"]


@pytest.mark.parametrize("where", ["write", "fsync", "rename"])
def test_a_failure_while_writing_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, where):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"keep me")

    def write(f):
        f.write(b"half a model")
        if where == "write":
            raise OSError(28, "No space left on device")

    def fail(*args):
        raise OSError(5, "Input/output error")

    if where != "write":
        monkeypatch.setattr(os, {"fsync": "fsync", "rename": "replace"}[where], fail)
    with pytest.raises(OSError):
        atomic_write(path, write)
    monkeypatch.undo()
    assert path.read_bytes() == b"keep me"
    assert os.listdir(tmp_path) == ["model.onnx"]

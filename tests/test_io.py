"""Atomic writes: all or nothing, and files readable as the user's umask says."""

import stat

import pytest

from vislora import io
from vislora.io import atomic_write, atomic_write_text


def test_written_files_follow_the_umask_not_mkstemps_0600(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "_UMASK", 0o022)
    atomic_write_text(tmp_path / "a.json", "{}")
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    monkeypatch.setattr(io, "_UMASK", 0o077)
    atomic_write_text(tmp_path / "b.json", "{}")
    assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o600


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "adapter_config.json"
    target.write_text("old")

    def explode(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, explode)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json"]

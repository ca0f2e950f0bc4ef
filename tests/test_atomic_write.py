"""The write-then-rename helper: content lands whole or not at all, and each write is fsynced."""

from __future__ import annotations

import json
import os

import pytest

from amalab import atomic_write
from amalab.atomic_write import (atomic_folder, remove_leftovers, write_atomic, write_json_atomic,
                                 write_text_atomic)


def test_file_round_trip_and_replace(tmp_path):
    path = tmp_path / "sub" / "a.json"
    write_json_atomic(path, {"x": 1})
    write_json_atomic(path, {"x": 2})
    assert json.loads(path.read_text()) == {"x": 2}
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]


def test_interrupted_file_write_keeps_the_old_content(tmp_path):
    path = tmp_path / "a.txt"
    write_text_atomic(path, "old")

    def half_then_crash(f):
        f.write(b"new but unfinis")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, half_then_crash)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_unserializable_json_writes_nothing(tmp_path):
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "a.json", {"x": object()})
    assert list(tmp_path.iterdir()) == []


def test_every_file_and_its_directory_is_fsynced(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(atomic_write.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                              real_fsync(fd)))
    with atomic_folder(tmp_path / "out") as folder:
        (folder / "a.bin").write_bytes(b"a")
        (folder / "nested").mkdir()
        (folder / "nested" / "b.bin").write_bytes(b"b")
    names = {os.path.basename(p) for p in synced}
    assert {"a.bin", "b.bin", "nested"} <= names  # the files and the sub-folder, under the temporary name
    assert str(tmp_path) in synced  # the parent, after the rename
    synced.clear()
    write_text_atomic(tmp_path / "c.txt", "c")
    assert str(tmp_path) in synced and len(synced) == 2


def test_folder_replaces_whole_or_not_at_all(tmp_path):
    final = tmp_path / "cache"
    with atomic_folder(final) as folder:
        (folder / "v1").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_folder(final) as folder:
            (folder / "v2").write_text("2")
            raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in final.iterdir()) == ["v1"]
    with atomic_folder(final) as folder:
        (folder / "v3").write_text("3")
    assert sorted(p.name for p in final.iterdir()) == ["v3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_remove_leftovers(tmp_path):
    (tmp_path / ".tmp-a.json-x1").write_text("half")
    (tmp_path / ".tmp-cache-y2").mkdir()
    (tmp_path / "keep.json").write_text("{}")
    remove_leftovers(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.json"]


def test_results_get_the_users_ordinary_modes(tmp_path):
    umask = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.txt", "a")
        with atomic_folder(tmp_path / "f") as folder:
            (folder / "b.txt").write_text("b")
    finally:
        os.umask(umask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o755

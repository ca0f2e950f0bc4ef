"""Per-example caches on disk: exact round trip, refusal of a mismatched manifest, atomic writes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from amalab.training.cache import CacheMismatch, ValueCache, cached, data_hash, load_cache, save_cache

MANIFEST = {"kind": "reference", "model": "abc123", "data": "d1", "tokenization": {"max_length": 64}, "beta": 0.1}


def some_cache(n=5, seed=0):
    rng = np.random.default_rng(seed)
    return ValueCache([f"id{i}" for i in range(n)], {"chosen": rng.normal(size=n), "rejected": rng.normal(size=n)})


def test_round_trip_is_exact_and_keyed_by_id(tmp_path):
    cache = some_cache()
    save_cache(tmp_path / "c", MANIFEST, cache)
    loaded = load_cache(tmp_path / "c", MANIFEST)
    assert loaded.ids == cache.ids
    for name in cache.columns:
        np.testing.assert_array_equal(loaded.columns[name], cache.columns[name])
    np.testing.assert_array_equal(loaded.get("chosen", ["id3", "id0"]), cache.columns["chosen"][[3, 0]])
    with pytest.raises(KeyError, match="idX"):
        loaded.get("chosen", ["idX"])


def test_mismatch_is_an_error_naming_the_field(tmp_path):
    save_cache(tmp_path / "c", MANIFEST, some_cache())
    with pytest.raises(CacheMismatch, match=r"beta: cached 0.1, wanted 0.2"):
        load_cache(tmp_path / "c", {**MANIFEST, "beta": 0.2})
    with pytest.raises(CacheMismatch, match="max_length"):
        load_cache(tmp_path / "c", {**MANIFEST, "tokenization": {"max_length": 32}})
    assert load_cache(tmp_path / "absent", MANIFEST) is None


def test_cached_builds_once_then_reuses(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return some_cache()

    first = cached(tmp_path / "c", MANIFEST, build, log=lambda *_: None)
    second = cached(tmp_path / "c", MANIFEST, build, log=lambda *_: None)
    assert len(calls) == 1
    np.testing.assert_array_equal(first.columns["chosen"], second.columns["chosen"])


def test_a_failed_write_leaves_the_old_cache(tmp_path, monkeypatch):
    save_cache(tmp_path / "c", MANIFEST, some_cache(seed=1))

    def broken_savez(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        save_cache(tmp_path / "c", MANIFEST, some_cache(seed=2))
    monkeypatch.undo()
    loaded = load_cache(tmp_path / "c", MANIFEST)
    np.testing.assert_array_equal(loaded.columns["chosen"], some_cache(seed=1).columns["chosen"])
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no temporary folder left behind


def test_corrupt_cache_is_a_clear_error(tmp_path):
    save_cache(tmp_path / "c", MANIFEST, some_cache())
    (tmp_path / "c" / "values.npz").write_bytes(b"not a zip")
    with pytest.raises(CacheMismatch, match="unreadable"):
        load_cache(tmp_path / "c", MANIFEST)


def test_bad_columns_and_ids_raise():
    with pytest.raises(ValueError, match="shape"):
        ValueCache(["a", "b"], {"x": np.zeros(3)})
    with pytest.raises(ValueError, match="unique"):
        ValueCache(["a", "a"], {"x": np.zeros(2)})


def test_data_hash_depends_on_ids_and_order():
    assert data_hash(["a", "b"]) != data_hash(["b", "a"])
    assert data_hash(["a", "b"]) == data_hash(["a", "b"])
    assert json.dumps(data_hash(["a"]))  # a plain string, fit for a manifest

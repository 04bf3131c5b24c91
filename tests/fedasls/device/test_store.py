"""Per-device persistent state: round trip, sharded layout, atomic writes, corruption errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedasls.device.store import STORE_MARKER, CorruptStateError, DeviceStore


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "cursor": 17 + seed,
        "profile": {"centroid_n": 3, "domains": {"cooking": 0.5, "travel": 0.5}, "style": [1.5, "terse", None, True]},
        "buffer_embeddings": np.arange(12, dtype=np.float32).reshape(3, 4) + seed,
        "buffer_ids": np.array([4, 9, 2], dtype=np.int64),
        "buffer_domains": np.array(["cooking", "travel", "fitness"]),
        "adapter": {
            "base_model.layers.0.q_proj.lora_A.weight": torch.randn(8, 64, generator=g),
            "base_model.layers.0.q_proj.lora_B.weight": torch.zeros(64, 8, dtype=torch.bfloat16),
        },
        "ema": torch.tensor([0.25, 0.75]),
        "numpy_scalar": np.float64(2.5),
    }


def _assert_same(loaded: dict, saved: dict) -> None:
    assert set(loaded) == set(saved)
    assert loaded["cursor"] == saved["cursor"]
    assert loaded["profile"] == {"centroid_n": 3, "domains": {"cooking": 0.5, "travel": 0.5}, "style": [1.5, "terse", None, True]}
    for key in ("buffer_embeddings", "buffer_ids", "buffer_domains"):
        assert loaded[key].dtype == saved[key].dtype and loaded[key].shape == saved[key].shape
        np.testing.assert_array_equal(loaded[key], saved[key])
    assert set(loaded["adapter"]) == set(saved["adapter"])
    for name, t in saved["adapter"].items():
        assert loaded["adapter"][name].dtype == t.dtype
        assert torch.equal(loaded["adapter"][name], t)
    assert torch.equal(loaded["ema"], saved["ema"])
    assert loaded["numpy_scalar"] == 2.5 and type(loaded["numpy_scalar"]) is float


def test_round_trip_arrays_tensors_and_json(tmp_path: Path):
    store = DeviceStore(tmp_path)
    assert store.load(3) is None and not store.exists(3)
    saved = _state(0)
    store.save(3, saved)
    assert store.exists(3)
    _assert_same(store.load(3), saved)
    _assert_same(DeviceStore(tmp_path).load(3), saved)  # a new store object reads the same
    newer = _state(1)
    store.save(3, newer)
    _assert_same(store.load(3), newer)
    names = sorted(p.name for p in store.folder(3).iterdir())
    assert len(names) == 3 and "state.json" in names  # old data files were removed
    store.save(3, {"cursor": 1})  # state without arrays or tensors
    assert store.load(3) == {"cursor": 1}
    assert [p.name for p in store.folder(3).iterdir()] == ["state.json"]


def test_sharded_layout(tmp_path: Path):
    store = DeviceStore(tmp_path)
    assert store.folder(7) == tmp_path / "00" / "07" / "device-7"
    assert store.folder(1_234_567) == tmp_path / "45" / "67" / "device-1234567"
    ids = [0, 7, 99, 100, 1234, 1_234_567, 50_000, 987_654_321] + list(range(200, 450, 3))
    for d in ids:
        store.save(d, {"cursor": d})
    for d in (7, 1_234_567):
        assert (store.folder(d) / "state.json").is_file()
    top = {p.name for p in tmp_path.iterdir()} - {STORE_MARKER}
    assert all(len(name) == 2 and name.isdigit() for name in top)
    assert (tmp_path / STORE_MARKER).is_file()  # what lets --overwrite tell a store from any other folder
    assert sorted(store.device_ids()) == sorted(ids)
    assert all(store.load(d) == {"cursor": d} for d in ids)
    with pytest.raises(ValueError, match="device_id must be an integer >= 0"):
        store.folder(-3)


def test_interrupted_writes_never_replace_good_state(tmp_path: Path):
    store = DeviceStore(tmp_path)
    saved = _state(2)
    store.save(11, saved)
    folder = store.folder(11)
    # A crash mid-write leaves a half-written temp manifest and an orphan data file behind.
    (folder / ".state.json.tmp-deadbeef").write_bytes(b'{"format": 1, "device_id": 11, "js')
    (folder / "arrays-0123456789ab.npz").write_bytes(b"PK\x03\x04 garbage")
    _assert_same(store.load(11), saved)
    assert sorted(store.device_ids()) == [11]
    # A save that fails part-way (an unstorable value) leaves the previous state intact.
    with pytest.raises(TypeError, match=r"state\['bad'\]: cannot store object"):
        store.save(11, {**_state(3), "bad": object()})
    _assert_same(store.load(11), saved)
    with pytest.raises(TypeError, match="dict key 3 is not a string"):
        store.save(11, {"profile": {3: "x"}})
    with pytest.raises(TypeError, match="object array"):
        store.save(11, {"a": np.array([{"x": 1}], dtype=object)})
    _assert_same(store.load(11), saved)
    store.save(11, {"cursor": 5})  # the next good save cleans the leftovers up
    assert [p.name for p in folder.iterdir()] == ["state.json"]


def _data_file(store: DeviceStore, device: int, prefix: str) -> Path:
    (path,) = [p for p in store.folder(device).iterdir() if p.name.startswith(prefix)]
    return path


@pytest.mark.parametrize("target", ["arrays-", "tensors-", "state.json"])
@pytest.mark.parametrize("damage", ["truncate", "overwrite"])
def test_corrupt_files_raise_naming_device_and_fix(tmp_path: Path, target: str, damage: str):
    store = DeviceStore(tmp_path)
    for d in (21, 22):
        store.save(d, _state(d))
    path = _data_file(store, 21, target)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(bytes(255 - b for b in data))  # same length, different bytes
    with pytest.raises(CorruptStateError) as err:
        store.load(21)
    msg = str(err.value)
    assert "device 21" in msg and str(path) in msg and "move the folder" in msg and str(store.folder(21)) in msg
    assert err.value.device_id == 21
    _assert_same(store.load(22), _state(22))  # the neighbour is unaffected
    assert sorted(store.device_ids()) == [21, 22]
    assert store.delete(21) and store.load(21) is None  # the documented fix works
    assert not store.delete(21)
    assert sorted(store.device_ids()) == [22]
    store.save(21, {"cursor": 0})
    assert store.load(21) == {"cursor": 0}


def test_missing_data_file_is_reported(tmp_path: Path):
    store = DeviceStore(tmp_path)
    store.save(5, _state(5))
    tensors = _data_file(store, 5, "tensors-")
    tensors.unlink()
    with pytest.raises(CorruptStateError, match=r"device 5: .*tensors-.*missing"):
        store.load(5)


def test_device_ids_is_lazy(tmp_path: Path):
    store = DeviceStore(tmp_path)
    for d in range(30):
        store.save(d, {"cursor": d})
    it = store.device_ids()
    assert iter(it) is it  # a generator, not a materialised list
    assert sorted(it) == list(range(30))

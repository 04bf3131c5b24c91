"""Per-device persistent state with atomic writes; memory use independent of population size.

Layout (sharded by the device id's last four digits, so no folder grows past ~100 entries
per 10,000 devices):

    root/<(id // 100) % 100 :02d>/<id % 100 :02d>/device-<id>/
        state.json                 manifest: JSON values + which data files hold the rest
        arrays-<token>.npz         numpy arrays (allow_pickle=False)
        tensors-<token>.safetensors torch tensors (e.g. a LoRA adapter state dict)

A save writes new data files under a fresh token, then atomically replaces `state.json`
(temp file in the same folder + fsync + os.replace), then removes files the new manifest no
longer names. A crash at any point leaves either the old or the new state, never a mix.
The manifest records a SHA-256 per data file, so any corruption is detected on load.
One writer per device at a time is assumed (devices never share a folder).

Rounds (exact resume). A store opened for a federated round (`DeviceStore(root, round=r)`)
tags each save with r and keeps the state it replaced as `state.prev.json` (two generations).
A device's round-r save happens before the server records round r, so a run killed in the
middle of round r leaves some devices at "after r" while the run's records end at r-1. When
round r runs again, `load` first rolls such a device back (any generation tagged >= r is from
an unrecorded attempt of round r, since the server runs round r only after recording r-1), so
the rerun starts from exactly the state the first attempt started from. Why generations in the
store rather than staging writes on the server: device state never leaves the device, and a
real device (Deployment Engine) must be able to roll back on its own.

`errors.log` in a device's folder keeps the tracebacks of its failed rounds (they never leave
the device); `set_aside` moves a corrupt device folder aside (`device-<id>.corrupt-<time>`) so
the device starts afresh while the bad files stay for inspection.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from fedasls.errors import FedaslsError
from fedasls.files import TMP_MARK as _TMP_MARK
from fedasls.files import atomic_write
from fedasls.files import fsync_dir as _fsync_dir

FORMAT_VERSION = 1
STORE_MARKER = "fedasls-store.json"  # in a store's root: `--overwrite` removes only folders that hold one
MANIFEST = "state.json"
PREVIOUS = "state.prev.json"  # the generation a round-tagged save replaced
ERRORS_LOG = "errors.log"  # device-local tracebacks of failed rounds


class CorruptStateError(FedaslsError, RuntimeError):
    """A device's stored state cannot be read. Other devices are unaffected."""

    quotes_data = True  # its reason can quote what it found in the state (e.g. an unknown counter name)

    def __init__(self, device_id: int, path: Path, reason: str, folder: Path):
        self.device_id, self.path, self.reason, self.folder = device_id, path, reason, folder
        super().__init__(
            f"device {device_id}: stored state file {path} is corrupt ({reason}). "
            f"Fix: move the folder {folder} aside or delete it (DeviceStore.set_aside({device_id})) to reset "
            "this device; other devices are not affected."
        )


def _check_device_id(device_id: Any) -> int:
    if isinstance(device_id, bool) or not isinstance(device_id, (int, np.integer)) or device_id < 0:
        raise ValueError(f"device_id must be an integer >= 0, got {device_id!r}")
    return int(device_id)


def _to_json(value: Any, where: str) -> Any:
    """Validate (and convert numpy scalars in) a JSON value; dict keys must be strings."""
    if value is None or isinstance(value, (bool, str, int, float)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"state{where}: dict key {k!r} is not a string; JSON state needs string keys")
            out[k] = _to_json(v, f"{where}[{k!r}]")
        return out
    raise TypeError(
        f"state{where}: cannot store {type(value).__name__}; top-level values may be JSON data, "
        "numpy arrays, torch tensors or dicts of torch tensors"
    )


def _is_tensor_dict(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


class DeviceStore:
    """Persistent per-device state: `save`, `load`, `exists`, `delete`, `set_aside`, `log_failure`,
    `device_ids`. With `round=r`, saves are tagged with round r and loads roll back unrecorded
    attempts of round r (see the module docstring)."""

    def __init__(self, root: str | Path, round: int | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.round = round
        if not (self.root / STORE_MARKER).is_file():
            atomic_write(self.root / STORE_MARKER, json.dumps({"format": FORMAT_VERSION}).encode("utf-8"))

    def folder(self, device_id: int) -> Path:
        """The device's folder, e.g. root/00/07/device-7 for device 7."""
        d = _check_device_id(device_id)
        return self.root / f"{(d // 100) % 100:02d}" / f"{d % 100:02d}" / f"device-{d}"

    def exists(self, device_id: int) -> bool:
        return (self.folder(device_id) / MANIFEST).is_file()

    def save(self, device_id: int, state: dict[str, Any]) -> None:
        """Atomically replace the device's state.

        Top-level values may be JSON data (numpy scalars become Python numbers, tuples
        become lists), numpy arrays, torch tensors, or non-empty dicts of torch tensors
        (stored CPU, contiguous, with safetensors).
        """
        d = _check_device_id(device_id)
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise TypeError(f"device {d}: state must be a dict with string keys")
        folder = self.folder(d)
        folder.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex[:12]
        manifest: dict[str, Any] = {"format": FORMAT_VERSION, "device_id": d, "round": self.round, "json": {},
                                    "files": {}}
        arrays: dict[str, np.ndarray] = {}
        tensors: dict[str, torch.Tensor] = {}
        tensor_index: dict[str, Any] = {}
        for key, value in state.items():
            if isinstance(value, np.ndarray):
                if value.dtype == object:
                    raise TypeError(f"device {d}: state[{key!r}] is an object array; store numeric/str arrays only")
                arrays[key] = value
            elif isinstance(value, torch.Tensor):
                stored = f"t{len(tensors)}"
                tensors[stored] = value.detach().cpu().contiguous().clone()
                tensor_index[key] = stored
            elif _is_tensor_dict(value):
                names = {}
                for name, t in value.items():
                    stored = f"t{len(tensors)}"
                    tensors[stored] = t.detach().cpu().contiguous().clone()
                    names[str(name)] = stored
                tensor_index[key] = names
            else:
                manifest["json"][key] = _to_json(value, f"[{key!r}]")
        if arrays:
            buf = io.BytesIO()
            np.savez(buf, **{f"a{i}": a for i, a in enumerate(arrays.values())})
            self._write_data(folder, manifest, "arrays", f"arrays-{token}.npz", buf.getvalue())
            manifest["arrays"] = {key: f"a{i}" for i, key in enumerate(arrays)}
        if tensors:
            self._write_data(folder, manifest, "tensors", f"tensors-{token}.safetensors", save_tensors(tensors))
            manifest["tensors"] = tensor_index
        keep = {MANIFEST, ERRORS_LOG, *(f["name"] for f in manifest["files"].values())}
        if self.round is None:
            self._remove(folder / PREVIOUS)
        else:
            current = _read_manifest(folder / MANIFEST)
            if current is not None and _older(current, self.round):
                atomic_write(folder / PREVIOUS, (folder / MANIFEST).read_bytes())  # keep the state it replaces
            previous = _read_manifest(folder / PREVIOUS)
            if previous is not None:
                keep |= {PREVIOUS, *(f.get("name") for f in previous.get("files", {}).values() if isinstance(f, dict))}
        atomic_write(folder / MANIFEST, json.dumps(manifest).encode("utf-8"))
        for entry in os.scandir(folder):
            if entry.name not in keep and entry.is_file():
                os.unlink(entry.path)

    @staticmethod
    def _remove(path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass

    def rollback(self, device_id: int, round: int) -> bool:
        """Undo generations written by an unrecorded attempt of round `round` (tagged >= it);
        True if there was one. The previous generation becomes current again, or the device
        has no state if it had none before."""
        folder = self.folder(device_id)
        current = _read_manifest(folder / MANIFEST)
        if current is None or _older(current, round):
            return False
        previous = _read_manifest(folder / PREVIOUS)
        if previous is not None and _older(previous, round):
            atomic_write(folder / MANIFEST, (folder / PREVIOUS).read_bytes())
        else:
            self._remove(folder / MANIFEST)
        self._remove(folder / PREVIOUS)
        _fsync_dir(folder)
        return True

    @staticmethod
    def _write_data(folder: Path, manifest: dict, kind: str, name: str, data: bytes) -> None:
        atomic_write(folder / name, data)
        manifest["files"][kind] = {"name": name, "sha256": hashlib.sha256(data).hexdigest()}

    def load(self, device_id: int) -> dict[str, Any] | None:
        """The device's state, or None if it was never saved. Raises CorruptStateError.

        A store opened for round r first rolls back what an unrecorded attempt of round r saved."""
        d = _check_device_id(device_id)
        folder = self.folder(d)
        path = folder / MANIFEST
        if self.round is not None and path.is_file():
            self.rollback(d, self.round)
        if not path.is_file():
            return None

        def corrupt(p: Path, reason: str) -> CorruptStateError:
            return CorruptStateError(d, p, reason, folder)

        try:
            manifest = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise corrupt(path, f"not valid JSON: {err}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION or manifest.get("device_id") != d:
            raise corrupt(path, f"not a format-{FORMAT_VERSION} manifest for device {d}")
        if not isinstance(manifest.get("json"), dict) or not isinstance(manifest.get("files"), dict):
            raise corrupt(path, "manifest lacks its 'json' or 'files' table")
        state: dict[str, Any] = dict(manifest["json"])
        blobs: dict[str, tuple[Path, bytes]] = {}
        for kind, info in manifest["files"].items():
            try:
                p = folder / info["name"]
                expected = info["sha256"]
            except (TypeError, KeyError):
                raise corrupt(path, f"bad entry for data file '{kind}'") from None
            if not p.is_file():
                raise corrupt(p, "file named by the manifest is missing")
            data = p.read_bytes()
            if hashlib.sha256(data).hexdigest() != expected:
                raise corrupt(p, "checksum mismatch (truncated or overwritten)")
            blobs[kind] = (p, data)
        for kind, table in (("arrays", manifest.get("arrays")), ("tensors", manifest.get("tensors"))):
            if table is None:
                continue
            if kind not in blobs or not isinstance(table, dict):
                raise corrupt(path, f"manifest lists {kind} but no valid '{kind}' data file")
            p, data = blobs[kind]
            try:
                if kind == "arrays":
                    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                        for key, member in table.items():
                            state[key] = npz[member]
                else:
                    tensors = load_tensors(data)
                    for key, entry in table.items():
                        state[key] = tensors[entry] if isinstance(entry, str) else {n: tensors[s] for n, s in entry.items()}
            except Exception as err:  # noqa: BLE001 - any decode failure means corrupt data
                raise corrupt(p, f"does not decode: {type(err).__name__}: {err}") from None
        return state

    def delete(self, device_id: int) -> bool:
        """Remove the device's state; True if there was any."""
        folder = self.folder(device_id)
        if not folder.exists():
            return False
        tomb = folder.with_name(f".{folder.name}{_TMP_MARK}{uuid.uuid4().hex}")
        os.replace(folder, tomb)  # atomic: the device vanishes at once
        shutil.rmtree(tomb, ignore_errors=True)
        return True

    def set_aside(self, device_id: int) -> Path | None:
        """Move the device's folder aside (kept for inspection, never loaded again) so the device
        starts afresh; returns where it went, or None if it had no folder."""
        folder = self.folder(device_id)
        if not folder.exists():
            return None
        target = folder.with_name(f"{folder.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}")
        os.replace(folder, target)
        _fsync_dir(folder.parent)
        return target

    def log_failure(self, device_id: int, text: str) -> Path:
        """Append a failed round's traceback to the device's own errors.log (it never leaves the device)."""
        folder = self.folder(device_id)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / ERRORS_LOG
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with path.open("a", encoding="utf-8") as f:
            f.write(f"--- {stamp} round {self.round if self.round is not None else '-'}\n{text.rstrip()}\n")
        return path

    def device_ids(self) -> Iterator[int]:
        """Ids of saved devices, in shard order (streamed: no index of all devices in memory)."""
        for shard1 in _sorted_dirs(self.root):
            for shard2 in _sorted_dirs(shard1):
                for dev in _sorted_dirs(shard2):
                    name = dev.name
                    if name.startswith("device-") and name[7:].isdigit() and (dev / MANIFEST).is_file():
                        yield int(name[7:])


def is_device_store(path: Path) -> bool:
    """True if `path` is a device store's root: it holds the store marker, or (a store written before
    the marker existed) at least one device manifest at root/<shard>/<shard>/device-<id>/state.json."""
    if (path / STORE_MARKER).is_file():
        return True
    return any(path.glob(f"[0-9][0-9]/[0-9][0-9]/device-*/{MANIFEST}"))


def _read_manifest(path: Path) -> dict[str, Any] | None:
    """A manifest's JSON, or None if it is missing or unreadable (load reports corruption)."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _older(manifest: dict[str, Any], round: int) -> bool:
    """Whether a generation was written before round `round` (untagged saves count as older)."""
    tag = manifest.get("round")
    return not isinstance(tag, int) or tag < round


def _sorted_dirs(path: Path) -> list[Path]:
    """Sub-folders of one shard level (at most ~100, or the devices of one leaf shard)."""
    try:
        return sorted(Path(e.path) for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
    except FileNotFoundError:
        return []

"""Several devices side by side on one worker slot: a small pool of device processes.

Flower's simulation runs at most min(32, cpu_count + 4) ClientApp calls at once on the driver host
(one thread per call), whatever the Ray cluster's size. To use a larger cluster, one message
carries several devices and the worker slot (a Ray actor holding that many CPUs) runs them in
parallel here, each in its own process with its own base model, loaded once and reused.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor

logger = logging.getLogger(__name__)

_POOL: dict[int, ProcessPoolExecutor] = {}

DeviceRoundFn = Callable[[str, int, float, str, bool], dict[str, float | int]]


def _pool(size: int) -> ProcessPoolExecutor:
    """This process's pool of `size` device processes (spawned once: each keeps its model)."""
    if size not in _POOL:
        for old in _POOL.values():
            old.shutdown(cancel_futures=True)
        _POOL.clear()
        _POOL[size] = ProcessPoolExecutor(max_workers=size, mp_context=multiprocessing.get_context("spawn"))
    return _POOL[size]


def run_devices(fn: DeviceRoundFn, settings_json: str, device_ids: list[int], now: float, store_dir: str,
                simulated_timing: bool, parallel: int) -> list[dict[str, float | int]]:
    """Reply metrics of each device that finished its round; a device that raised is left out (the
    server counts it failed) and logged here, on the worker, never sent."""
    if parallel <= 1:
        futures = [_run_inline(fn, settings_json, d, now, store_dir, simulated_timing) for d in device_ids]
    else:
        pool = _pool(parallel)
        futures = [pool.submit(fn, settings_json, d, now, store_dir, simulated_timing) for d in device_ids]
    rows = []
    for device_id, future in zip(device_ids, futures):
        try:
            rows.append(future.result())
        except Exception:  # one device failing never stops the others on the slot
            logger.exception("device %d failed its round", device_id)
    return rows


def _run_inline(fn: DeviceRoundFn, *args: object) -> Future:
    future: Future = Future()
    try:
        future.set_result(fn(*args))  # type: ignore[arg-type]
    except Exception as err:
        future.set_exception(err)
    return future

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
from typing import Any

from fedasls.device.faults import DeviceFailure, FailureCode

logger = logging.getLogger(__name__)

_POOL: dict[int, ProcessPoolExecutor] = {}

# (settings JSON, device id, now, store, simulated timing?, server round) -> the device's result
DeviceRoundFn = Callable[[str, int, float, str, bool, "int | None"], Any]


def _pool(size: int) -> ProcessPoolExecutor:
    """This process's pool of `size` device processes (spawned once: each keeps its model)."""
    if size not in _POOL:
        for old in _POOL.values():
            old.shutdown(cancel_futures=True)
        _POOL.clear()
        _POOL[size] = ProcessPoolExecutor(max_workers=size, mp_context=multiprocessing.get_context("spawn"))
    return _POOL[size]


def run_devices(fn: DeviceRoundFn, settings_json: str, device_ids: list[int], now: float, store_dir: str,
                simulated_timing: bool, parallel: int, server_round: int | None = None,
                batch_model: Any = None) -> tuple[list[Any], dict[int, FailureCode]]:
    """`fn`'s result for each device that finished its round (in `device_ids` order), and the
    FailureCode of each device that raised (its traceback stays on the worker: the device's
    errors.log, or this worker's log). With `batch_model` (simulation.batch_devices: this process's
    shared peft model) the devices run here, taking turns, their generation batched
    (fedasls.device.batched); `parallel` is then not used."""
    args = (settings_json, now, store_dir, simulated_timing, server_round)
    if batch_model is not None and len(device_ids) > 1:
        from functools import partial

        from fedasls.device.batched import run_batched

        futures = run_batched(batch_model, [partial(_call, fn, d, *args) for d in device_ids])
    elif parallel <= 1:
        futures = [_run_inline(fn, d, *args) for d in device_ids]
    else:
        pool = _pool(parallel)
        futures = [pool.submit(_call, fn, d, *args) for d in device_ids]
    rows: list[Any] = []
    failures: dict[int, FailureCode] = {}
    for device_id, future in zip(device_ids, futures):
        try:
            rows.append(future.result())
        except DeviceFailure as failure:  # one device failing never stops the others on the slot
            failures[device_id] = failure.code
        except Exception:  # noqa: BLE001 - outside the device round (e.g. the pool): logged here only
            logger.exception("device %d failed its round", device_id)
            failures[device_id] = FailureCode.ERROR
    return rows, failures


def _call(fn: DeviceRoundFn, device_id: int, settings_json: str, now: float, store_dir: str,
          simulated_timing: bool, server_round: int | None) -> Any:
    return fn(settings_json, device_id, now, store_dir, simulated_timing, server_round)


def _run_inline(fn: DeviceRoundFn, *args: object) -> Future:
    future: Future = Future()
    try:
        future.set_result(_call(fn, *args))  # type: ignore[arg-type]
    except Exception as err:
        future.set_exception(err)
    return future

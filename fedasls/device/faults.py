"""Why a device round failed, as a code, with the details kept on the device.

A failing device must not leak: an exception's text can quote user data (a loader error once put
"... My bank PIN is 4321 ..." on the server console). So a failure leaves the device as a
`FailureCode` only; `contained` writes where it failed (the exception's type and the stack's files,
lines and functions, never its message or any value) to the device's own `errors.log` in its
store folder, moves a corrupt state aside (the device starts afresh next time, the bad files are
kept), and raises `DeviceFailure`, whose text is fixed. The ClientApp's privacy guard turns that
into an error reply holding the code and its fixed message (wire/messages.py).
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterator
from enum import IntEnum
from typing import TYPE_CHECKING

from fedasls.errors import FedaslsError

if TYPE_CHECKING:  # the store (torch) is imported on use: the privacy guard imports this module
    from fedasls.device.store import DeviceStore


class FailureCode(IntEnum):
    """Error codes a device may send (Flower's own codes are 0-8; ours start at 100)."""

    ERROR = 100  # the device round raised
    CORRUPT_STATE = 101  # its stored state was unreadable: moved aside, the device was reset
    REFUSED = 102  # the privacy guard refused the reply the device built
    NO_KEPT_UPDATE = 103  # two-phase upload: asked for an update it does not hold (wrong round, state lost)

    @property
    def reason(self) -> str:
        """The short name written to the per-device results ("error", "corrupt_state", "refused")."""
        return self.name.lower()

    @property
    def message(self) -> str:
        """The fixed text sent with the code (never an exception's text)."""
        return FIXED_MESSAGES[self]


FIXED_MESSAGES = {
    FailureCode.ERROR: "fedasls: the device round raised an error; its traceback is in the device's errors.log "
                       "(or in the worker's log, for an error outside the device round)",
    FailureCode.CORRUPT_STATE: "fedasls: the device's stored state was corrupt; it was moved aside and the device reset",
    FailureCode.REFUSED: "fedasls: the privacy guard refused the device's reply; details are in the device's log",
    FailureCode.NO_KEPT_UPDATE: "fedasls: the device holds no kept update for this round (another round or "
                                "attempt kept it, or its state was lost); the round counts it as a dropout",
}


class DeviceFailure(RuntimeError):
    """A device round failed; the text is fixed, the details are in the device's errors.log."""

    def __init__(self, code: FailureCode, device_id: int | None = None):
        self.code, self.device_id = code, device_id
        super().__init__(code.message)

    def __reduce__(self):  # crosses process pools as its code only
        return DeviceFailure, (self.code, self.device_id)


@contextlib.contextmanager
def contained(device_id: int, store: DeviceStore) -> Iterator[None]:
    """Run a device round so that any failure leaves only a code: the traceback goes to the
    device's errors.log, a corrupt state is moved aside, and `DeviceFailure` is raised."""
    from fedasls.device.store import CorruptStateError

    try:
        yield
    except DeviceFailure:
        raise
    except CorruptStateError as err:
        moved = store.set_aside(device_id)
        store.log_failure(device_id, f"{where_it_failed(err)}\nstate moved aside to {moved}; the device was reset")
        raise DeviceFailure(FailureCode.CORRUPT_STATE, device_id) from None
    except Exception as err:  # noqa: BLE001 - every failure is reported by code only
        store.log_failure(device_id, where_it_failed(err))
        raise DeviceFailure(FailureCode.ERROR, device_id) from None


def where_it_failed(err: BaseException) -> str:
    """A traceback without data: each exception's type (with its causes) and the stack's file, line and
    function, never a source line, nor an exception's message (it can quote user text) unless it is
    one of ours that promises not to (`FedaslsError.quotes_data` False: files, lines, keys and types)."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        frames = traceback.extract_tb(current.__traceback__)
        stack = "\n".join(f'  File "{f.filename}", line {f.lineno}, in {f.name}' for f in frames)
        said = (f": {current}" if isinstance(current, FedaslsError) and not current.quotes_data
                else " (message withheld: it may quote data)")
        parts.append(f"Traceback (most recent call last):\n{stack}\n"
                     f"{type(current).__module__}.{type(current).__qualname__}{said}")
        current = current.__cause__ or current.__context__
    return "\n\nwhile handling, or caused by:\n".join(reversed(parts)) if len(parts) > 1 else parts[0]

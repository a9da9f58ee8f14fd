"""WebSocket data frames from the bridge to the agent, built without websockets' ``Frame``.

A client must mask every frame with a fresh, unpredictable 4-byte key (RFC 6455 5.3).
websockets draws each key with ``secrets.token_bytes(4)``: one ``getrandom`` system call per
frame, which at 50 caller frames a second per call was a tenth of the bridge's CPU under load.
Here keys are cut from one ``os.urandom`` read per ``MASK_KEYS_PER_READ`` frames: the same
kernel source, so just as unpredictable, at a 1/1024th of the calls. The masking itself is
websockets' C ``apply_mask``.

Only complete (FIN) text and binary frames are built here; handshake, control frames and
close stay websockets' own, as does parsing what the agent sends.
"""

from __future__ import annotations

import os
import struct

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets without its C extension
    from websockets.utils import apply_mask

MASK_KEYS_PER_READ = 1024
"""Keys per ``os.urandom`` read (4 KiB): about 20 s of one call's caller audio at 50 frames
a second; the pool is shared by the process's calls."""

TEXT = 0x81  # FIN + opcode 1
BINARY = 0x82  # FIN + opcode 2
_MASKED = 0x80


class MaskKeys:
    """Fresh 4-byte masking keys, read from ``os.urandom`` a pool at a time."""

    def __init__(self) -> None:
        self._pool = b""
        self._next = 0

    def take(self) -> bytes:
        start = self._next
        if start >= len(self._pool):
            self._pool, start = os.urandom(4 * MASK_KEYS_PER_READ), 0
        self._next = start + 4
        return self._pool[start : start + 4]


_keys = MaskKeys()


def client_frame(first_byte: int, payload: bytes, keys: MaskKeys = _keys) -> bytes:
    """One masked, unfragmented frame: ``first_byte`` is ``TEXT`` or ``BINARY``."""
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", first_byte, _MASKED | size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", first_byte, _MASKED | 126, size)
    else:
        header = struct.pack("!BBQ", first_byte, _MASKED | 127, size)
    key = keys.take()
    return header + key + apply_mask(payload, key)

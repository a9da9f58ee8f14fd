"""The agent-bound frames ``framing.py`` builds, read back by websockets' own server parser:
the conformance check that a Deepgram server (any RFC 6455 server) reads what we write."""

from __future__ import annotations

import pytest
from websockets.frames import Frame, Opcode
from websockets.server import ServerProtocol

from app.agent.framing import BINARY, MASK_KEYS_PER_READ, TEXT, MaskKeys, client_frame


def open_server() -> ServerProtocol:
    """A websockets server protocol past its handshake, reading client (masked) frames."""
    server = ServerProtocol(max_size=None)
    server.receive_data(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    [request] = server.events_received()
    server.send_response(server.accept(request))  # type: ignore[arg-type]
    server.data_to_send()
    return server


@pytest.mark.parametrize("size", [0, 1, 125, 126, 160, 65535, 65536, 200_000])
@pytest.mark.parametrize("first_byte", [BINARY, TEXT])
def test_frames_of_every_length_class_read_back_exactly(size: int, first_byte: int) -> None:
    server = open_server()
    payload = bytes(i % 251 for i in range(size)) if first_byte == BINARY else b"x" * size
    data = client_frame(first_byte, payload)
    for cut in range(0, len(data), 977):  # arriving in pieces changes nothing
        server.receive_data(data[cut : cut + 977])
    events = server.events_received()
    assert server.parser_exc is None
    assert len(events) == 1
    frame = events[0]
    assert isinstance(frame, Frame)
    assert frame.opcode is (Opcode.BINARY if first_byte == BINARY else Opcode.TEXT)
    assert frame.fin and bytes(frame.data) == payload


def test_an_unmasked_frame_is_what_a_server_refuses_so_the_check_can_fail() -> None:
    server = open_server()
    server.receive_data(bytes([BINARY, 3]) + b"abc")  # no mask bit: a protocol error for a server
    server.events_received()
    assert server.parser_exc is not None


def test_mask_keys_differ_frame_to_frame_and_refill_after_a_pool() -> None:
    keys = MaskKeys()
    taken = [keys.take() for _ in range(3 * MASK_KEYS_PER_READ)]
    assert all(len(key) == 4 for key in taken)
    # 3072 keys of 32 random bits: a repeat is possible (p ~ 0.1%), a run of repeats is not
    assert len(set(taken)) > len(taken) - 5
    frames = {client_frame(BINARY, b"\x00" * 160)[4:8] for _ in range(100)}
    assert len(frames) > 95  # the key really is in the frame, and changes

"""The Twilio media stream's WebSocket, with frames handed to the call as they are parsed.

Through plain ASGI every caller frame (50 a second per call) is put on uvicorn's queue, the
socket's reading paused and resumed (two ``epoll_ctl`` calls), and the call's reader task woken
to take it: at 50 calls that hand-off is most of what a frame costs. ``MediaSocket`` is
uvicorn's own sans-I/O WebSocket protocol with one addition: once a call asks for it
(``deliver_to``), each complete message is given to the call synchronously, in the
``data_received`` callback that parsed it, and ``try_send`` writes a frame without a task.
Everything else (handshake, accept, close, ping, the disconnect message the call waits for) is
unchanged ASGI, so the app runs the same under another server, only without the shortcut
(``direct_socket`` is then None).

Flow control needs no pause: a message handed over is handled before the next is parsed, so
nothing piles up here; what the call sends on is bounded by its own send queues.

Once open, the socket also cuts the byte stream into frames itself (``_split``): each whole,
masked, unfragmented text or binary frame is unmasked (websockets' C ``apply_mask``) and
handed over directly; every other frame (ping, close, fragments, anything malformed or over
``ws_max_size``) is given whole to websockets' parser, which thus only ever sees complete
frames and keeps all of its checks and replies. websockets' generator-based parser was a tenth
of the bridge's CPU at 50 calls. A client that sends before the handshake's answer keeps
websockets' parser for everything (its state then cannot be known).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

from uvicorn._types import ASGISendEvent
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import InvalidState
from websockets.http11 import Request
from websockets.protocol import State

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets without its C extension
    from websockets.utils import apply_mask

from websockets.datastructures import Headers

_NO_HEADERS = Headers()
EXTENSION = "callbridge.media_socket"
"""The ASGI scope extension under which a socket offers the shortcut."""

Receiver = Callable[[str | bytes], None]


class MediaSocket(WebSocketsSansIOProtocol):
    """uvicorn's ``websockets-sansio`` protocol, plus delivery of messages in the callback."""

    receiver: Receiver | None = None
    _data_calls = 0  # data_received calls so far: the first is the upgrade request
    _splitting = False  # frames cut here (from the accept on, if nothing came before it)
    _fragmented = False  # a fragmented message is in progress: all its frames go to websockets
    _buffer: bytearray

    def data_received(self, data: bytes) -> None:
        if self._splitting:
            self._split(data)
            return
        self._data_calls += 1
        super().data_received(data)

    async def send(self, message: ASGISendEvent) -> None:
        await super().send(message)
        if message["type"] == "websocket.accept" and self.handshake_complete and self._data_calls == 1:
            self._buffer = bytearray()
            self._splitting = True
        if message["type"] == "websocket.accept" and self.handshake_complete:
            # the upgrade's request and response are done with (the ASGI scope keeps its own
            # copy of the headers): ~3 KiB a call for the whole call otherwise
            self.request.headers = self.response.headers = _NO_HEADERS

    def _split(self, data: bytes) -> None:
        """Cut ``data`` (after what was left over) into frames: whole data frames go to the
        receiver, every other frame to websockets; an incomplete frame waits for more."""
        buffer = self._buffer
        buffer += data
        size, at = len(buffer), 0
        while size - at >= 2:
            first, second = buffer[at], buffer[at + 1]
            length, head = second & 0x7F, 2
            if length == 126:
                if size - at < 4:
                    break
                length, head = int.from_bytes(buffer[at + 2 : at + 4]), 4
            elif length == 127:
                if size - at < 10:
                    break
                length, head = int.from_bytes(buffer[at + 2 : at + 10]), 10
            if second & 0x80:
                head += 4
            if length > self.config.ws_max_size:  # websockets refuses it (1009) from the header
                self._to_websockets(bytes(buffer[at:]))
                at = size
                break
            end = at + head + length
            if end > size:
                break
            self._frame(first, second, buffer, at, head, end)
            at = end
            if not self._splitting:  # websockets failed the connection: the rest is not read
                at = size
                break
        del buffer[:at]

    def _frame(self, first: int, second: int, buffer: bytearray, at: int, head: int, end: int) -> None:
        opcode = first & 0x0F
        fast = (
            self.receiver is not None
            and first & 0xF0 == 0x80  # FIN, no reserved bits (no extension is negotiated)
            and second & 0x80  # masked, as a client must
            and opcode in (1, 2)  # text, binary
            and not self._fragmented
            and self.conn.state is State.OPEN
        )
        if not fast:
            if opcode in (0, 1, 2):  # a data frame: a fragmented message starts or ends here
                self._fragmented = not first & 0x80
            self._to_websockets(bytes(buffer[at:end]))
            return
        self.curr_msg_data_type = "text" if opcode == 1 else "bytes"
        self.frames = [apply_mask(buffer[at + head : end], buffer[at + head - 4 : at + head])]
        self.send_receive_event_to_app()

    def _to_websockets(self, frame: bytes) -> None:
        """uvicorn's own ``data_received`` (websockets' parser and its replies), whole frames only."""
        super().data_received(frame)
        if self.conn.parser_exc is not None:  # closed: anything more goes to the discarding parser
            self._splitting = False

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        if self.response.status_code == 101:  # the app task is created but has not run yet
            self.scope["extensions"][EXTENSION] = self  # type: ignore[assignment]

    def deliver_to(self, receiver: Receiver) -> None:
        """From now on every message goes to ``receiver`` (first those already queued, in
        order); only the disconnect still comes through ASGI ``receive``."""
        kept = []
        while not self.queue.empty():
            message = self.queue.get_nowait()
            if message["type"] == "websocket.receive":
                receiver(received_data(message))
            else:
                kept.append(message)
        for message in kept:
            self.queue.put_nowait(message)
        self.receiver = receiver
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()

    def send_receive_event_to_app(self) -> None:
        receiver = self.receiver
        if receiver is None:
            super().send_receive_event_to_app()
            return
        data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
        self.frames = []
        if self.close_sent:
            return
        if self.curr_msg_data_type == "bytes":
            receiver(data)
            return
        try:
            text = data.decode()
        except UnicodeDecodeError:  # as uvicorn does: close 1007, and the call sees the disconnect
            self.logger.warning("invalid UTF-8 in a text frame from the client")
            self.conn.send_close(1007)
            self.handle_parser_exception()
            return
        receiver(text)

    def try_send(self, text: str) -> bool:
        """Write one text frame now, if the socket is open and takes data without waiting;
        False means nothing was written (send through ASGI, which waits, instead)."""
        if self.close_sent or self.disconnected or not self.writable.is_set():
            return False
        try:
            self.conn.send_text(text.encode())
        except InvalidState:
            return False
        self.transport.write(b"".join(self.conn.data_to_send()))
        return True


def received_data(message: Mapping[str, Any]) -> str | bytes:
    """The text or the bytes of an ASGI ``websocket.receive`` message."""
    text = message.get("text")
    return text if text is not None else message.get("bytes") or b""


def direct_socket(scope: MutableMapping[str, Any]) -> MediaSocket | None:
    """The shortcut of this socket, if the server offers it."""
    socket = scope.get("extensions", {}).get(EXTENSION)
    return socket if isinstance(socket, MediaSocket) else None

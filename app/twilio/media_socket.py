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
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import InvalidState
from websockets.http11 import Request

EXTENSION = "callbridge.media_socket"
"""The ASGI scope extension under which a socket offers the shortcut."""

Receiver = Callable[[str | bytes], None]


class MediaSocket(WebSocketsSansIOProtocol):
    """uvicorn's ``websockets-sansio`` protocol, plus delivery of messages in the callback."""

    receiver: Receiver | None = None

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
                text = message.get("text")
                receiver(text if text is not None else message.get("bytes") or b"")
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


def direct_socket(scope: MutableMapping[str, Any]) -> MediaSocket | None:
    """The shortcut of this socket, if the server offers it."""
    socket = scope.get("extensions", {}).get(EXTENSION)
    return socket if isinstance(socket, MediaSocket) else None

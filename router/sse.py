"""Server-sent events: one encoder and one incremental decoder, per the WHATWG spec."""

from __future__ import annotations

import codecs
from dataclasses import dataclass


@dataclass
class SSEEvent:
    """One server-sent event. ``event`` is None for the default ``message`` type."""

    data: str
    event: str | None = None
    id: str | None = None
    retry: int | None = None


def encode_event(event: SSEEvent) -> bytes:
    """Serialize one event; multi-line data becomes several ``data:`` lines.

    Lines end only at CR, LF or CRLF, as the spec's decoders split them: a U+2028 or NEL
    inside JSON text (which JSON encoders leave unescaped) stays in its line.

    Args:
        event: The event to encode.
    """
    head = ""
    if event.event is not None:
        head += f"event: {event.event}\n"
    if event.id is not None:
        head += f"id: {event.id}\n"
    if event.retry is not None:
        head += f"retry: {event.retry}\n"
    data = event.data
    if "\n" in data or "\r" in data:
        lines = data.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        return (head + "".join(f"data: {line}\n" for line in lines) + "\n").encode()
    return f"{head}data: {data}\n\n".encode()


def encode_comment(text: str = "") -> bytes:
    """Serialize an SSE comment line (used as a keep-alive).

    Args:
        text: The comment text; must not contain newlines.
    """
    return f": {text}\n\n".encode()


class SSEDecoder:
    """Incremental decoder: feed arbitrary byte chunks, get complete events back.

    Handles LF, CR and CRLF line ends (also split across chunks), UTF-8 characters split
    across chunks, comments, multi-line data and the optional space after the colon.
    """

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")()
        self._buffer = ""
        self._pending_cr = False
        self._reset()

    def _reset(self) -> None:
        self._event: str | None = None
        self._data: list[str] = []
        self._id: str | None = None
        self._retry: int | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Decode a chunk of the stream.

        Args:
            chunk: The next bytes received.

        Returns:
            The events completed by this chunk, in order.
        """
        text = self._utf8.decode(chunk)
        if self._pending_cr and text.startswith("\n"):
            text = text[1:]
        self._pending_cr = False
        self._buffer += text
        events = []
        while True:
            cut = self._next_line_end()
            if cut is None:
                break
            line, end = cut
            self._buffer = self._buffer[end:]
            event = self._process_line(line)
            if event is not None:
                events.append(event)
        return events

    def flush(self) -> list[SSEEvent]:
        """End of stream: dispatch a final event that lacked its blank line."""
        self._buffer += self._utf8.decode(b"", final=True)
        events = self.feed(b"\n\n") if (self._buffer or self._data) else []
        return events

    def _next_line_end(self) -> tuple[str, int] | None:
        buf = self._buffer
        lf, cr = buf.find("\n"), buf.find("\r")
        if cr == -1 and lf == -1:
            return None
        if cr == -1 or (lf != -1 and lf < cr):
            return buf[:lf], lf + 1
        if cr + 1 < len(buf):
            return buf[:cr], cr + (2 if buf[cr + 1] == "\n" else 1)
        # A CR at the very end: its LF may arrive in the next chunk.
        self._pending_cr = True
        return buf[:cr], cr + 1

    def _process_line(self, line: str) -> SSEEvent | None:
        if not line:
            if not self._data and self._event is None:
                self._reset()
                return None
            event = SSEEvent("\n".join(self._data), self._event, self._id, self._retry)
            self._reset()
            return event
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        elif field == "id":
            self._id = value
        elif field == "retry" and value.isdigit():
            self._retry = int(value)
        return None

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


class EventTooLarge(ValueError):
    """An event, or a line, still incomplete holds more than the decoder's limit."""


class SSEDecoder:
    """Incremental decoder: feed arbitrary byte chunks, get complete events back.

    Handles LF, CR and CRLF line ends (also split across chunks), UTF-8 characters split
    across chunks (an invalid byte becomes U+FFFD, as the spec decodes), a leading byte order
    mark, comments, multi-line data and the optional space after the colon. Each character is
    scanned once however the stream is cut: a chunk of thousands of events, or one long line
    in many chunks.

    Args:
        max_pending: The most characters an incomplete event may hold (None: no limit).
    """

    def __init__(self, max_pending: int | None = None) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._max_pending = max_pending
        # The text of a line not yet ended, in the pieces it came in.
        self._partial: list[str] = []
        self._partial_chars = 0
        self._pending_cr = False
        self._at_start = True
        self._reset()

    def _reset(self) -> None:
        self._event: str | None = None
        self._data: list[str] = []
        self._data_chars = 0
        self._id: str | None = None
        self._retry: int | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Decode a chunk of the stream.

        Args:
            chunk: The next bytes received.

        Returns:
            The events completed by this chunk, in order.

        Raises:
            EventTooLarge: If an incomplete event grows over ``max_pending`` characters.
        """
        text = self._utf8.decode(chunk)
        if not text:  # nothing yet (part of a character): a pending CR still waits for its LF
            return []
        if self._at_start:  # one byte order mark may open the stream (the spec drops it)
            self._at_start = False
            text = text.removeprefix("\ufeff")
        if self._pending_cr and text.startswith("\n"):
            text = text[1:]
        self._pending_cr = False
        if self._partial:
            if "\n" not in text and "\r" not in text:
                self._partial.append(text)
                self._partial_chars += len(text)
                self._check_size()
                return []
            text = "".join(self._partial) + text
            self._partial.clear()
        events = []
        start, lf = 0, text.find("\n")
        while True:
            if -1 < lf < start:  # past the last LF found: look for the next
                lf = text.find("\n", start)
            # A CR ends a line only before the LF: each character is scanned once.
            cr = text.find("\r", start, len(text) if lf == -1 else lf)
            if cr == -1:
                if lf == -1:
                    break
                end, after = lf, lf + 1
            elif cr + 1 < len(text):
                end, after = cr, cr + (2 if text[cr + 1] == "\n" else 1)
            else:  # a CR at the very end: its LF may arrive in the next chunk
                self._pending_cr = True
                end, after = cr, cr + 1
            event = self._process_line(text[start:end])
            if event is not None:
                events.append(event)
            start = after
        self._partial_chars = len(text) - start
        if self._partial_chars:
            self._partial.append(text[start:])
        self._check_size()
        return events

    def flush(self) -> list[SSEEvent]:
        """End of stream: dispatch a final event that lacked its blank line."""
        # The end of the stream comes between a last CR and the LF fed here.
        self._pending_cr = False
        if tail := self._utf8.decode(b"", final=True):
            self._partial.append(tail)
        return self.feed(b"\n\n") if (self._partial or self._data) else []

    def _check_size(self) -> None:
        if self._max_pending is not None:
            if self._partial_chars + self._data_chars > self._max_pending:
                raise EventTooLarge(f"an event is over {self._max_pending} characters")

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
            self._data_chars += len(value) + 1  # the newline that joins it
        elif field == "event":
            self._event = value
        elif field == "id":
            self._id = value
        elif field == "retry" and value.isascii() and value.isdigit():
            self._retry = int(value)
        return None

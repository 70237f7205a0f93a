"""SSE encoder and decoder edge cases (WHATWG rules)."""

from __future__ import annotations

import pytest

from router.sse import EventTooLarge, SSEDecoder, SSEEvent, encode_comment, encode_event


def decode_all(chunks: list[bytes]) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events = []
    for chunk in chunks:
        events += decoder.feed(chunk)
    return events + decoder.flush()


def test_encode_single_and_multiline_data():
    assert encode_event(SSEEvent('{"a":1}')) == b'data: {"a":1}\n\n'
    assert encode_event(SSEEvent("x", event="ping")) == b"event: ping\ndata: x\n\n"
    assert encode_event(SSEEvent("line1\nline2")) == b"data: line1\ndata: line2\n\n"
    assert encode_event(SSEEvent("")) == b"data: \n\n"
    assert encode_comment("keep-alive") == b": keep-alive\n\n"


@pytest.mark.parametrize(
    "data",
    ["plain", "two\nlines", "a\n\nblank inside", "", "ünïcödé ✓", "trailing\n", "sep\u2028\x85"],
)
def test_encode_decode_round_trip(data):
    event = SSEEvent(data, event="message_start", id="7")
    [decoded] = decode_all([encode_event(event)])
    assert decoded == SSEEvent(data, "message_start", "7")


def test_multiline_data_joined_with_newline():
    [event] = decode_all([b"data: first\ndata: second\ndata:third\n\n"])
    assert event.data == "first\nsecond\nthird"


def test_comments_and_unknown_fields_ignored():
    events = decode_all([b": ping\n\n:another\nfoo: bar\ndata: x\n\n"])
    assert events == [SSEEvent("x")]


@pytest.mark.parametrize("newline", [b"\r\n", b"\r", b"\n"])
def test_all_line_endings(newline):
    raw = b"event: e" + newline + b"data: 1" + newline + newline + b"data: 2" + newline + newline
    assert decode_all([raw]) == [SSEEvent("1", "e"), SSEEvent("2")]


def test_crlf_split_across_chunks_is_one_line_end():
    chunks = [b"data: a\r", b"\n\r", b"\ndata: b\r\n\r\n"]
    assert decode_all(chunks) == [SSEEvent("a"), SSEEvent("b")]


def test_every_split_point_gives_the_same_events():
    raw = 'event: x\r\ndata: {"t":"é✓"}\r\n\r\n: c\n\ndata: two\ndata: lines\n\n'.encode()
    expected = decode_all([raw])
    assert len(expected) == 2
    for cut in range(1, len(raw)):
        assert decode_all([raw[:cut], raw[cut:]]) == expected, cut


def test_utf8_character_split_across_chunks():
    raw = "data: 日本\n\n".encode()
    chunks = [raw[i : i + 1] for i in range(len(raw))]
    assert decode_all(chunks) == [SSEEvent("日本")]


def test_no_space_after_colon_and_only_one_space_stripped():
    assert decode_all([b"data:x\n\ndata:  y\n\n"]) == [SSEEvent("x"), SSEEvent(" y")]


def test_final_event_without_blank_line_is_flushed():
    assert decode_all([b"data: [DONE]"]) == [SSEEvent("[DONE]")]


def test_retry_and_id_fields():
    [event] = decode_all([b"id: 5\nretry: 100\nretry: x\ndata: d\n\n"])
    assert (event.id, event.retry, event.data) == ("5", 100, "d")


def test_blank_lines_alone_dispatch_nothing():
    assert decode_all([b"\n\n\r\n: only a comment\n\n"]) == []


def test_long_line_in_many_chunks():
    payload = "x" * 200_000
    raw = f"data: {payload}\n\n".encode()
    chunks = [raw[i : i + 1000] for i in range(0, len(raw), 1000)]
    assert decode_all(chunks) == [SSEEvent(payload)]


def test_invalid_utf8_becomes_the_replacement_character():
    assert decode_all([b"data: a\xffb\n\n"]) == [SSEEvent("a\ufffdb")]


def test_a_chunk_of_many_events_and_a_line_in_many_chunks():
    events = [SSEEvent(f'{{"i":{i}}}', "delta") for i in range(5000)]
    assert decode_all([b"".join(encode_event(e) for e in events)]) == events
    line = b"data: " + b"x" * 100_000 + b"\n\n"
    assert decode_all([line[i : i + 7] for i in range(0, len(line), 7)]) == [
        SSEEvent("x" * 100_000)
    ]


@pytest.mark.parametrize(
    "chunks",
    [
        [b"data: " + b"x" * 60, b"x" * 60],  # one line, not ended
        [b"data: " + b"x" * 60 + b"\n", b"data: " + b"x" * 60 + b"\n"],  # one event, not ended
        [b"data:\n" * 60, b"data:\n" * 60],  # empty lines: each adds its newline
    ],
)
def test_an_incomplete_event_over_the_bound_is_refused(chunks):
    decoder = SSEDecoder(max_pending=100)
    with pytest.raises(EventTooLarge, match="over 100 characters"):
        for chunk in chunks:
            decoder.feed(chunk)


def test_complete_events_never_count_against_the_bound():
    decoder = SSEDecoder(max_pending=100)
    assert decoder.feed((b"data: " + b"x" * 90 + b"\n\n") * 50) == [SSEEvent("x" * 90)] * 50
    assert decoder.feed(b"data: " + b"y" * 90) == []
    assert decoder.feed(b"\n\n") == [SSEEvent("y" * 90)]


def test_a_pending_cr_survives_an_empty_chunk_and_the_end_of_the_stream():
    assert decode_all([b"data: a\r", b"", b"\ndata: b\n\n"]) == [SSEEvent("a\nb")]
    # The stream ends in a CR and half a character: the event is still dispatched.
    assert decode_all([b"data: a\r", b"\xe2\x82"]) == [SSEEvent("a")]


def test_a_retry_of_other_digits_is_ignored():
    assert decode_all(["retry: ²\ndata: d\n\n".encode()]) == [SSEEvent("d")]


def test_a_byte_order_mark_opening_the_stream_is_dropped():
    # Split inside the mark; a later mark is part of its line (here an unknown field's name).
    chunks = [b"\xef\xbb", b"\xbfdata: a\n\n\xef\xbb\xbfdata: b\n\n"]
    assert decode_all(chunks) == [SSEEvent("a")]

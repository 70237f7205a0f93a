"""Errors over format x kind: exact shapes and statuses, the upstream table and Retry-After."""

from __future__ import annotations

import json

import pytest

from router import errors, ir
from router.formats.anthropic import client as anthropic_client
from router.formats.anthropic import upstream as anthropic_upstream
from router.formats.gemini import client as gemini_client
from router.formats.gemini import upstream as gemini_upstream
from router.formats.openai import client as openai_client
from router.formats.openai_responses import client as openai_responses

KINDS = [
    # (error class, OpenAI status/type/code, Anthropic status/type, Gemini status/status word)
    (
        errors.InvalidRequestError,
        (400, "invalid_request_error", None),
        (400, "invalid_request_error"),
        (400, "INVALID_ARGUMENT"),
    ),
    (
        errors.AuthenticationError,
        (401, "authentication_error", "invalid_api_key"),
        (401, "authentication_error"),
        (401, "UNAUTHENTICATED"),
    ),
    (
        errors.PermissionDeniedError,
        (403, "permission_error", None),
        (403, "permission_error"),
        (403, "PERMISSION_DENIED"),
    ),
    (
        errors.NotFoundError,
        (404, "invalid_request_error", "not_found"),
        (404, "not_found_error"),
        (404, "NOT_FOUND"),
    ),
    (
        errors.PayloadTooLargeError,
        (413, "invalid_request_error", "request_too_large"),
        (413, "request_too_large"),
        (413, "INVALID_ARGUMENT"),
    ),
    (
        errors.RateLimitError,
        (429, "rate_limit_error", "rate_limit_exceeded"),
        (429, "rate_limit_error"),
        (429, "RESOURCE_EXHAUSTED"),
    ),
    (errors.UpstreamError, (502, "server_error", None), (502, "api_error"), (502, "UNAVAILABLE")),
    (
        errors.OverloadedError,
        (503, "server_error", "overloaded"),
        (529, "overloaded_error"),
        (503, "UNAVAILABLE"),
    ),
    (
        errors.GatewayTimeoutError,
        (504, "server_error", "timeout"),
        (504, "timeout_error"),
        (504, "DEADLINE_EXCEEDED"),
    ),
    (errors.GatewayError, (500, "server_error", None), (500, "api_error"), (500, "INTERNAL")),
]


@pytest.mark.parametrize("cls,oai,_a,_g", KINDS)
@pytest.mark.parametrize("adapter", [openai_client, openai_responses])
def test_openai_shape(adapter, cls, oai, _a, _g):
    status, body = adapter.render_error(cls("went wrong", param="messages[1]"))
    assert status == oai[0]
    assert body == {
        "error": {"message": "went wrong", "type": oai[1], "param": "messages[1]", "code": oai[2]}
    }


@pytest.mark.parametrize("cls,_o,anth,_g", KINDS)
def test_anthropic_shape(cls, _o, anth, _g):
    status, body = anthropic_client.render_error(cls("went wrong"))
    assert status == anth[0]
    assert body == {"type": "error", "error": {"type": anth[1], "message": "went wrong"}}


@pytest.mark.parametrize("cls,_o,_a,gem", KINDS)
def test_gemini_shape(cls, _o, _a, gem):
    status, body = gemini_client.render_error(cls("went wrong"))
    assert status == gem[0]
    assert body == {"error": {"code": gem[0], "message": "went wrong", "status": gem[1]}}


def test_unknown_model_code_in_openai_format():
    _, body = openai_client.render_error(errors.NotFoundError("no model", param="model"))
    assert body["error"]["code"] == "model_not_found"


@pytest.mark.parametrize(
    "adapter,expect",
    [
        (openai_client, lambda d: d["error"]["type"] == "rate_limit_error"),
        (openai_responses, lambda d: d["type"] == "error" and d["code"] == "rate_limit_exceeded"),
        (
            anthropic_client,
            lambda d: d["type"] == "error" and d["error"]["type"] == "rate_limit_error",
        ),
        (gemini_client, lambda d: d["error"]["status"] == "RESOURCE_EXHAUSTED"),
    ],
)
def test_in_stream_error_event_per_format(adapter, expect):
    renderer = adapter.StreamRenderer(ir.Request(model="m", messages=[]))
    event, *rest = renderer.render_error(errors.RateLimitError("slow"))
    assert expect(json.loads(event.data))
    if adapter is anthropic_client:
        assert event.event == "error"
    if adapter is openai_responses:
        # OpenAI ends a failed Responses stream with the terminal response.failed.
        [failed] = rest
        body = json.loads(failed.data)
        assert body["type"] == "response.failed" and body["response"]["status"] == "failed"
        assert body["response"]["error"] == {"code": "rate_limit_exceeded", "message": "slow"}
    else:
        assert rest == []


@pytest.mark.parametrize(
    "status,cls,retryable",
    [
        (400, errors.InvalidRequestError, False),
        (401, errors.AuthenticationError, False),
        (403, errors.PermissionDeniedError, False),
        (404, errors.NotFoundError, False),
        (408, errors.GatewayTimeoutError, True),
        (413, errors.PayloadTooLargeError, False),
        (422, errors.InvalidRequestError, False),
        (429, errors.RateLimitError, True),
        (500, errors.UpstreamError, True),
        (502, errors.UpstreamError, True),
        (503, errors.OverloadedError, True),
        (504, errors.GatewayTimeoutError, True),
        (529, errors.OverloadedError, True),
        (520, errors.UpstreamError, True),
        (418, errors.InvalidRequestError, False),
    ],
)
def test_upstream_status_table(status, cls, retryable):
    err = errors.error_for_status(status, "upstream said no", retry_after=3.0)
    assert type(err) is cls and err.retryable is retryable
    assert err.status == (status if status >= 500 and status != 529 else cls.status)
    assert err.message == "upstream said no" and err.retry_after == 3.0


def test_anthropic_error_objects_map_by_type():
    err = anthropic_upstream.parse_error(
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}, 500
    )
    assert isinstance(err, errors.OverloadedError) and "Overloaded" in err.message


def test_gemini_error_objects_map_by_code():
    err = gemini_upstream.parse_error(
        {"error": {"code": 429, "message": "quota", "status": "RESOURCE_EXHAUSTED"}}, 500
    )
    assert isinstance(err, errors.RateLimitError)


@pytest.mark.parametrize(
    "value,expected",
    [
        (None, None),
        ("", None),
        ("12", 12.0),
        ("1.5", 1.5),
        ("-3", 0.0),
        ("soon", None),
        ("Wed, 21 Oct 2015 07:28:10 GMT", 10.0),
        ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),
    ],
)
def test_retry_after_both_forms(value, expected):
    now = 1445412480.0  # 2015-10-21 07:28:00 UTC
    assert errors.parse_retry_after(value, now=now) == expected

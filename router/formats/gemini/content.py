"""Gemini content shared by the client side and the upstream side."""

from __future__ import annotations

from ... import ir


def with_signature(part: dict, signature: str | None) -> dict:
    """Put a ``thoughtSignature`` on a wire part when there is one.

    Args:
        part: The wire part (changed in place and returned).
        signature: The signature, or None.
    """
    if signature:
        part["thoughtSignature"] = signature
    return part


def parse_logprobs_result(raw: object) -> list[ir.TokenLogprob] | None:
    """Read a candidate's ``logprobsResult``: the chosen token of each step, with that step's
    top candidates.

    Args:
        raw: The ``logprobsResult`` value (None when the request asked for none).
    """
    if not isinstance(raw, dict) or not isinstance(raw.get("chosenCandidates"), list):
        return None
    steps = raw.get("topCandidates") or []
    tokens = []
    for i, chosen in enumerate(raw["chosenCandidates"]):
        top = steps[i].get("candidates") or [] if i < len(steps) else []
        tokens.append(_parse_token(chosen, [_parse_token(t, []) for t in top]))
    return tokens


def _parse_token(raw: dict, top: list[ir.TokenLogprob]) -> ir.TokenLogprob:
    token = raw.get("token") or ""
    return ir.TokenLogprob(token, float(raw.get("logProbability") or 0.0), None, top)


def render_logprobs_result(tokens: list[ir.TokenLogprob]) -> dict:
    """Render token log probabilities as a candidate's ``logprobsResult``.

    Args:
        tokens: The tokens.
    """
    return {
        "topCandidates": [
            {"candidates": [_render_token(t) for t in token.top]} for token in tokens
        ],
        "chosenCandidates": [_render_token(t) for t in tokens],
    }


def _render_token(token: ir.TokenLogprob) -> dict:
    return {"token": token.token, "logProbability": token.logprob}

"""Gemini content shared by the client side and the upstream side."""

from __future__ import annotations


def with_signature(part: dict, signature: str | None) -> dict:
    """Put a ``thoughtSignature`` on a wire part when there is one.

    Args:
        part: The wire part (changed in place and returned).
        signature: The signature, or None.
    """
    if signature:
        part["thoughtSignature"] = signature
    return part

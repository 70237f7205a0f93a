"""Per-provider API keys: their states and rolling windows (`state`), what an upstream's answer
means for a key (`failures`), the pool that picks keys (`pool`), and the state shared with
other router instances behind a protocol (`store`).

The Redis implementation of the shared store is imported from `router.keys.redis_store`
where it is built, so that importing the keys does not import the Redis client.
"""

from .failures import (
    Verdict,
    classify_failure,
    exhausted_limit_reset,
    parse_duration,
    parse_reset_time,
    reset_hint,
    seconds_to_gemini_reset,
)
from .pool import KEY_POOLS, KeyPool, Lease
from .state import ACTIVE, COOLING, DISABLED, PARKED, WINDOW_S, PooledKey, mask_key
from .store import SHARED_STATE, KeyMirror, SharedStore

__all__ = [
    "ACTIVE",
    "COOLING",
    "DISABLED",
    "KEY_POOLS",
    "PARKED",
    "SHARED_STATE",
    "WINDOW_S",
    "KeyMirror",
    "KeyPool",
    "Lease",
    "PooledKey",
    "SharedStore",
    "Verdict",
    "classify_failure",
    "exhausted_limit_reset",
    "mask_key",
    "parse_duration",
    "parse_reset_time",
    "reset_hint",
    "seconds_to_gemini_reset",
]

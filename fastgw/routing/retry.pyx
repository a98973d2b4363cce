# cython: language_level=3
"""A model's retry policy and fallback chains, and the small rules the relay applies with them.

The relay (fastgw/proxy/relay.pyx, `Relay._retry_or_fail` and `_replace_answer`) decides when to try again;
this module says how long to wait, what an upstream's retry-after asks for, and which upstream answers a
fallback model may replace. Everything here runs only when an attempt failed.
"""
import random
from email.utils import parsedate_to_datetime
import time

import orjson

# Upstream error codes (OpenAI's shape, which translating providers produce too) that name a fallback list.
CONTEXT_WINDOW_CODES = frozenset(("context_length_exceeded",))
CONTENT_POLICY_CODES = frozenset(("content_filter", "content_policy_violation"))


cdef class RetryPolicy:
    """RetryPolicy(attempts, backoff_s, max_backoff_s, retry_after_cap_s, deadline_s): a model's [models.retry];
    the fallback lists are set by fastgw.routing.resilience.attach once every route exists."""

    def __init__(self, int attempts=1, double backoff_s=0.1, double max_backoff_s=2.0,
                 double retry_after_cap_s=5.0, double deadline_s=0.0):
        self.attempts = attempts
        self.backoff = backoff_s
        self.max_backoff = max_backoff_s
        self.retry_after_cap = retry_after_cap_s
        self.deadline = deadline_s
        self.fallbacks = []
        self.context_window_fallbacks = []
        self.content_policy_fallbacks = []
        self.holds_400 = False

    def set_fallbacks(self, list chain, list context_window, list content_policy):
        self.fallbacks = chain
        self.context_window_fallbacks = context_window
        self.content_policy_fallbacks = content_policy
        self.holds_400 = bool(context_window or content_policy)

    def backoff_delay(self, int retry):
        """Seconds to wait before retry number `retry` (1 = the second attempt): full jitter, exponential,
        random(0, min(max_backoff, backoff * 2**(retry-1)))."""
        cdef double cap = self.backoff * (2.0 ** (retry - 1 if retry > 1 else 0))
        if cap > self.max_backoff:
            cap = self.max_backoff
        return random.random() * cap

    def fallback_lists(self, str reason):
        """The routes for an answer `fallback_reason` named ("context_window", "content_policy"), else []."""
        if reason == "context_window":
            return self.context_window_fallbacks
        if reason == "content_policy":
            return self.content_policy_fallbacks
        return []


NO_RETRY = RetryPolicy()


def retry_after_seconds(retry_after_ms, retry_after):
    """What the upstream's headers ask to wait, in seconds (-1 when they ask nothing): `retry-after-ms` (OpenAI,
    Azure: milliseconds) first, else `retry-after` (seconds, or an HTTP date). Values are bytes or None."""
    if retry_after_ms is not None:
        try:
            v = float(retry_after_ms)
            if v >= 0 and v == v:
                return v / 1000.0
        except ValueError:
            pass
    if retry_after is not None:
        try:
            v = float(retry_after)
            if v >= 0 and v == v:
                return v
        except ValueError:
            pass
        try:
            when = parsedate_to_datetime(retry_after.decode("latin-1"))
            return max(0.0, when.timestamp() - time.time())
        except (TypeError, ValueError, IndexError, OverflowError):
            pass
    return -1.0


def fallback_reason(bytes body):
    """"context_window" or "content_policy" when the (OpenAI-shaped) error body's code names one, else None."""
    try:
        err = orjson.loads(body).get("error")
        code = err.get("code") if isinstance(err, dict) else None
    except (orjson.JSONDecodeError, AttributeError):
        return None
    if not isinstance(code, str):
        return None
    if code in CONTEXT_WINDOW_CODES:
        return "context_window"
    if code in CONTENT_POLICY_CODES:
        return "content_policy"
    return None

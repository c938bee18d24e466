"""Per-tenant rate limits: requests and tokens per minute, as OpenAI's API keys have them.

Each limit is a token bucket in Redis that every gateway shares: it holds at most the
per-minute limit and refills at a sixtieth of it each second, so a tenant may send a
minute's worth at once and then its limit's pace. A generation takes one request and its
token cost (``max_tokens`` of each choice plus a prompt estimate, as admission counts
them) in the same atomic step that takes its in-flight slots, so a refused request takes
nothing. When it ends, its tokens are settled: the bucket gets back what the estimate
charged over the prompt and completion tokens it used. A request that ends without an
answer (its client went away) keeps its estimate's charge.

The buckets read Redis's clock, so gateways whose clocks differ charge one bucket alike.
Every answer of a limited tenant carries OpenAI's ``x-ratelimit-*`` headers; a refusal is
a 429 with ``Retry-After`` (and ``retry-after-ms``, which OpenAI's SDKs wait on first),
and a request that could never fit in a minute's tokens is a 400.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from services.gateway.errors import ApiError
from services.tenants import NO_LIMITS, RateLimits

__all__ = ["NO_LIMITS", "RateLimits", "RateState", "bucket_level", "format_duration", "over_token_rate",
           "rate_limit_headers", "rate_limited"]

WINDOW_S = 60.0
"""A bucket holds one window's limit and refills over one window."""
BUCKET_TTL_S = 180
"""A bucket left alone this long is full (or, settled below zero, has refilled): gone."""

# Shared by the admission and release scripts. A bucket is the hash at `key`: fields
# rl/rt (requests: level, Redis time it was measured) and tl/tt (tokens).
BUCKET_LUA = """
local function redis_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1e6
end
local function bucket_level(key, f, cap, now)
  local v = redis.call('HMGET', key, f .. 'l', f .. 't')
  if not v[1] then return cap end
  local elapsed = math.max(0, now - tonumber(v[2]))
  return math.min(cap, tonumber(v[1]) + elapsed * cap / $WINDOW_S)
end
local function bucket_set(key, f, level, now)
  redis.call('HSET', key, f .. 'l', tostring(level), f .. 't', tostring(now))
  redis.call('EXPIRE', key, $BUCKET_TTL_S)
end
-- Take `requests` and `tokens` from the buckets whose limit is set (> 0), both or
-- neither: {verdict, requests left, tokens left}, the verdict 'ok' or the bucket that
-- refused ('rpm' or 'tpm'; then nothing is taken).
local function rate_take(key, rpm, tpm, requests, tokens)
  if rpm <= 0 and tpm <= 0 then return {'ok', '0', '0'} end
  local now = redis_now()
  local r = rpm > 0 and bucket_level(key, 'r', rpm, now) or 0
  local t = tpm > 0 and bucket_level(key, 't', tpm, now) or 0
  if rpm > 0 and r < requests then return {'rpm', tostring(r), tostring(t)} end
  if tpm > 0 and t < tokens then return {'tpm', tostring(r), tostring(t)} end
  if rpm > 0 then bucket_set(key, 'r', r - requests, now) end
  if tpm > 0 then bucket_set(key, 't', t - tokens, now) end
  return {'ok', tostring(r - requests), tostring(t - tokens)}
end
-- Give back `requests` and `tokens` (negative ones take them) to the buckets whose limit
-- is set, each within one window either way.
local function rate_settle(key, rpm, tpm, requests, tokens)
  local now = nil
  for _, b in ipairs({{'r', rpm, requests}, {'t', tpm, tokens}}) do
    if b[2] > 0 and b[3] ~= 0 then
      now = now or redis_now()
      local level = bucket_level(key, b[1], b[2], now)
      bucket_set(key, b[1], math.max(-b[2], math.min(b[2], level + b[3])), now)
    end
  end
end
""".replace("$WINDOW_S", repr(WINDOW_S)).replace("$BUCKET_TTL_S", str(BUCKET_TTL_S))


@dataclass(frozen=True, slots=True)
class RateState:
    """A tenant's buckets right after its request was admitted (levels may be fractional,
    and a settled-down one negative)."""

    limits: RateLimits
    requests_left: float
    tokens_left: float


def bucket_level(limit: int, level: float | None, measured_at: float | None, now: float | None) -> float:
    """What a bucket holds at ``now`` (Redis time), from its stored level and the time it
    was measured: the Lua scripts' ``bucket_level``, for reading it (the dashboard)."""
    if level is None or measured_at is None or now is None:
        return float(limit)
    return min(float(limit), level + max(0.0, now - measured_at) * limit / WINDOW_S)


def refill_s(limit: int, missing: float) -> float:
    """Seconds a bucket of ``limit`` per minute takes to gain ``missing``."""
    return max(0.0, missing) * WINDOW_S / limit


def format_duration(seconds: float) -> str:
    """A wait as OpenAI's headers write it: ``20ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60:
        return f"{math.ceil(seconds * 10) / 10:g}s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"


def rate_limit_headers(state: RateState) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` headers for each limit the tenant has: the limit, what is
    left of it now, and how long until its bucket is full again."""
    headers: dict[str, str] = {}
    for name, limit, left in (("requests", state.limits.requests_per_minute, state.requests_left),
                              ("tokens", state.limits.tokens_per_minute, state.tokens_left)):
        if limit > 0:
            headers[f"x-ratelimit-limit-{name}"] = str(limit)
            headers[f"x-ratelimit-remaining-{name}"] = str(max(0, math.floor(left)))
            headers[f"x-ratelimit-reset-{name}"] = format_duration(refill_s(limit, limit - left))
    return headers


def rate_limited(state: RateState, refused: str, tokens: int) -> ApiError:
    """The 429 of a request whose tenant's bucket ``refused`` it (``rpm`` or ``tpm``, at
    the levels of ``state``): how long until it would fit, in the message and the retry
    headers."""
    limits = state.limits
    if refused == "rpm":
        limit = limits.requests_per_minute
        wait = refill_s(limit, 1 - state.requests_left)
        what = f"{limit} requests per minute (RPM)"
    else:
        limit = limits.tokens_per_minute
        wait = refill_s(limit, tokens - state.tokens_left)
        what = f"{limit} tokens per minute (TPM); this request counts {tokens} (max_tokens plus its prompt)"
    headers = rate_limit_headers(state) | {
        "Retry-After": str(max(1, math.ceil(wait))), "retry-after-ms": str(math.ceil(wait * 1000))}
    return ApiError(
        429,
        f"Rate limit reached for this API key: {what}. Please try again in {format_duration(wait)}.",
        reason="rate_limit_requests" if refused == "rpm" else "rate_limit_tokens",
        code="rate_limit_exceeded",
        headers=headers,
    )


def over_token_rate(limits: RateLimits, tokens: int, choices: int) -> ApiError:
    """The 400 of a request that counts more tokens than its tenant may use in a minute:
    waiting would never let it through."""
    what = (f"The request's max_tokens plus prompt ({tokens} tokens)" if choices == 1
            else f"The max_tokens plus prompt of its {choices} choices ({tokens} tokens)")
    return ApiError(
        400,
        f"{what} exceeds this API key's rate limit of {limits.tokens_per_minute} tokens per minute; "
        "lower max_tokens.",
        reason="too_large",
        param="max_tokens",
        code="tokens_per_minute_exceeded",
    )

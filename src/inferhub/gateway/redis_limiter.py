"""Rate limits shared by replicas through Redis: the token buckets of ratelimit.py in Lua.

Each decision is one atomic script run on the Redis server, using the server's clock. A key's
state is three Redis keys in one hash slot: two buckets (hashes of level and time) and a
sorted set of in-flight request ids scored by lease expiry, so that a replica that dies
without settling frees its slots when the lease runs out (renewed by `touch`).
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from inferhub.gateway.ratelimit import BucketState, RateDecision
from inferhub.gateway.records import KeyLimits

_COMMON = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function load(key, cap)
  if cap <= 0 then return 0 end
  local v = redis.call('HMGET', key, 'level', 'at')
  local level, at = tonumber(v[1]), tonumber(v[2])
  if level == nil then return cap end
  level = level + (now - at) * cap / 60
  if level > cap then level = cap end
  return level
end
local function save(key, cap, level)
  if cap <= 0 then return end
  redis.call('HSET', key, 'level', tostring(level), 'at', tostring(now))
  redis.call('EXPIRE', key, math.ceil((cap - level) * 60 / cap) + 1)
end
"""

# KEYS: requests bucket, tokens bucket, in-flight set.
# ARGV: rpm, tpm, concurrency (0 = none), prompt tokens, request id, lease seconds.
_ACQUIRE = (
    _COMMON
    + """
local rpm, tpm, conc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local prompt, rid, lease = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
local req, tok = load(KEYS[1], rpm), load(KEYS[2], tpm)
local inflight = 0
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  inflight = redis.call('ZCARD', KEYS[3])
end
local need = math.max(prompt, 1)
local refused, retry = '', 0
if rpm > 0 and req < 1 then
  refused, retry = 'requests', (1 - req) * 60 / rpm
elseif tpm > 0 and prompt > tpm then
  refused, retry = 'tokens_too_large', (tpm - tok) * 60 / tpm
elseif tpm > 0 and tok < need then
  refused, retry = 'tokens', (need - tok) * 60 / tpm
elseif conc > 0 and inflight >= conc then
  refused, retry = 'concurrency', 1
end
if refused == '' then
  req = req - 1
  tok = tok - prompt
  if conc > 0 then
    redis.call('ZADD', KEYS[3], now + lease, rid)
    redis.call('EXPIRE', KEYS[3], lease + 1)
    inflight = inflight + 1
  end
end
save(KEYS[1], rpm, req)
save(KEYS[2], tpm, tok)
return {refused, tostring(req), tostring(tok), tostring(retry), inflight}
"""
)

# KEYS: tokens bucket, in-flight set. ARGV: tpm, tokens to take (negative gives back),
# request id to release ("" for none).
_CHARGE = (
    _COMMON
    + """
local tpm, tokens, rid = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
if rid ~= '' then redis.call('ZREM', KEYS[2], rid) end
if tpm > 0 and tokens ~= 0 then
  local level = load(KEYS[1], tpm) - tokens
  if level > tpm then level = tpm end
  save(KEYS[1], tpm, level)
end
return 1
"""
)

# KEYS: in-flight set. ARGV: request id, lease seconds.
_TOUCH = """
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], 'XX', tonumber(t[1]) + tonumber(ARGV[2]), ARGV[1])
return 1
"""


class RedisLimiter:
    """The limiter of replicas that share one Redis."""

    def __init__(
        self, url: str, *, namespace: str = "inferhub:ratelimit", lease_s: int = 900
    ) -> None:
        # Short timeouts: an unreachable Redis must fail fast (failover.py decides what then).
        self._redis: Redis = Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        self._namespace = namespace
        self._lease_s = lease_s
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._charge = self._redis.register_script(_CHARGE)
        self._touch = self._redis.register_script(_TOUCH)

    def _keys(self, key_id: str) -> list[str]:
        base = f"{self._namespace}:{{{key_id}}}"  # one hash slot per API key
        return [f"{base}:requests", f"{base}:tokens", f"{base}:in_flight"]

    async def acquire(
        self, key_id: str, limits: KeyLimits, request_id: str, prompt_tokens: int
    ) -> RateDecision:
        if not (limits.rpm or limits.tpm or limits.concurrency):
            return RateDecision(requested_tokens=prompt_tokens)  # nothing to count
        result: Any = await self._acquire(
            keys=self._keys(key_id),
            args=[
                limits.rpm or 0,
                limits.tpm or 0,
                limits.concurrency or 0,
                prompt_tokens,
                request_id,
                self._lease_s,
            ],
        )
        refused, req_level, tok_level, retry, in_flight = result
        refused_name = refused.decode() if isinstance(refused, bytes) else str(refused)
        return RateDecision(
            requests=BucketState(limits.rpm, float(req_level)) if limits.rpm else None,
            tokens=BucketState(limits.tpm, float(tok_level)) if limits.tpm else None,
            refused=refused_name or None,
            retry_after_s=float(retry),
            concurrency_limit=limits.concurrency,
            in_flight=int(in_flight),
            requested_tokens=prompt_tokens,
        )

    async def charge_tokens(self, key_id: str, limits: KeyLimits, tokens: int) -> None:
        if limits.tpm and tokens:
            _, tokens_key, in_flight = self._keys(key_id)
            await self._charge(keys=[tokens_key, in_flight], args=[limits.tpm, tokens, ""])

    async def release(
        self, key_id: str, limits: KeyLimits, request_id: str, refund_tokens: int = 0
    ) -> None:
        if not (limits.concurrency or (limits.tpm and refund_tokens)):
            return
        _, tokens_key, in_flight = self._keys(key_id)
        rid = request_id if limits.concurrency else ""
        await self._charge(
            keys=[tokens_key, in_flight], args=[limits.tpm or 0, -refund_tokens, rid]
        )

    async def touch(self, key_id: str, limits: KeyLimits, request_id: str) -> None:
        if limits.concurrency:
            await self._touch(keys=[self._keys(key_id)[2]], args=[request_id, self._lease_s])

    async def close(self) -> None:
        await self._redis.aclose()

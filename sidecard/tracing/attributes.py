"""Span attribute names: the OpenTelemetry GenAI semantic conventions where they define one, `sidecard.*` else.

GenAI names follow the GenAI conventions repository (open-telemetry/semantic-conventions-genai, the GenAI
part of semantic-conventions since v1.37), `docs/gen-ai/anthropic.md` and `docs/registry/attributes/gen-ai.md`:

- an inference span is named `{gen_ai.operation.name} {gen_ai.request.model}`, kind CLIENT, and has
  `gen_ai.provider.name` ("anthropic", "aws.bedrock", "gcp.vertex_ai"; it replaced `gen_ai.system`) from its
  start, with `gen_ai.operation.name` and `gen_ai.request.model`, so a sampler sees them;
- for Anthropic, `gen_ai.usage.input_tokens` is input + cache read + cache creation tokens (Anthropic's own
  `input_tokens` leaves cached ones out), and the two cache counts are reported beside it;
- `error.type` names the class of a failure (our error code) with the span status ERROR
  (semantic-conventions `docs/general/recording-errors.md`).

The request span (sidecard's SERVER span) carries the GenAI request attributes too, so a trace viewer shows
the app's call as a chat operation whatever happened inside. No attribute ever holds a prompt, an answer or a
raw user id: `sidecard.user` is the salted pseudonym the log line uses.
"""

from __future__ import annotations

from typing import Final

# GenAI semantic conventions
OPERATION: Final = "gen_ai.operation.name"
PROVIDER: Final = "gen_ai.provider.name"
REQUEST_MODEL: Final = "gen_ai.request.model"
REQUEST_MAX_TOKENS: Final = "gen_ai.request.max_tokens"
REQUEST_STREAM: Final = "gen_ai.request.stream"
RESPONSE_MODEL: Final = "gen_ai.response.model"
RESPONSE_ID: Final = "gen_ai.response.id"
RESPONSE_FINISH_REASONS: Final = "gen_ai.response.finish_reasons"
RESPONSE_TTFC: Final = "gen_ai.response.time_to_first_chunk"  # seconds
PROMPT_NAME: Final = "gen_ai.prompt.name"
USAGE_INPUT: Final = "gen_ai.usage.input_tokens"
USAGE_OUTPUT: Final = "gen_ai.usage.output_tokens"
USAGE_CACHE_READ: Final = "gen_ai.usage.cache_read.input_tokens"
USAGE_CACHE_WRITE: Final = "gen_ai.usage.cache_creation.input_tokens"
# general semantic conventions
ERROR_TYPE: Final = "error.type"
SERVER_ADDRESS: Final = "server.address"
SERVER_PORT: Final = "server.port"
HTTP_STATUS: Final = "http.response.status_code"

# sidecard's own
FACE: Final = "sidecard.face"  # "ndjson" or "http"
FEATURE: Final = "sidecard.feature"
ROUTE: Final = "sidecard.route"
PROMPT_VERSION: Final = "sidecard.prompt.version"
USER: Final = "sidecard.user"  # the pseudonym, never the raw key
CACHE: Final = "sidecard.cache"  # the response cache's outcome: hit, miss, coalesced, stale, refresh, bypass
OUTCOME: Final = "sidecard.outcome"  # "ok" or the error code the client got
REQUEST_ID: Final = "sidecard.request_id"  # the log line's request_id
COST_USD: Final = "sidecard.cost_usd"
TARGET: Final = "sidecard.target"  # "provider:model"
ATTEMPT: Final = "sidecard.attempt"  # 1 for the request's first attempt, counting every target
QUEUE_WAIT_S: Final = "sidecard.queue_wait_s"
RETRY_REASON: Final = "sidecard.retry_reason"  # why this attempt is a retry or a fallback: the failure before it
HEDGE: Final = "sidecard.hedge"  # true for a hedged (second, racing) attempt
HEDGE_RESULT: Final = "sidecard.hedge.result"  # won or lost, on both racers
FALLBACK: Final = "sidecard.fallback"  # true for an attempt on a target after the route's first
CANCELLED: Final = "sidecard.cancelled"  # the attempt was cancelled (a lost hedge, the client left, the deadline)
APP: Final = "sidecard.app"  # the caller's app identity (access control on)
GUARDRAILS_OUTCOME: Final = "sidecard.guardrails.outcome"  # pass, flag, redact, retry or block
GUARDRAILS_RULES: Final = "sidecard.guardrails.rules"  # "check:action" of each finding, never what it matched
INJECTION_RULES: Final = "sidecard.injection.rules"  # the detector's rules an input matched
INJECTION_SCORE: Final = "sidecard.injection.score"
POLICY_RULES: Final = "sidecard.policy.rules"  # the data policy's actions ("scrub:email", "pin", ...)

CHAT: Final = "chat"
# sidecard's provider names -> gen_ai.provider.name
PROVIDERS: Final = {"anthropic": "anthropic", "bedrock": "aws.bedrock", "vertex": "gcp.vertex_ai"}

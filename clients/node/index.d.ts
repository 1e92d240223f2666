// Types for @sidecard/client (index.js). Field names are the wire protocol's (docs/protocol.md), as in the
// Anthropic SDKs: `max_tokens`, `stop_reason`, `served_by`.

export type JSONValue = string | number | boolean | null | JSONValue[] | { [key: string]: JSONValue };
export type RequestId = string | number;

/** A Messages API content block (text, image, document, tool_use, tool_result, thinking, ...), passed as-is. */
export interface ContentBlock {
  type: string;
  [key: string]: unknown;
}

export interface Message {
  role: 'user' | 'assistant';
  content: string | ContentBlock[];
}

/** The fields of a `complete` (or `count_tokens`) request. Any other Messages API field passes through. */
export interface CompleteParams {
  messages?: Message[];
  system?: string | ContentBlock[];
  model?: string;
  max_tokens?: number;
  temperature?: number;
  stop_sequences?: string[];
  metadata?: Record<string, unknown>;
  feature?: string;
  user?: string;
  deadline_ms?: number;
  route?: string;
  prompt?: string;
  vars?: Record<string, string | number | boolean>;
  version?: number;
  cache?: 'use' | 'bypass' | 'refresh' | 'only';
  resume?: boolean;
  tools?: Record<string, unknown>[];
  tool_choice?: Record<string, unknown>;
  thinking?: Record<string, unknown>;
  [field: string]: unknown;
}

export interface CallOptions {
  /** Client-side wait for the reply (for a stream: for each frame), in milliseconds. */
  timeoutMs?: number;
  /** Abort the call: it rejects with the signal's reason, and the daemon stops the request (a `cancel` frame). */
  signal?: AbortSignal;
}

export interface ClientOptions {
  /** Default: defaultSocketPath(). */
  socketPath?: string;
  /** Default wait for a reply; none unless set, except complete({deadline_ms}) waits deadline_ms + 5000. */
  timeoutMs?: number;
  /** Default 5000. */
  connectTimeoutMs?: number;
  /** Raise the connection's frame limit with a `hello` frame (large images, documents); sent on every connect. */
  maxFrameBytes?: number;
}

export interface Usage {
  input_tokens: number;
  output_tokens: number;
  cache_creation_input_tokens: number;
  cache_read_input_tokens: number;
  [key: string]: unknown;
}

export interface ServedBy {
  provider: string;
  model: string;
}

/** A reply frame as it came: every field the daemon sent, known or not. */
export interface Frame {
  id?: RequestId | null;
  ok?: boolean;
  [key: string]: unknown;
}

export interface ErrorBody {
  code: string;
  message: string;
  retryable: boolean;
  retry_after_ms?: number;
}

export interface StartEvent extends Frame {
  event: 'start';
  request_id: string;
  model: string;
  served_by: ServedBy;
}

export interface BlockEvent extends Frame {
  event: 'block';
  index: number;
  block: ContentBlock;
}

export interface DeltaEvent extends Frame {
  event: 'delta';
  index: number;
  type: 'text' | 'input_json' | 'thinking' | 'signature' | string;
  text?: string;
  partial_json?: string;
  thinking?: string;
  signature?: string;
}

/** A stream's last frame: every field of a non-streamed reply, plus ttft_ms and resumed. */
export interface DoneEvent extends Frame {
  event: 'done';
  ok: true;
  text: string;
  content: ContentBlock[];
  model: string;
  usage: Usage;
  served_by: ServedBy;
  ttft_ms: number;
  resumed: boolean;
}

export type StreamFrame = StartEvent | BlockEvent | DeltaEvent | DoneEvent;

export interface Pong extends Frame {
  ok: true;
  version: string;
}

export class Completion {
  constructor(frame: Frame);
  text: string;
  content: ContentBlock[];
  model: string;
  usage: Usage;
  stop_reason: string | null;
  stop_sequence: string | null;
  latency_ms: number;
  cost_usd: number;
  request_id: string;
  upstream_request_id: string | null;
  served_by: ServedBy;
  attempts: number;
  fallback: boolean;
  /** The static fallback text: switch the app to its non-AI behaviour. */
  degraded: boolean;
  cached: boolean;
  stale: boolean;
  prompt: string | null;
  prompt_version: number | null;
  ttft_ms: number | null;
  resumed: boolean;
  /** "check:action" for each output guardrail that acted (a redacted answer is marked this way), else null. */
  guardrails: string[] | null;
  /** The request's trace id (sidecard's tracing on, or the `traceparent` you sent). */
  trace_id: string | null;
  /** The API's own fields of the answer sidecard does not model (`container`, `stop_details`, ...), else null. */
  extra: Record<string, unknown> | null;
  /** The reply frame exactly as received. */
  raw: Frame;
}

export interface FeedbackFields {
  score?: number;
  thumbs?: 'up' | 'down';
  signal?: 'retry' | 'abandoned';
  label?: string;
  comment?: string;
}

export interface FeedbackReply {
  id: number;
  request_id: string;
  kind: 'score' | 'thumbs' | 'retry' | 'abandoned';
  value: number;
  ok: true;
}

export class SidecardError extends Error {
  constructor(code: string, message: string, retryable?: boolean, retryAfterMs?: number);
  /** The stable error code (docs/protocol.md), e.g. "upstream_unavailable". */
  code: string;
  retryable: boolean;
  retryAfterMs: number | undefined;
  /** sidecard's id for the failed request, as its log line has it; undefined for a frame refused before a request began. */
  requestId: string | undefined;
  /** The provider's request id of the last answer an upstream gave the request: quote it in a support ticket. */
  upstreamRequestId: string | undefined;
}
export class BadRequest extends SidecardError {}
export class InvalidRequest extends SidecardError {}
export class UpstreamAuthError extends SidecardError {}
export class RateLimited extends SidecardError {}
export class Overloaded extends SidecardError {}
export class Unavailable extends SidecardError {}
export class DeadlineExceeded extends SidecardError {}
export class AIDisabled extends SidecardError {}
export class InvalidOutput extends SidecardError {}
export class CacheMiss extends SidecardError {}
export class BudgetExceeded extends SidecardError {}
export class OutputBlocked extends SidecardError {}
export class PolicyRefused extends SidecardError {}
export class Forbidden extends SidecardError {}
export class FeedbackRefused extends BadRequest {}
export class JobNotFound extends SidecardError {}
export class ConnectionLost extends SidecardError {}
export class Timeout extends SidecardError {}
export class PartialAnswer extends SidecardError {
  constructor(code: string, message: string, retryable?: boolean, retryAfterMs?: number, text?: string);
  /** What was streamed before the failure: not the whole answer. */
  text: string;
}

/** The typed error for an error frame; a partial stream failure is a PartialAnswer. */
export function errorFromFrame(frame: Frame): SidecardError;

/** `$SIDECARD_SOCKET`, else `$XDG_RUNTIME_DIR/sidecard/app.sock`, else `/tmp/sidecard-$UID/app.sock`. */
export function defaultSocketPath(): string;

/** A job's request: what complete() takes, plus its deadline and webhook; or several requests in `jobs`. */
export interface SubmitParams extends Partial<CompleteParams> {
  /** Seconds from now, a duration ("90s", "45m", "6h", "2d"), or an RFC 3339 time with its offset. */
  by: number | string;
  webhook?: string;
  jobs?: Partial<CompleteParams>[];
}

/** A job as the daemon reports it (docs/jobs.md). */
export interface Job {
  id: string;
  state: 'accepted' | 'queued_batch' | 'queued_engine' | 'running' | 'succeeded' | 'failed' | 'cancelled';
  created: number;
  deadline: number;
  attempts: number;
  webhook?: string;
  finished?: number;
  /** How it was served (batch, engine, cache), the Messages API message, usage and cost; `request_id` takes feedback. */
  outcome?: { served: string; message: Frame; usage: Frame; cost_usd: number; list_usd: number; batch?: string | null; request_id?: string | null };
  error?: { code: string; message: string; retryable: boolean };
}

export class SidecardClient {
  constructor(options?: ClientOptions);
  readonly socketPath: string;
  timeoutMs: number | undefined;
  connectTimeoutMs: number;
  maxFrameBytes: number | undefined;

  ping(): Promise<Pong>;
  complete(params: CompleteParams, options?: CallOptions): Promise<Completion>;
  /** Event frames (start, block, delta), then the done frame; throws PartialAnswer after a mid-stream failure. */
  stream(params: CompleteParams, options?: CallOptions): AsyncGenerator<StreamFrame, void, undefined>;
  countTokens(params: CompleteParams, options?: CallOptions): Promise<number>;
  /** Feedback on an answer; rejects with FeedbackRefused (unknown, expired, already scored) or BadRequest. */
  feedback(requestId: string, fields: FeedbackFields, options?: CallOptions): Promise<FeedbackReply>;
  /** Hand sidecard a job: the request plus `by` (its deadline) and an optional `webhook`; resolves to the job at once. */
  submit(params: SubmitParams, options?: CallOptions): Promise<Job>;
  /** Several jobs at once (`jobs`), all accepted or none; resolves to the jobs, in order. */
  submitMany(params: SubmitParams, options?: CallOptions): Promise<Job[]>;
  /** The job as it is now. */
  job(jobId: string, options?: CallOptions): Promise<Job>;
  /** The job once it has finished, or as it is after waitMs (default 30000). */
  wait(jobId: string, options?: CallOptions & { waitMs?: number }): Promise<Job>;
  /** Any frame (an id is assigned); resolves to the reply frame, rejects on an error frame. */
  request(frame: { op: string; [field: string]: unknown }, options?: CallOptions): Promise<Frame>;
  /** Close the connection; waiting requests fail with ConnectionLost; a later call reconnects. */
  close(): void;
}

/** A webhook delivery that is not from sidecard, or is stale. */
export class InvalidWebhook extends Error {
  constructor(reason: 'malformed' | 'stale' | 'signature', message: string);
  readonly reason: 'malformed' | 'stale' | 'signature';
}

/** The JSON payload of a webhook from sidecard, once its Sidecard-Signature header is verified; throws InvalidWebhook. */
export function verifyWebhook(
  secret: string | Uint8Array,
  header: string | null | undefined,
  body: string | Uint8Array,
  toleranceS?: number,
  now?: number,
): unknown;

export default SidecardClient;

// @sidecard/client: a dependency-free Node.js client for the sidecard daemon's Unix-socket protocol
// (newline-delimited JSON; docs/protocol.md). Plain ESM; the types are in index.d.ts.
//
//   import { SidecardClient } from '@sidecard/client';
//   const client = new SidecardClient();
//   const reply = await client.complete({ messages: [{ role: 'user', content: 'Hello' }], feature: 'greeting' });
//   console.log(reply.text);
//   client.close();
//
// One client holds one connection, shared by every caller: requests are pipelined over it and replies matched
// by id. After the connection breaks, the requests waiting on it fail with ConnectionLost and the next call
// reconnects. An idle client does not keep the process alive.

import { createHmac, timingSafeEqual } from 'node:crypto';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';

// ---------------------------------------------------------------- errors

/** An error frame from the daemon (or a client-side failure with a code of its own). */
export class SidecardError extends Error {
  constructor(code, message, retryable = false, retryAfterMs = undefined) {
    super(message);
    this.name = new.target.name;
    this.code = code;
    this.retryable = retryable;
    this.retryAfterMs = retryAfterMs;
    // sidecard's id for the failed request (its log line's), and the provider's id of the last answer it gave;
    // undefined when the daemon refused the frame before starting a request.
    this.requestId = undefined;
    this.upstreamRequestId = undefined;
  }
}

/** bad_frame, frame_too_large, unknown_op, bad_request, prompt_not_found: the request is malformed. */
export class BadRequest extends SidecardError {}
/** invalid_request, request_too_large: the upstream refused the request itself. */
export class InvalidRequest extends SidecardError {}
/** upstream_auth, upstream_forbidden, model_not_found: sidecard's credentials, permissions or model id are wrong. */
export class UpstreamAuthError extends SidecardError {}
/** rate_limited: slow down; see retryAfterMs. */
export class RateLimited extends SidecardError {}
/** overloaded, shutting_down: try again shortly. */
export class Overloaded extends SidecardError {}
/** upstream_unavailable, upstream_error, upstream_timeout: the model could not answer. */
export class Unavailable extends SidecardError {}
/** deadline_exceeded: no answer within the request's deadline. */
export class DeadlineExceeded extends SidecardError {}
/** ai_disabled: an operator switched this feature off; show the non-AI path. */
export class AIDisabled extends SidecardError {}
/** bad_output: the answer did not match the prompt's declared output format, even after a retry. */
export class InvalidOutput extends SidecardError {}
/** output_blocked: a guardrail blocked the answer; show the non-AI path (asking again gets the same answer). */
export class OutputBlocked extends SidecardError {}
/** policy_refused: a data or injection policy refused to send this request to a model. */
export class PolicyRefused extends SidecardError {}
/** forbidden: this app may not make this request (access control), or is not a known app. */
export class Forbidden extends SidecardError {}
/** cache_miss: the request asked for a cached answer only, and there was none. */
export class CacheMiss extends SidecardError {}
/** budget_exceeded: a spend budget is used up until its reset; see retryAfterMs. */
export class BudgetExceeded extends SidecardError {}
/** unknown_request, expired_request, duplicate_feedback: feedback on a request this daemon cannot score. */
export class FeedbackRefused extends BadRequest {}
/** job_not_found: no such job (unknown, or finished and forgotten after the retention time). */
export class JobNotFound extends SidecardError {}
/** The connection to the daemon failed or closed before the reply arrived. */
export class ConnectionLost extends SidecardError {}
/** No reply within the client-side timeout. */
export class Timeout extends SidecardError {}

/** A stream failed after its first token: `text` is what arrived, and it is not the whole answer. */
export class PartialAnswer extends SidecardError {
  constructor(code, message, retryable = false, retryAfterMs = undefined, text = '') {
    super(code, message, retryable, retryAfterMs);
    this.text = text;
  }
}

const BY_CODE = {
  bad_frame: BadRequest,
  frame_too_large: BadRequest,
  unknown_op: BadRequest,
  bad_request: BadRequest,
  prompt_not_found: BadRequest,
  invalid_request: InvalidRequest,
  request_too_large: InvalidRequest,
  upstream_auth: UpstreamAuthError,
  upstream_forbidden: UpstreamAuthError,
  model_not_found: UpstreamAuthError,
  rate_limited: RateLimited,
  overloaded: Overloaded,
  shutting_down: Overloaded,
  upstream_unavailable: Unavailable,
  upstream_error: Unavailable,
  upstream_timeout: Unavailable,
  deadline_exceeded: DeadlineExceeded,
  ai_disabled: AIDisabled,
  bad_output: InvalidOutput,
  cache_miss: CacheMiss,
  budget_exceeded: BudgetExceeded,
  output_blocked: OutputBlocked,
  policy_refused: PolicyRefused,
  forbidden: Forbidden,
  unknown_request: FeedbackRefused,
  expired_request: FeedbackRefused,
  duplicate_feedback: FeedbackRefused,
  job_not_found: JobNotFound,
};

/** The typed error for an error frame (`frame.error`); a partial stream failure is a PartialAnswer. */
export function errorFromFrame(frame) {
  const error = (frame && frame.error) || {};
  const code = String(error.code ?? 'internal');
  const args = [code, String(error.message ?? ''), Boolean(error.retryable), error.retry_after_ms ?? undefined];
  let err;
  if (frame && frame.partial) err = new PartialAnswer(...args, String(frame.text ?? ''));
  else err = new (Object.hasOwn(BY_CODE, code) ? BY_CODE[code] : SidecardError)(...args);
  err.requestId = frame?.request_id ?? undefined;
  err.upstreamRequestId = frame?.upstream_request_id ?? undefined;
  return err;
}

// ---------------------------------------------------------------- results

/** `$SIDECARD_SOCKET`, else the daemon's default in the per-user runtime directory. */
export function defaultSocketPath() {
  const env = process.env.SIDECARD_SOCKET;
  if (env) return env;
  const runtime = process.env.XDG_RUNTIME_DIR;
  const uid = typeof process.getuid === 'function' ? process.getuid() : os.userInfo().uid;
  const base = runtime ? path.join(runtime, 'sidecard') : `/tmp/sidecard-${uid}`;
  return path.join(base, 'app.sock');
}

/** A successful `complete` reply (or a stream's `done` frame). Field names are the wire's. */
export class Completion {
  constructor(frame) {
    this.text = frame.text ?? '';
    this.content = frame.content ?? [];
    this.model = frame.model ?? '';
    this.usage = {
      input_tokens: 0,
      output_tokens: 0,
      cache_creation_input_tokens: 0,
      cache_read_input_tokens: 0,
      ...(frame.usage ?? {}),
    };
    this.stop_reason = frame.stop_reason ?? null;
    this.stop_sequence = frame.stop_sequence ?? null;
    this.latency_ms = frame.latency_ms ?? 0;
    this.cost_usd = frame.cost_usd ?? 0;
    this.request_id = frame.request_id ?? '';
    this.upstream_request_id = frame.upstream_request_id ?? null;
    this.served_by = frame.served_by ?? {};
    this.attempts = frame.attempts ?? 1;
    this.fallback = frame.fallback ?? false;
    this.degraded = frame.degraded ?? false;
    this.cached = frame.cached ?? false;
    this.stale = frame.stale ?? false;
    this.prompt = frame.prompt ?? null;
    this.prompt_version = frame.prompt_version ?? null;
    this.ttft_ms = frame.ttft_ms ?? null;
    this.resumed = frame.resumed ?? false;
    this.guardrails = frame.guardrails ?? null;
    this.trace_id = frame.trace_id ?? null;
    this.extra = frame.extra ?? null;
    this.raw = frame;
  }
}

// ---------------------------------------------------------------- the client

const STREAM_EVENTS = new Set(['start', 'block', 'delta']);
const NEWLINE = 0x0a;

function withoutUndefined(object) {
  return Object.fromEntries(Object.entries(object ?? {}).filter(([, v]) => v !== undefined));
}

/** What one request waits for: a reply frame, or for a stream, event frames then the last frame. */
class Pending {
  constructor(streaming) {
    this.streaming = streaming;
    this.events = []; // a stream's frames not yet taken
    this.frame = null; // the last frame
    this.error = null; // a connection failure
    this.finished = false;
    this.wake = null;
  }

  push(frame) {
    this.events.push(frame);
    this.#wakeUp();
  }

  finish(frame, error) {
    if (this.finished) return;
    this.finished = true;
    this.frame = frame;
    this.error = error;
    this.#wakeUp();
  }

  #wakeUp() {
    const wake = this.wake;
    this.wake = null;
    if (wake) wake();
  }

  /** Resolves when something arrives (or at once if something is there); false on timeout. */
  wait(timeoutMs) {
    if (this.events.length || this.finished) return Promise.resolve(true);
    return new Promise((resolve) => {
      let timer;
      this.wake = () => {
        clearTimeout(timer);
        resolve(true);
      };
      if (timeoutMs !== undefined && timeoutMs !== null) {
        timer = setTimeout(() => {
          this.wake = null;
          resolve(false);
        }, timeoutMs);
      }
    });
  }
}

class Connection {
  constructor(socket) {
    this.socket = socket;
    this.pending = new Map();
    this.chunks = []; // the start of a frame whose newline has not arrived yet
    this.closed = false;
  }
}

export class SidecardClient {
  #conn = null;
  #connecting = null;
  #ids = 0;

  /**
   * @param {object} [options]
   * @param {string} [options.socketPath] default: defaultSocketPath()
   * @param {number} [options.timeoutMs] client-side wait for a reply (for a stream: for each frame); default:
   *   none, except `complete({deadline_ms})` waits deadline_ms + 5000
   * @param {number} [options.connectTimeoutMs] default 5000
   * @param {number} [options.maxFrameBytes] raise the connection's frame limit with a `hello` (large images
   *   and documents); said again on every reconnect
   */
  constructor({ socketPath, timeoutMs, connectTimeoutMs = 5000, maxFrameBytes } = {}) {
    this.socketPath = socketPath || defaultSocketPath();
    this.timeoutMs = timeoutMs;
    this.connectTimeoutMs = connectTimeoutMs;
    this.maxFrameBytes = maxFrameBytes;
  }

  // -- operations

  async ping() {
    return this.request({ op: 'ping' });
  }

  /** Ask for a completion; resolves to a Completion or rejects with a SidecardError subclass. */
  async complete(params = {}, { timeoutMs, signal } = {}) {
    const frame = { ...withoutUndefined(params), op: 'complete' };
    delete frame.stream;
    let wait = timeoutMs ?? this.timeoutMs;
    if (wait === undefined && typeof frame.deadline_ms === 'number') wait = frame.deadline_ms + 5000;
    return new Completion(await this.request(frame, { timeoutMs: wait, signal }));
  }

  /**
   * Stream an answer: yields event frames (`start`, `block`, `delta`), then the `done` frame. Takes what
   * complete() takes. A failure throws a SidecardError; after the first token it is a PartialAnswer whose
   * `text` is what was streamed so far. Leaving the loop early, a timeout or an aborted `signal` stops the
   * answer in the daemon too (a `cancel` frame), upstream call included.
   */
  async *stream(params = {}, { timeoutMs, signal } = {}) {
    const frame = { ...withoutUndefined(params), op: 'complete', stream: true };
    const wait = timeoutMs ?? this.timeoutMs;
    signal?.throwIfAborted();
    const [id, conn, pending] = await this.#submit(frame, true);
    const stopListening = this.#abortOn(signal, conn, id, pending);
    try {
      for (;;) {
        if (!(await pending.wait(wait))) {
          throw new Timeout('timeout', `no stream event within ${wait} ms`, true);
        }
        signal?.throwIfAborted();
        while (pending.events.length) yield pending.events.shift();
        if (pending.finished) break;
      }
      if (pending.error) throw pending.error;
      if (pending.frame.ok === false) throw errorFromFrame(pending.frame);
      yield pending.frame;
    } finally {
      stopListening();
      this.#forget(conn, id);
    }
  }

  /** The request's input tokens, counted by the API; takes what complete() takes. */
  async countTokens(params = {}, { timeoutMs, signal } = {}) {
    const reply = await this.request({ ...withoutUndefined(params), op: 'count_tokens' }, { timeoutMs, signal });
    return reply.input_tokens;
  }

  /**
   * Feedback on an answer (its requestId): one of score, thumbs ('up'/'down') or signal ('retry'/'abandoned'),
   * with an optional label and comment. Rejects with FeedbackRefused for an unknown, expired or scored request.
   */
  async feedback(requestId, fields = {}, { timeoutMs } = {}) {
    return this.request({ ...withoutUndefined(fields), op: 'feedback', request_id: requestId }, { timeoutMs });
  }

  /**
   * Hand sidecard a job (docs/jobs.md): the request (what complete() takes) plus `by`, its deadline (seconds, a
   * duration such as "6h", or an RFC 3339 time), and optionally `webhook`. Resolves to the job (`id`, `state`,
   * `deadline`, ...) at once; several at once with `jobs: [request, ...]` resolves to the first (see submitMany).
   */
  async submit(params = {}, { timeoutMs } = {}) {
    return (await this.submitMany(params, { timeoutMs }))[0];
  }

  /** Like submit(); resolves to every job accepted (all or none), in order: for `jobs: [request, ...]`. */
  async submitMany(params = {}, { timeoutMs } = {}) {
    const frame = { ...withoutUndefined(params), op: 'submit' };
    delete frame.stream;
    return (await this.request(frame, { timeoutMs })).jobs;
  }

  /** The job as it is now: `state`, and once finished its `outcome` (or `error`). */
  async job(jobId, { timeoutMs } = {}) {
    return (await this.request({ op: 'job', job: jobId }, { timeoutMs })).job;
  }

  /** The job once it has finished, or as it is after `waitMs` (check its `state`). */
  async wait(jobId, { waitMs = 30000, timeoutMs } = {}) {
    const frame = { op: 'wait', job: jobId, timeout_ms: Math.max(1, Math.min(3600000, Math.round(waitMs))) };
    return (await this.request(frame, { timeoutMs: timeoutMs ?? waitMs + 10000 })).job;
  }

  /**
   * Send one frame (an `id` is assigned) and wait for its reply frame; rejects on an error frame. A timeout or an
   * aborted `signal` (rejecting with its reason) also stops the request in the daemon (a `cancel` frame).
   */
  async request(frame, { timeoutMs, signal } = {}) {
    const wait = timeoutMs ?? this.timeoutMs;
    signal?.throwIfAborted();
    const [id, conn, pending] = await this.#submit(frame, false);
    const stopListening = this.#abortOn(signal, conn, id, pending);
    try {
      if (!(await pending.wait(wait))) throw new Timeout('timeout', `no reply within ${wait} ms`, true);
      return outcome(pending);
    } finally {
      stopListening();
      this.#forget(conn, id);
    }
  }

  /** Close the connection; requests waiting on it fail with ConnectionLost. A later call reconnects. */
  close() {
    const conn = this.#conn;
    this.#conn = null;
    if (conn) this.#broken(conn, 'the client closed the connection');
  }

  // -- sending

  async #submit(frame, streaming) {
    const conn = await this.#connected();
    const id = ++this.#ids;
    const pending = new Pending(streaming);
    conn.pending.set(id, pending);
    this.#send(conn, { id, ...frame });  // the id first: a frame too large to read still names its call
    this.#updateRef(conn);
    return [id, conn, pending];
  }

  #send(conn, frame) {
    if (conn.closed) {
      conn.pending.delete(frame.id);
      throw new ConnectionLost('connection_lost', 'the connection to the daemon closed', true);
    }
    // A failed write surfaces as the socket's 'error' event, which fails every request waiting on it.
    conn.socket.write(JSON.stringify(frame) + '\n');
  }

  /** When SIGNAL aborts, the call ends with its reason and the daemon is told at once; returns what stops listening. */
  #abortOn(signal, conn, id, pending) {
    if (!signal) return () => {};
    const onAbort = () => {
      pending.finish(null, signal.reason);
      this.#forget(conn, id);
    };
    if (signal.aborted) {
      onAbort(); // (while the call was being sent)
      return () => {};
    }
    signal.addEventListener('abort', onAbort, { once: true });
    return () => signal.removeEventListener('abort', onAbort);
  }

  /** The call is over for its caller. A request still in the map was given up on: the daemon is told to stop it. */
  #forget(conn, id) {
    if (conn.pending.delete(id) && !conn.closed) conn.socket.write(`{"op":"cancel","id":${id}}\n`);
    this.#updateRef(conn);
  }

  // An idle connection does not keep the process alive; one with requests in flight does.
  #updateRef(conn) {
    if (conn.closed) return;
    if (conn.pending.size) conn.socket.ref();
    else conn.socket.unref();
  }

  // -- connection

  async #connected() {
    if (this.#conn && !this.#conn.closed) return this.#conn;
    if (!this.#connecting) {
      this.#connecting = this.#connect().finally(() => {
        this.#connecting = null;
      });
    }
    return this.#connecting;
  }

  async #connect() {
    const where = this.socketPath;
    const socket = net.createConnection({ path: where });
    const conn = new Connection(socket);
    let connected = false;
    await new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        conn.closed = true;
        socket.destroy();
        reject(new ConnectionLost('connection_lost', `cannot connect to ${where}: timed out`, true));
      }, this.connectTimeoutMs);
      socket.once('connect', () => {
        clearTimeout(timer);
        connected = true;
        resolve();
      });
      socket.on('error', (err) => {
        if (connected) {
          this.#broken(conn, `connection to the daemon failed: ${err.message}`);
        } else {
          clearTimeout(timer);
          conn.closed = true;
          socket.destroy();
          reject(new ConnectionLost('connection_lost', `cannot connect to ${where}: ${err.message}`, true));
        }
      });
      socket.on('close', () => this.#broken(conn, 'the daemon closed the connection'));
      socket.on('data', (chunk) => this.#received(conn, chunk));
    });
    if (this.maxFrameBytes !== undefined && this.maxFrameBytes !== null) await this.#hello(conn);
    this.#conn = conn;
    this.#updateRef(conn);
    return conn;
  }

  async #hello(conn) {
    const id = ++this.#ids;
    const pending = new Pending(false);
    conn.pending.set(id, pending);
    try {
      this.#send(conn, { op: 'hello', id, max_frame_bytes: this.maxFrameBytes });
      if (!(await pending.wait(this.connectTimeoutMs))) {
        throw new ConnectionLost('connection_lost', `no reply to hello within ${this.connectTimeoutMs} ms`, true);
      }
      outcome(pending);
    } catch (err) {
      this.#broken(conn, 'hello failed');
      if (err instanceof SidecardError && !(err instanceof ConnectionLost)) {
        throw new BadRequest(err.code, `hello refused: ${err.message}`, err.retryable, err.retryAfterMs);
      }
      throw err;
    } finally {
      conn.pending.delete(id);
    }
  }

  #received(conn, chunk) {
    let start = 0;
    let newline;
    while ((newline = chunk.indexOf(NEWLINE, start)) !== -1) {
      let line = chunk.subarray(start, newline);
      if (conn.chunks.length) {
        line = Buffer.concat([...conn.chunks, line]);
        conn.chunks = [];
      }
      start = newline + 1;
      const text = line.toString('utf8');
      if (!text.trim()) continue;
      let frame;
      try {
        frame = JSON.parse(text);
      } catch (err) {
        this.#broken(conn, `the daemon sent a frame that is not JSON: ${err.message}`);
        return;
      }
      this.#deliver(conn, frame);
      if (conn.closed) return;
    }
    if (start < chunk.length) conn.chunks.push(chunk.subarray(start));
  }

  #deliver(conn, frame) {
    if (frame === null || typeof frame !== 'object') return;
    // An error frame with `id: null` (a frame too broken to carry an id) cannot be matched to a request.
    const pending = conn.pending.get(frame.id);
    if (!pending) return;
    if (STREAM_EVENTS.has(frame.event)) {
      if (pending.streaming) pending.push(frame);
      return;
    }
    conn.pending.delete(frame.id);
    pending.finish(frame, null);
    this.#updateRef(conn);
  }

  /** Fail every request waiting on `conn` and close it; the next call opens a new connection. */
  #broken(conn, reason) {
    if (conn.closed) return;
    conn.closed = true;
    if (this.#conn === conn) this.#conn = null;
    const waiting = [...conn.pending.values()];
    conn.pending.clear();
    for (const pending of waiting) pending.finish(null, new ConnectionLost('connection_lost', reason, true));
    conn.socket.destroy();
  }
}

function outcome(pending) {
  if (pending.error) throw pending.error;
  if (pending.frame.ok === false) throw errorFromFrame(pending.frame);
  return pending.frame;
}

// ---------------------------------------------------------------- webhooks

/** A webhook delivery that is not from sidecard, or is stale. `reason`: 'malformed', 'stale' or 'signature'. */
export class InvalidWebhook extends Error {
  constructor(reason, message) {
    super(message);
    this.name = 'InvalidWebhook';
    this.reason = reason;
  }
}

/**
 * The JSON payload of a webhook from sidecard (an async job finished), once its `Sidecard-Signature` header is
 * checked over the raw body (a string or bytes); throws InvalidWebhook otherwise. The signature is HMAC-SHA256
 * with the shared secret over `<t>.<body>`; a delivery whose `t` is more than `toleranceS` from now is refused.
 */
export function verifyWebhook(secret, header, body, toleranceS = 300, now = Date.now() / 1000) {
  const raw = typeof body === 'string' ? Buffer.from(body, 'utf8') : Buffer.from(body.buffer, body.byteOffset, body.byteLength);
  let timestamp;
  const signatures = [];
  for (const part of String(header ?? '').split(',')) {
    const [name, value = ''] = part.trim().split(/=(.*)/s);
    if (name === 't' && /^[0-9]+$/.test(value)) timestamp = Number(value);
    else if (name === 'v1' && value) signatures.push(value);
  }
  if (timestamp === undefined || signatures.length === 0) {
    throw new InvalidWebhook('malformed', 'the Sidecard-Signature header is missing or malformed');
  }
  if (Math.abs(now - timestamp) > toleranceS) {
    throw new InvalidWebhook('stale', "the delivery's timestamp is outside the tolerance (a replay?)");
  }
  const expected = createHmac('sha256', secret).update(`${timestamp}.`).update(raw).digest();
  const matches = signatures.some((candidate) => {
    const given = Buffer.from(candidate, 'hex');
    return given.length === expected.length && timingSafeEqual(given, expected);
  });
  if (!matches) throw new InvalidWebhook('signature', "the delivery's signature does not match");
  try {
    return JSON.parse(raw.toString('utf8'));
  } catch {
    throw new InvalidWebhook('malformed', "the delivery's body is not JSON");
  }
}

export default SidecardClient;

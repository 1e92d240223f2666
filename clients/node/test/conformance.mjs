// The conformance cases (tests/conformance/cases, format in tests/conformance/README.md) through this client.
// The same checks as tests/conformance/check.py; keep the two in step.
import fs from 'node:fs';
import path from 'node:path';
import { isDeepStrictEqual } from 'node:util';

import { SidecardError, PartialAnswer } from '../index.js';
import { packageDir } from './daemon.mjs';

export const STREAM_EVENTS = new Set(['start', 'block', 'delta']);
const MISSING = Symbol('missing');

/** `$SIDECARD_CONFORMANCE_DIR`, else the repository's tests/conformance/cases. */
export function casesDir() {
  return process.env.SIDECARD_CONFORMANCE_DIR || path.resolve(packageDir, '../../tests/conformance/cases');
}

export function loadCases(dir = casesDir()) {
  return fs
    .readdirSync(dir)
    .filter((name) => name.endsWith('.json'))
    .sort()
    .map((name) => {
      const entry = JSON.parse(fs.readFileSync(path.join(dir, name), 'utf8'));
      if (entry.name !== name.slice(0, -'.json'.length)) throw new Error(`${name}: name must be the file's name`);
      return entry;
    });
}

export const steps = (entry) => entry.steps ?? [entry];

/** A request with every {"$repeat": S, "times": N} replaced by S repeated N times. */
export function expand(value) {
  if (Array.isArray(value)) return value.map(expand);
  if (value !== null && typeof value === 'object') {
    if ('$repeat' in value) return value.$repeat.repeat(value.times);
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, expand(v)]));
  }
  return value;
}

export function lookup(frame, dotted) {
  let value = frame;
  for (const part of dotted.split('.')) {
    if (Array.isArray(value) && /^\d+$/.test(part) && Number(part) < value.length) value = value[Number(part)];
    else if (value !== null && typeof value === 'object' && !Array.isArray(value) && Object.hasOwn(value, part)) value = value[part];
    else return MISSING;
  }
  return value;
}

const TYPES = {
  string: (v) => typeof v === 'string',
  integer: (v) => Number.isInteger(v),
  number: (v) => typeof v === 'number',
  boolean: (v) => typeof v === 'boolean',
  object: (v) => v !== null && typeof v === 'object' && !Array.isArray(v),
  array: (v) => Array.isArray(v),
  null: (v) => v === null,
};

export function eventsMatch(pattern, kinds) {
  const escape = (s) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
  const source = pattern
    .map((item) => {
      const quantifier = /[+*]$/.test(item) ? item.at(-1) : '';
      return `(?:${escape(quantifier ? item.slice(0, -1) : item)},)${quantifier}`;
    })
    .join('');
  return new RegExp(`^${source}$`).test(kinds.map((k) => `${k},`).join(''));
}

export const joinedText = (events) =>
  events.filter((e) => e.event === 'delta' && e.type === 'text').map((e) => e.text ?? '').join('');

/** What a client threw, in the shape of an error frame. */
export function errorFrame(err) {
  const error = { code: err.code, message: err.message, retryable: err.retryable };
  if (err.retryAfterMs !== undefined && err.retryAfterMs !== null) error.retry_after_ms = err.retryAfterMs;
  const frame = { ok: false, error };
  if (err instanceof PartialAnswer) Object.assign(frame, { partial: true, text: err.text });
  if (err.requestId !== undefined) frame.request_id = err.requestId;
  if (err.upstreamRequestId !== undefined) frame.upstream_request_id = err.upstreamRequestId;
  return frame;
}

/** Throws an Error listing every way `frame` (and a stream's `events`) misses `expect`. */
export function check(expect, frame, { events = [], clientError = null } = {}) {
  const problems = [];
  const show = (v) => (v === MISSING ? '<missing>' : JSON.stringify(v));
  if (frame.ok !== expect.ok) problems.push(`ok: expected ${expect.ok}, got ${show(frame.ok)}`);
  if (expect.error) {
    const error = frame.error;
    if (error === null || typeof error !== 'object') {
      problems.push(`error: expected an error object, got ${show(error)}`);
    } else {
      for (const key of ['code', 'retryable', 'retry_after_ms']) {
        if (key in expect.error && error[key] !== expect.error[key]) {
          problems.push(`error.${key}: expected ${show(expect.error[key])}, got ${show(error[key] ?? MISSING)}`);
        }
      }
      if (typeof error.message !== 'string') problems.push(`error.message: expected a string, got ${show(error.message)}`);
      else if (!error.message.includes(expect.error.message_contains ?? '')) {
        problems.push(`error.message: ${show(error.message)} does not contain ${show(expect.error.message_contains)}`);
      }
    }
  } else if (expect.ok === false) {
    problems.push('a case with ok false must say which error');
  }
  for (const [where, kinds] of Object.entries(expect.types ?? {})) {
    const value = lookup(frame, where);
    if (value === MISSING) problems.push(`${where}: missing (expected ${kinds})`);
    else if (!kinds.split('|').some((k) => TYPES[k](value))) problems.push(`${where}: expected ${kinds}, got ${show(value)}`);
  }
  for (const [where, want] of Object.entries(expect.values ?? {})) {
    const value = lookup(frame, where);
    if (value === MISSING || !isDeepStrictEqual(value, want)) problems.push(`${where}: expected ${show(want)}, got ${show(value)}`);
  }
  if (expect.stream) {
    const kinds = events.map((e) => e.event);
    if (frame.event !== undefined) kinds.push(frame.event);
    if (!eventsMatch(expect.stream.events, kinds)) {
      problems.push(`stream events: expected ${JSON.stringify(expect.stream.events)}, got ${JSON.stringify(kinds)}`);
    }
    if (expect.stream.joined && joinedText(events) !== frame.text) {
      problems.push(`stream text: deltas join to ${show(joinedText(events))}, the terminal frame says ${show(frame.text)}`);
    }
  }
  if ('client_error' in expect && clientError !== expect.client_error) {
    problems.push(`client error: expected ${expect.client_error}, got ${clientError}`);
  }
  if (expect.ok && clientError !== null) problems.push(`the client threw ${clientError} for a successful reply`);
  if (problems.length) {
    const text = JSON.stringify(frame);
    throw new Error(`${problems.join('\n')}\nframe: ${text.length < 600 ? text : text.slice(0, 600) + '...'}`);
  }
}

/** One step through the client: stream() for a streamed complete, complete() for complete, request() else. */
export async function runStep(client, step, timeoutMs) {
  const request = expand(step.request);
  const { op, stream, ...fields } = request;
  const events = [];
  let frame = {};
  let clientError = null;
  try {
    if (op === 'complete' && stream) {
      for await (const event of client.stream(fields, { timeoutMs })) {
        if (STREAM_EVENTS.has(event.event)) events.push(event);
        else frame = event;
      }
    } else if (op === 'complete') {
      frame = (await client.complete(fields, { timeoutMs })).raw;
    } else {
      frame = await client.request(request, { timeoutMs });
    }
  } catch (err) {
    if (!(err instanceof SidecardError)) throw err;
    frame = errorFrame(err);
    clientError = err.constructor.name;
  }
  check(step.expect, frame, { events, clientError });
}

// The Node client against a real daemon (`sidecard serve --simulate`), plus a stand-in daemon for breakage.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { after, afterEach, before, test } from 'node:test';

import {
  BadRequest,
  CacheMiss,
  Completion,
  ConnectionLost,
  FeedbackRefused,
  InvalidRequest,
  InvalidWebhook,
  JobNotFound,
  PartialAnswer,
  SidecardClient,
  SidecardError,
  Timeout,
  Unavailable,
  defaultSocketPath,
  errorFromFrame,
  verifyWebhook,
} from '../index.js';
import { Daemon, packageDir } from './daemon.mjs';

const PRIMARY = 'claude-sonnet-4-6';
const FALLBACK = 'claude-haiku-4-5-20251001';
const ask = (text) => [{ role: 'user', content: text }];

let daemon;
const clients = [];
const client = (options = {}) => {
  const c = new SidecardClient({ socketPath: daemon.socketPath, timeoutMs: 10000, ...options });
  clients.push(c);
  return c;
};

before(async () => {
  // The conformance daemon: async jobs on (tests/conformance/README.md).
  daemon = await Daemon.start({ config: path.resolve(packageDir, '../../tests/conformance/daemon.toml') });
});

afterEach(async () => {
  for (const c of clients.splice(0)) c.close();
  await daemon.clearFaults();
});

after(async () => {
  await daemon?.stop();
});

test('complete returns a typed result', async () => {
  const c = client();
  const reply = await c.complete({ messages: ask('[[sim:say:hello from node]]'), feature: 'clients', deadline_ms: 5000 });
  assert.ok(reply instanceof Completion);
  assert.equal(reply.text, 'hello from node');
  assert.deepEqual(reply.served_by, { provider: 'anthropic', model: PRIMARY });
  assert.ok(reply.usage.output_tokens > 0 && reply.request_id && reply.latency_ms >= 0);
  assert.equal(reply.fallback, false);
  assert.equal(reply.raw.ok, true);
  assert.equal((await c.ping()).ok, true);
  assert.ok(Number.isInteger(await c.countTokens({ messages: ask('count these words') })));
});

test('feedback on an answer is taken once; unknown ids and bad scores are typed errors', async () => {
  const c = client();
  const reply = await c.complete({ messages: ask('[[sim:say:rate me]]'), feature: 'clients' });
  const taken = await c.feedback(reply.request_id, { thumbs: 'up', label: 'helpful' });
  assert.deepEqual([taken.ok, taken.kind, taken.value, taken.request_id], [true, 'thumbs', 1, reply.request_id]);
  await assert.rejects(c.feedback(reply.request_id, { score: 0.2 }), (err) => err instanceof FeedbackRefused && err.code === 'duplicate_feedback');
  await assert.rejects(c.feedback('no-such-request', { thumbs: 'down' }), (err) => err instanceof FeedbackRefused && err.code === 'unknown_request');
  await assert.rejects(c.feedback(reply.request_id, { score: 7 }), (err) => err instanceof BadRequest && err.code === 'bad_request');
});

test('many callers pipeline over one connection; replies are matched by id', async () => {
  const c = client();
  let connections = 0;
  const original = net.createConnection;
  net.createConnection = (...args) => {
    connections += 1;
    return original(...args);
  };
  try {
    const texts = await Promise.all(
      Array.from({ length: 50 }, (_, i) => c.complete({ messages: ask(`[[sim:say:reply ${i}]]`) }).then((r) => r.text)),
    );
    assert.deepEqual(texts, Array.from({ length: 50 }, (_, i) => `reply ${i}`));
  } finally {
    net.createConnection = original;
  }
  assert.equal(connections, 1);

  await daemon.setFault({ model: PRIMARY, latency_ms: 150 });
  const order = [];
  await Promise.all([
    c.complete({ model: PRIMARY, messages: ask('[[sim:say:slow]]') }).then((r) => order.push([r.text, r.served_by.model])),
    c.complete({ model: FALLBACK, messages: ask('[[sim:say:fast]]') }).then((r) => order.push([r.text, r.served_by.model])),
  ]);
  assert.deepEqual(order, [['fast', FALLBACK], ['slow', PRIMARY]]);
});

test('stream yields start, block, deltas, then done', async () => {
  const frames = [];
  for await (const frame of client().stream({ messages: ask('stream this please') })) frames.push(frame);
  assert.equal(frames[0].event, 'start');
  assert.equal(frames.at(-1).event, 'done');
  const joined = frames.filter((f) => f.event === 'delta').map((f) => f.text).join('');
  assert.equal(joined, frames.at(-1).text);
});

test('a broken stream throws PartialAnswer with the text so far', async () => {
  await daemon.setFault({ model: '*', reset_after_events: 6 });
  const c = client();
  const got = [];
  await assert.rejects(
    async () => {
      for await (const frame of c.stream({ messages: ask('break the stream'), route: 'default' })) got.push(frame);
    },
    (err) => {
      assert.ok(err instanceof PartialAnswer && err instanceof SidecardError);
      assert.equal(err.code, 'upstream_error');
      assert.equal(err.retryable, true);
      assert.ok(err.text.length > 0);
      assert.equal(err.text, got.filter((f) => f.event === 'delta').map((f) => f.text).join(''));
      return true;
    },
  );
  await daemon.clearFaults();
  assert.equal((await c.ping()).ok, true);
});

/** Until the simulator has no call open: a request given up on was stopped in the daemon, upstream call included. */
async function upstreamIdle() {
  for (const started = Date.now(); (await daemon.stats()).total.in_flight; ) {
    if (Date.now() - started > 5000) throw new Error('the upstream call was not stopped');
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

/** Until the simulator has N calls open. */
async function upstreamCalls(n) {
  for (const started = Date.now(); (await daemon.stats()).total.in_flight < n; ) {
    if (Date.now() - started > 5000) throw new Error(`the simulator has not ${n} calls open`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

test('leaving a stream early stops its answer in the daemon and keeps the connection usable', async () => {
  await daemon.setFault({ model: PRIMARY, stall_after_events: 6 }); // (the answer would go on until the stall timeout)
  const c = client();
  for await (const frame of c.stream({ messages: ask('[[sim:long]]') })) {
    if (frame.event === 'delta') break;
  }
  await upstreamIdle();
  assert.equal((await c.complete({ model: FALLBACK, messages: ask('[[sim:say:after]]') })).text, 'after');
});

test('an aborted signal rejects with its reason and stops the request in the daemon', async () => {
  await daemon.setFault({ model: PRIMARY, hang: true });
  const c = client();
  const controller = new AbortController();
  const call = c.complete({ model: PRIMARY, messages: ask('hang') }, { signal: controller.signal });
  await upstreamCalls(1);
  controller.abort();
  await assert.rejects(call, (err) => err.name === 'AbortError');
  await upstreamIdle();

  await daemon.setFault({ model: PRIMARY, stall_after_events: 6 });
  const streaming = new AbortController();
  const got = [];
  await assert.rejects(
    async () => {
      for await (const frame of c.stream({ model: PRIMARY, messages: ask('[[sim:long]]') }, { signal: streaming.signal })) {
        got.push(frame);
        if (frame.event === 'delta') streaming.abort(new Error('the user left'));
      }
    },
    { message: 'the user left' },
  );
  assert.ok(got.length > 0);
  await upstreamIdle();
  await assert.rejects(c.complete({ messages: ask('x') }, { signal: AbortSignal.abort() }), (err) => err.name === 'AbortError');
  assert.equal((await c.complete({ model: FALLBACK, messages: ask('[[sim:say:fine]]') })).text, 'fine');
});

test('errors are typed', async () => {
  const c = client();
  await assert.rejects(c.complete({ messages: ask('x'), max_tokens: 0 }), (err) => {
    assert.ok(err instanceof BadRequest);
    assert.equal(err.code, 'bad_request');
    assert.equal(err.retryable, false);
    assert.match(err.message, /max_tokens/);
    return true;
  });
  await assert.rejects(c.complete({ prompt: 'no-such-prompt' }), (err) => err instanceof BadRequest && err.code === 'prompt_not_found');
  await assert.rejects(c.complete({ messages: ask('never cached'), cache: 'only' }), CacheMiss);
  await assert.rejects(c.request({ op: 'no_such_op' }), (err) => err instanceof BadRequest && err.code === 'unknown_op');
  await daemon.setFault({ model: '*', status: 529, should_retry: false, retry_after_s: 3 });
  await assert.rejects(c.complete({ messages: ask('all down') }), (err) => {
    assert.ok(err instanceof Unavailable);
    assert.equal(err.code, 'upstream_unavailable');
    assert.equal(err.retryable, true);
    assert.equal(err.retryAfterMs, 3000);
    return true;
  });
  await daemon.setFault({ model: '*', status: 400 });
  await assert.rejects(c.countTokens({ messages: ask('x') }), InvalidRequest);
});

test('a job is submitted, polled and waited for', async () => {
  const c = client();
  const job = await c.submit({ messages: ask('[[sim:say:Later is fine]]'), by: 60 }); // too soon for a batch
  assert.match(job.id, /^job_/);
  assert.equal(job.state, 'accepted');
  const done = await c.wait(job.id, { waitMs: 10000 });
  assert.equal(done.state, 'succeeded');
  assert.equal(done.outcome.served, 'engine');
  assert.equal(done.outcome.message.content[0].text, 'Later is fine');
  assert.deepEqual(await c.job(job.id), done);
  const many = await c.submitMany({ by: '1h', jobs: [{ messages: ask('one') }, { messages: ask('two') }] });
  assert.equal(many.length, 2);
  await assert.rejects(c.job('job_unknown'), JobNotFound);
  await assert.rejects(c.submit({ messages: ask('no deadline') }), BadRequest);
});

test('verifyWebhook accepts what sidecard signs and refuses a forged or stale delivery', () => {
  // Signed by sidecard.jobs.webhook.signature(b"whsec-node", BODY, 1700000000).
  const body = '{"type":"job.finished","job":{"id":"job_1","state":"succeeded"}}';
  const header = 't=1700000000,v1=e3f54ca289dfc4fae2ffe820955acbdff4b88e32a396cc5da411683bea4eaa2e';
  assert.equal(verifyWebhook('whsec-node', header, body, 300, 1700000010).job.id, 'job_1');
  assert.throws(() => verifyWebhook('whsec-other', header, body, 300, 1700000010), (e) => e instanceof InvalidWebhook && e.reason === 'signature');
  assert.throws(() => verifyWebhook('whsec-node', header, body.replace('job_1', 'job_2'), 300, 1700000010), InvalidWebhook);
  assert.throws(() => verifyWebhook('whsec-node', header, body, 300, 1700009999), (e) => e.reason === 'stale');
  assert.throws(() => verifyWebhook('whsec-node', 'nonsense', body), (e) => e.reason === 'malformed');
});

test('errorFromFrame maps every code, and unknown codes to SidecardError', () => {
  const of = (code, extra = {}) => errorFromFrame({ ok: false, error: { code, message: 'm', retryable: false }, ...extra });
  assert.equal(of('overloaded').constructor.name, 'Overloaded');
  assert.equal(of('shutting_down').constructor.name, 'Overloaded');
  assert.equal(of('ai_disabled').constructor.name, 'AIDisabled');
  assert.equal(of('budget_exceeded').constructor.name, 'BudgetExceeded');
  assert.equal(of('model_not_found').constructor.name, 'UpstreamAuthError');
  assert.equal(of('upstream_forbidden').constructor.name, 'UpstreamAuthError');
  assert.equal(of('something_new').constructor.name, 'SidecardError');
  assert.equal(of('toString').constructor.name, 'SidecardError');
  const partial = of('upstream_error', { partial: true, text: 'so far' });
  assert.ok(partial instanceof PartialAnswer);
  assert.equal(partial.text, 'so far');
});

test('a timeout stops the request in the daemon and leaves the connection usable', async () => {
  await daemon.setFault({ model: PRIMARY, hang: true });
  const c = client();
  await assert.rejects(c.complete({ model: PRIMARY, messages: ask('hang') }, { timeoutMs: 200 }), (err) => {
    assert.ok(err instanceof Timeout);
    assert.equal(err.retryable, true);
    return true;
  });
  await upstreamIdle(); // the daemon was told to stop, and did
  assert.equal((await c.complete({ model: FALLBACK, messages: ask('[[sim:say:fine]]') })).text, 'fine');
});

test('close() fails waiting requests with ConnectionLost; the next call reconnects', async () => {
  await daemon.setFault({ model: PRIMARY, hang: true });
  const c = client();
  const waiting = [1, 2, 3].map(() => c.complete({ model: PRIMARY, messages: ask('hang') }).catch((err) => err));
  await c.ping(); // the three requests are written before the ping's reply comes back
  c.close();
  const failures = await Promise.all(waiting);
  assert.ok(failures.every((err) => err instanceof ConnectionLost && err.retryable));
  assert.equal((await c.ping()).ok, true);
});

async function standIn(handler) {
  const dir = fs.mkdtempSync('/tmp/scn-');
  const where = path.join(dir, 'fake.sock');
  const sockets = [];
  const server = net.createServer((socket) => {
    sockets.push(socket);
    handler(socket, sockets.length);
  });
  await new Promise((resolve) => server.listen(where, resolve));
  return {
    where,
    sockets,
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise((resolve) => server.close(resolve));
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

test('a connection broken by the daemon fails its requests, then the next call reconnects', async () => {
  const fake = await standIn((socket, n) => {
    let rest = '';
    socket.on('data', (data) => {
      if (n === 1) return socket.destroy(); // hang up mid-request
      const lines = (rest + data).split('\n');
      rest = lines.pop();
      for (const line of lines.filter(Boolean)) {
        socket.write(JSON.stringify({ id: JSON.parse(line).id, ok: true, version: 'fake' }) + '\n');
      }
    });
  });
  const c = new SidecardClient({ socketPath: fake.where });
  try {
    await assert.rejects(c.ping(), ConnectionLost);
    assert.equal((await c.ping()).version, 'fake');
    assert.equal(fake.sockets.length, 2);
  } finally {
    c.close();
    await fake.close();
  }
});

test('frames split across reads, several per read, CRLF and multi-byte characters are all read right', async () => {
  const fake = await standIn((socket) => {
    let received = '';
    socket.on('data', (data) => {
      received += data;
      const lines = received.split('\n').filter(Boolean);
      if (lines.length < 3) return; // answer all three at once
      const ids = lines.map((line) => JSON.parse(line).id);
      const payload = ids.map((id) => JSON.stringify({ id, ok: true, version: 'déjà vu 🚀' }) + '\r\n').join('\n');
      const bytes = Buffer.from(payload);
      // one byte at a time at first, so a multi-byte character is cut in two, then the rest at once
      let i = 0;
      const drip = () => {
        if (i < 40) {
          socket.write(bytes.subarray(i, i + 1));
          i += 1;
          setImmediate(drip);
        } else {
          socket.write(bytes.subarray(i));
        }
      };
      drip();
    });
  });
  const c = new SidecardClient({ socketPath: fake.where, timeoutMs: 5000 });
  try {
    const replies = await Promise.all([c.ping(), c.ping(), c.ping()]);
    assert.deepEqual(replies.map((r) => r.version), ['déjà vu 🚀', 'déjà vu 🚀', 'déjà vu 🚀']);
  } finally {
    c.close();
    await fake.close();
  }
});

test('a missing socket is ConnectionLost', async () => {
  const c = new SidecardClient({ socketPath: '/tmp/no-such-dir-sidecard/app.sock' });
  await assert.rejects(c.ping(), (err) => err instanceof ConnectionLost && err.code === 'connection_lost');
});

test('maxFrameBytes is said with hello on every connection', async () => {
  const big = 'x'.repeat(1_200_000);
  const c = client({ maxFrameBytes: 4 << 20 });
  assert.equal((await c.request({ op: 'ping', padding: big })).ok, true);
  c.close();
  assert.equal((await c.request({ op: 'ping', padding: big })).ok, true);
  await assert.rejects(client({ maxFrameBytes: 10 }).ping(), (err) => err instanceof BadRequest && /hello refused/.test(err.message));
});

test('the default socket path follows SIDECARD_SOCKET, then XDG_RUNTIME_DIR, then /tmp/sidecard-$UID', () => {
  const saved = { socket: process.env.SIDECARD_SOCKET, runtime: process.env.XDG_RUNTIME_DIR };
  try {
    process.env.SIDECARD_SOCKET = '/somewhere/app.sock';
    process.env.XDG_RUNTIME_DIR = '/run/user/1000';
    assert.equal(defaultSocketPath(), '/somewhere/app.sock');
    delete process.env.SIDECARD_SOCKET;
    assert.equal(defaultSocketPath(), '/run/user/1000/sidecard/app.sock');
    delete process.env.XDG_RUNTIME_DIR;
    assert.equal(defaultSocketPath(), `/tmp/sidecard-${process.getuid()}/app.sock`);
    assert.equal(new SidecardClient().socketPath, defaultSocketPath());
  } finally {
    for (const [key, name] of [['socket', 'SIDECARD_SOCKET'], ['runtime', 'XDG_RUNTIME_DIR']]) {
      if (saved[key] === undefined) delete process.env[name];
      else process.env[name] = saved[key];
    }
  }
});

test('an idle client does not keep the process alive', async () => {
  const script = `
    import { SidecardClient } from ${JSON.stringify(path.join(packageDir, 'index.js'))};
    const c = new SidecardClient({ socketPath: ${JSON.stringify(daemon.socketPath)} });
    console.log((await c.ping()).ok);  // and no close(): the process must still end
  `;
  const child = spawn(process.execPath, ['--input-type=module', '-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  child.stdout.on('data', (d) => (out += d));
  const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
  const [code, signal] = await new Promise((resolve) => child.on('exit', (c, s) => resolve([c, s])));
  clearTimeout(timer);
  assert.equal(signal, null, 'the process had to be killed: the idle client kept it alive');
  assert.equal(code, 0);
  assert.equal(out.trim(), 'true');
});

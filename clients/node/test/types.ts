// Compiled by `npm run typecheck` (never run): index.d.ts must accept what the README shows.
import SidecardClientDefault, {
  Completion,
  PartialAnswer,
  SidecardClient,
  SidecardError,
  Unavailable,
  defaultSocketPath,
  type CompleteParams,
  type FeedbackReply,
  type StreamFrame,
} from '../index.js';

async function example(): Promise<void> {
  const client: SidecardClient = new SidecardClientDefault({ socketPath: defaultSocketPath(), timeoutMs: 30_000 });
  const params: CompleteParams = {
    messages: [{ role: 'user', content: 'Hello' }],
    feature: 'demo',
    deadline_ms: 10_000,
    tools: [{ name: 'get_weather', input_schema: { type: 'object' } }],
    a_newer_field: { anything: true },
  };
  const reply: Completion = await client.complete(params);
  const model: string = reply.served_by.model;
  const tokens: number = reply.usage.output_tokens + (await client.countTokens(params));
  const degraded: boolean = reply.degraded;
  const rated: FeedbackReply = await client.feedback(reply.request_id, { thumbs: 'up', label: 'helpful' });
  try {
    for await (const frame of client.stream(params, { timeoutMs: 5_000 })) {
      const f: StreamFrame = frame;
      if (f.event === 'delta' && f.type === 'text') console.log(f.text ?? '');
      if (f.event === 'done') console.log(f.ttft_ms, f.text);
    }
  } catch (err) {
    if (err instanceof PartialAnswer) console.log(err.text, err.code);
    else if (err instanceof Unavailable) console.log(err.retryAfterMs);
    else if (err instanceof SidecardError) console.log(err.code, err.retryable);
  }
  const pong = await client.ping();
  const version: string = pong.version;
  const raw = await client.request({ op: 'hello', max_frame_bytes: 20_000_000 });
  console.log(model, tokens, degraded, version, raw.ok);
  client.close();
}

void example();

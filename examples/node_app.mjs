#!/usr/bin/env node
// A tiny app on sidecard: ask a question, stream the answer, and fall back to the app's non-AI path when the
// AI cannot answer. The Node twin of examples/python_app.py.
//
//   make run                                                   # terminal 1: the daemon (simulated upstream)
//   node examples/node_app.mjs "How do I reset my password?"   # terminal 2
//
// Options: --feature NAME (default help-center). The socket is $SIDECARD_SOCKET, else the daemon's default.
// Exit status 0 whenever the user got an answer, from the AI or from the fallback path; 1 only for a bug in
// the request (a BadRequest).

// In an app of your own: import { ... } from '@sidecard/client';
import {
  AIDisabled,
  BadRequest,
  ConnectionLost,
  PartialAnswer,
  SidecardClient,
  SidecardError,
  Unavailable,
} from '../clients/node/index.js';

const HELP_PAGES = 'https://example.com/help';
const write = (text) => process.stdout.write(text);

function nonAiAnswer(why, retryAfterMs) {
  const later = retryAfterMs ? ` Try again in ${retryAfterMs / 1000} s.` : '';
  console.log(`The assistant is unavailable right now (${why}).${later}`);
  console.log(`Meanwhile, our help pages: ${HELP_PAGES}`);
}

async function main(argv) {
  let feature = 'help-center';
  const words = [];
  for (let i = 0; i < argv.length; i += 1) {
    if (argv[i] === '--feature') feature = argv[(i += 1)];
    else words.push(argv[i]);
  }
  const question = words.length ? words.join(' ') : 'How do I reset my password?';
  console.log(`Q: ${question}`);
  const sidecard = new SidecardClient({ timeoutMs: 30_000 });
  let answering = false; // "A: " and the first piece of the answer are on screen
  try {
    const frames = sidecard.stream({
      messages: [{ role: 'user', content: question }],
      system: 'You are the help-center assistant. Answer briefly.',
      feature,
      deadline_ms: 20_000,
      max_tokens: 300,
    });
    for await (const frame of frames) {
      if (frame.event === 'delta' && frame.type === 'text') {
        write(answering ? frame.text : `A: ${frame.text}`);
        answering = true;
      } else if (frame.event === 'done') {
        write(answering ? '\n' : `A: ${frame.text}\n`);
        if (frame.degraded) {
          // sidecard's static fallback (an operator's or the config's text): shown, but the app switches to its
          // non-AI behaviour as well.
          console.log("[degraded: this is our standard answer, not the assistant's]");
          console.log(`More help: ${HELP_PAGES}`);
        } else {
          console.log(`[answered by ${frame.served_by.model}, first token after ${Math.round(frame.ttft_ms)} ms]`);
        }
      }
    }
  } catch (err) {
    if (answering) write('\n');
    if (err instanceof PartialAnswer) {
      console.log(`[the answer was cut short (${err.code}): the text above is incomplete]`);
      console.log(`More help: ${HELP_PAGES}`);
    } else if (err instanceof AIDisabled) {
      console.log(`The assistant is switched off for now (${err.message}).`);
      console.log(`Our help pages: ${HELP_PAGES}`);
    } else if (err instanceof Unavailable || err instanceof ConnectionLost) {
      nonAiAnswer(err.code, err.retryAfterMs);
    } else if (err instanceof BadRequest) {
      console.error(`bug: sidecard refused the request: ${err.code}: ${err.message}`);
      return 1;
    } else if (err instanceof SidecardError) {
      nonAiAnswer(err.code, err.retryAfterMs); // rate limited, overloaded, deadline exceeded, timeout
    } else {
      throw err;
    }
  } finally {
    sidecard.close();
  }
  return 0;
}

process.exitCode = await main(process.argv.slice(2));

// Every conformance case (tests/conformance/cases) through the Node client, against one real daemon.
import { after, before, test } from 'node:test';
import path from 'node:path';

import { SidecardClient } from '../index.js';
import { Daemon, packageDir } from './daemon.mjs';
import { loadCases, runStep, steps } from './conformance.mjs';

const TIMEOUT_MS = 10000;
let daemon;

before(async () => {
  daemon = await Daemon.start({ config: path.resolve(packageDir, '../../tests/conformance/daemon.toml') });
});

after(async () => {
  await daemon?.stop();
});

for (const entry of loadCases()) {
  const skip = entry.socket_only ? 'socket only (a raw-socket runner checks it)' : false;
  test(entry.name, { skip }, async () => {
    await daemon.clearFaults();
    for (const fault of entry.faults ?? []) await daemon.setFault(fault);
    const client = new SidecardClient({ socketPath: daemon.socketPath, timeoutMs: TIMEOUT_MS });
    try {
      if (entry.concurrent) {
        await Promise.all(steps(entry).map((step) => runStep(client, step, TIMEOUT_MS)));
      } else {
        for (const step of steps(entry)) await runStep(client, step, TIMEOUT_MS);
      }
    } finally {
      client.close();
      await daemon.clearFaults();
    }
  });
}

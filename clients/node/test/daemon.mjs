// Start the real daemon (`sidecard serve --simulate`) for the tests, and drive its simulated upstream.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const packageDir = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

/** `$SIDECARD_BIN`, else the repository's venv (`../../.venv/bin/sidecard` from this package). */
export function sidecardBin() {
  return process.env.SIDECARD_BIN || path.resolve(packageDir, '../../.venv/bin/sidecard');
}

export class Daemon {
  constructor(child, dir, socketPath, simUrl, log) {
    this.child = child;
    this.dir = dir;
    this.socketPath = socketPath;
    this.simUrl = simUrl;
    this.log = log;
  }

  /** Start a daemon on a fresh socket; resolves once its `started` log line names the simulator's URL. */
  static async start({ timeoutMs = 20000 } = {}) {
    const bin = sidecardBin();
    if (!fs.existsSync(bin)) {
      throw new Error(`no sidecard executable at ${bin}: run \`make test\` in the repository once, or set SIDECARD_BIN`);
    }
    const dir = fs.mkdtempSync('/tmp/scn-'); // short: a Unix socket path must fit in 108 bytes
    const socketPath = path.join(dir, 'app.sock');
    const env = { ...process.env };
    delete env.ANTHROPIC_API_KEY;
    delete env.SIDECARD_CONFIG;
    // Async jobs on, as the conformance cases expect (tests/conformance/README.md).
    const config = path.join(dir, 'sidecard.toml');
    fs.writeFileSync(config, '[jobs]\nenabled = true\nmax_submit = 10\n');
    const child = spawn(bin, ['serve', '--simulate', '--config', config, '--socket', socketPath, '--metrics', 'off'], {
      cwd: dir, // the daemon's state file and relative paths stay in the temporary directory
      env,
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    const log = [];
    const simUrl = await new Promise((resolve, reject) => {
      let rest = '';
      const timer = setTimeout(() => fail(`no "started" log line within ${timeoutMs} ms`), timeoutMs);
      const fail = (why) => {
        clearTimeout(timer);
        child.kill('SIGKILL');
        reject(new Error(`${why}; the daemon said:\n${log.join('\n')}`));
      };
      child.on('exit', (code, signal) => fail(`the daemon exited (${code ?? signal})`));
      child.stderr.setEncoding('utf8');
      child.stderr.on('data', (text) => {
        const lines = (rest + text).split('\n');
        rest = lines.pop();
        for (const line of lines) {
          log.push(line);
          if (log.length > 200) log.shift();
          let record;
          try {
            record = JSON.parse(line);
          } catch {
            continue;
          }
          if (record.event === 'started') {
            clearTimeout(timer);
            child.removeAllListeners('exit');
            resolve(record.sim_url);
          }
        }
      });
    });
    return new Daemon(child, dir, socketPath, simUrl, log);
  }

  /** Set a simulator fault: `{model: "claude-sonnet-4-6" | "*", status, should_retry, hang, ...}`. */
  async setFault(spec) {
    const response = await fetch(`${this.simUrl}/_sim/faults`, { method: 'POST', body: JSON.stringify(spec) });
    if (!response.ok) throw new Error(`POST /_sim/faults ${JSON.stringify(spec)}: ${response.status} ${await response.text()}`);
  }

  async clearFaults() {
    const response = await fetch(`${this.simUrl}/_sim/faults`, { method: 'DELETE' });
    if (!response.ok) throw new Error(`DELETE /_sim/faults: ${response.status}`);
  }

  async stats() {
    return (await fetch(`${this.simUrl}/_sim/stats`)).json();
  }

  async stop() {
    const { child } = this;
    if (child.exitCode === null && child.signalCode === null) {
      const exited = new Promise((resolve) => child.once('exit', resolve));
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
      await exited;
      clearTimeout(timer);
    }
    fs.rmSync(this.dir, { recursive: true, force: true });
  }
}

// A real local cluster for the JS tests, started and stopped with the `ops` binary exactly as an
// operator does (`ops up` / `ops down`), on its own key prefix and database so the tests can share
// Redis and MySQL with anything else (the Rust suite's `TestEnv` does the same), and removed after.
//
// Binaries: IM_BIN_DIR, else $CARGO_TARGET_DIR/debug, else <repo>/target/debug (ops/test.sh builds
// them first). Servers: IM_TEST_REDIS_URL / IM_TEST_MYSQL_URL as ops/test.sh exports them, else the
// local standard ports.

import { execFile, spawnSync } from 'node:child_process';
import { createHmac, randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

const run = promisify(execFile);
const here = dirname(fileURLToPath(import.meta.url));
export const REPO = resolve(here, '../../..');
export const SECRET = 'js-client-test-secret-0123456789abcdef';

export function binDir() {
  if (process.env.IM_BIN_DIR) return process.env.IM_BIN_DIR;
  const target = process.env.CARGO_TARGET_DIR ?? join(REPO, 'target');
  return join(target, 'debug');
}

export function opsBinary() {
  const ops = join(binDir(), 'ops');
  if (!existsSync(ops)) throw new Error(`${ops} not found: build the workspace first (cargo build --workspace) or set IM_BIN_DIR`);
  return ops;
}

/** An HS256 JWT for `uid` that expires in `ttlSecs` (negative: already expired). */
export function token(uid, ttlSecs = 3600, secret = SECRET) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const head = b64({ alg: 'HS256', typ: 'JWT' });
  const body = b64({ uid: Number(uid), exp: Math.floor(Date.now() / 1000) + ttlSecs });
  const sig = createHmac('sha256', secret).update(`${head}.${body}`).digest('base64url');
  return `${head}.${body}.${sig}`;
}

/** User ids no earlier run used (the database is new per cluster anyway; this keeps logs readable). */
export function userIds(n) {
  const base = 100_000 + Math.floor(Math.random() * 800_000) * 10;
  return Array.from({ length: n }, (_, i) => String(base + i));
}

export class Cluster {
  constructor({ gateways = 1, shards = 2, workers, mode = process.env.IM_JS_MODE ?? 'full', env = {} } = {}) {
    this.spec = { gateways, shards, workers: workers ?? shards, mode };
    this.stopped = new Set(); // pids this run killed
    this.tag = `${process.pid}_${randomBytes(3).toString('hex')}`;
    this.dir = mkdtempSync(join(tmpdir(), 'im-js-'));
    this.stateFile = join(this.dir, 'cluster.json');
    this.redisUrl = process.env.IM_TEST_REDIS_URL ?? 'redis://127.0.0.1:6379';
    this.mysqlServer = (process.env.IM_TEST_MYSQL_URL ?? 'mysql://root@127.0.0.1:3306/').replace(/\/+$/, '');
    this.database = `imjs_${this.tag}`;
    this.prefix = `imjs:${this.tag}`;
    this.env = {
      ...process.env,
      IM_BIN_DIR: binDir(),
      IM__REDIS__URL: this.redisUrl,
      IM__REDIS__KEY_PREFIX: this.prefix,
      IM__MYSQL__URL: `${this.mysqlServer}/${this.database}`,
      IM__AUTH__JWT_SECRET: SECRET,
      // Tests count answers exactly on a shared, busy machine: no load shedding.
      IM__GATEWAY__SHED_APPEND_MS: '0',
      // A standby takes over a killed worker's shard in ~2 s instead of 5.
      IM__TWO_PHASE__LEASE_TTL_MS: '2000',
      IM__TWO_PHASE__BLOCK_MS: '200',
      RUST_LOG: process.env.RUST_LOG ?? 'warn',
      ...env,
    };
  }

  async up() {
    const { gateways, shards, workers, mode } = this.spec;
    const args = ['up', '--state', this.stateFile, '--gateways', `${gateways}`, '--shards', `${shards}`];
    args.push('--workers', `${workers}`, '--mode', mode);
    const { stdout } = await run(opsBinary(), args, { env: this.env, cwd: this.dir, timeout: 120_000 });
    this.upOutput = stdout;
    this.state = JSON.parse(readFileSync(this.stateFile, 'utf8'));
    return this;
  }

  /** `ops scale`: adds gateways (and standby workers) to the running cluster. */
  async scale({ gateways = 0, workers = 0 } = {}) {
    const args = ['scale', '--state', this.stateFile, '--gateways', `${gateways}`, '--workers', `${workers}`];
    await run(opsBinary(), args, { env: this.env, cwd: this.dir, timeout: 120_000 });
    this.state = JSON.parse(readFileSync(this.stateFile, 'utf8'));
  }

  get gateways() {
    return this.state.gateways;
  }

  /** The gateways this test run has not killed or stopped. */
  liveGateways() {
    return this.state.gateways.filter((g) => !this.stopped.has(g.pid));
  }

  /** The worker process that owns `shard` now (the one the metrics say holds the lease). */
  async ownerOf(shard) {
    for (const w of this.state.workers) {
      try {
        const text = await (await fetch(w.metrics_url)).text();
        const owns = text
          .split('\n')
          .some((l) => l.startsWith('im_worker_lease_held') && l.includes(`shard="${shard}"`) && / 1$/.test(l.trim()));
        if (owns) return w;
      } catch {
        /* a dead worker */
      }
    }
    return null;
  }

  /** The shard of a user id, as every process computes it (docs/ARCHITECTURE.md "Ids, shards, keys"). */
  shardOf(uid) {
    const M = (1n << 64n) - 1n;
    let h = 0xcbf29ce484222325n;
    let v = BigInt(uid);
    for (let i = 0; i < 8; i++) {
      h ^= v & 0xffn;
      h = (h * 0x100000001b3n) & M;
      v >>= 8n;
    }
    h ^= h >> 33n;
    h = (h * 0xff51afd7ed558ccdn) & M;
    h ^= h >> 33n;
    h = (h * 0xc4ceb9fe1a85ec53n) & M;
    h ^= h >> 33n;
    return Number(h % BigInt(this.state.shards));
  }

  /** SIGKILL (default) or SIGTERM a process of the cluster. */
  kill(pid, signal = 'SIGKILL') {
    this.stopped.add(pid);
    try {
      process.kill(pid, signal);
    } catch {
      /* already gone */
    }
  }

  /** Stops the cluster and removes its database and keys. */
  async down() {
    if (existsSync(this.stateFile)) {
      await run(opsBinary(), ['down', '--state', this.stateFile], { env: this.env, cwd: this.dir, timeout: 60_000 }).catch(
        (e) => console.error(`ops down failed: ${e.message}`),
      );
    }
    this.#removeData();
    if (!process.env.IM_JS_KEEP_LOGS) rmSync(this.dir, { recursive: true, force: true });
  }

  #removeData() {
    const my = new URL(this.mysqlServer.replace(/^mysql:/, 'http:'));
    const sql = ['-h', my.hostname, '-P', my.port || '3306', '-u', decodeURIComponent(my.username || 'root')];
    if (my.password) sql.push(`-p${decodeURIComponent(my.password)}`);
    const drop = spawnSync('mariadb', [...sql, '-e', `DROP DATABASE IF EXISTS \`${this.database}\``], { encoding: 'utf8' });
    if (drop.status !== 0) console.error(`could not drop ${this.database}: ${drop.stderr || drop.error}`);
    const keys = spawnSync('redis-cli', ['-u', this.redisUrl, '--scan', '--pattern', `${this.prefix}:*`], { encoding: 'utf8' });
    const names = (keys.stdout ?? '').split('\n').filter(Boolean);
    for (let i = 0; i < names.length; i += 500) {
      spawnSync('redis-cli', ['-u', this.redisUrl, 'DEL', ...names.slice(i, i + 500)]);
    }
  }
}

/** Waits until `check()` is truthy (polling), or fails with `what` after `ms`. */
export async function until(check, what, ms = 20_000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await check();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

// The demo chat page in a real browser: headless Debian `chromium` driven by playwright-core, two users
// in two browser contexts against a real local cluster (`ops up`, which serves the page at /demo).
// Screenshots go to test-output/ (git-ignored). Run: `node --test test/browser.test.js`.
//
// The page records every tick it draws in `window.demoTrace`; the test fails if a tick is missing,
// drawn twice or out of order, or if a message is lost or shown twice.

import assert from 'node:assert/strict';
import { existsSync, mkdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

import { STATES } from '../src/im-client.js';
import { Cluster, token, until, userIds } from './cluster.js';

const OUT = join(dirname(fileURLToPath(import.meta.url)), '..', 'test-output');
const CHROMIUM = process.env.CHROMIUM ?? ['/usr/bin/chromium', '/usr/bin/chromium-browser'].find(existsSync);

let cluster;
let browser;
let demoUrl;
const [A, B, C] = userIds(3); // Alice, Bob, and Carol (whom nobody writes to)
const sides = {}; // name → {page, uid, trace: [...] collected before reloads}
const sent = { [A]: [], [B]: [] }; // bodies each one sent, in order

function log(...args) {
  if (process.env.IM_JS_VERBOSE) console.log(...args);
}

before(async () => {
  assert.ok(CHROMIUM, 'chromium is installed (Debian package `chromium`; ops/test.sh installs it)');
  mkdirSync(OUT, { recursive: true });
  cluster = await new Cluster({ gateways: 1, shards: 2, workers: 3 }).up();
  demoUrl = `${cluster.gateways[0].http_url}/demo`;
  assert.match(cluster.upOutput, /demo chat http:\/\/127\.0\.0\.1:\d+\/demo/, 'ops up prints the demo URL');
  // As root, without a sandbox; no background traffic to hosts a closed network refuses.
  const args = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking'];
  args.push('--disable-component-update', '--disable-sync');
  browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args });
  for (const [name, uid] of [
    ['alice', A],
    ['bob', B],
  ]) {
    const context = await browser.newContext({ viewport: { width: 1100, height: 640 } });
    const page = await context.newPage();
    page.on('pageerror', (e) => console.error(`[${name}] page error: ${e.message}`));
    sides[name] = { page, uid, trace: [] };
  }
});

after(async () => {
  await browser?.close();
  await cluster?.down();
});

async function signIn(side) {
  const { page, uid } = side;
  await page.goto(demoUrl);
  await page.fill('#user', uid);
  await page.click('#signin-button');
  await page.waitForSelector('#conn[data-state="online"]');
}

async function openChat(side, peer) {
  await side.page.fill('#peer-input', peer);
  await side.page.press('#peer-input', 'Enter');
  await side.page.waitForSelector(`#chat-head:text("user ${peer}")`);
}

async function say(side, body) {
  await side.page.fill('#text', body);
  await side.page.press('#text', 'Enter');
  sent[side.uid].push(body);
}

/** The ticks drawn so far for our live messages (collected across reloads). */
async function collectTrace(side) {
  const trace = await side.page.evaluate(() => window.demoTrace.splice(0));
  side.trace.push(...trace.filter((t) => t.source !== 'history'));
}

/** Every live message of `side` drew exactly sending, accepted, saved, delivered, read — in that order. */
function assertTicks(side, bodies) {
  const byBody = new Map();
  for (const t of side.trace) {
    if (!byBody.has(t.body)) byBody.set(t.body, []);
    byBody.get(t.body).push(t.state);
  }
  for (const body of bodies) {
    assert.deepEqual(byBody.get(body), STATES, `ticks of "${body}" on ${side.uid}'s page`);
  }
}

/** The messages shown in the open chat: [{body, mine, state, clientMsgId}] top to bottom. */
function shownMessages(page) {
  return page.$$eval('#list li.msg', (lis) =>
    lis.map((li) => ({
      body: li.querySelector('.body').textContent,
      mine: li.classList.contains('mine'),
      state: li.dataset.state,
      clientMsgId: li.dataset.clientMsgId,
    })),
  );
}

async function waitAllRead(side, count) {
  await until(
    async () => {
      const mine = (await shownMessages(side.page)).filter((m) => m.mine);
      return mine.length >= count && mine.every((m) => m.state === 'read');
    },
    `all of ${side.uid}'s messages read`,
    60_000,
  );
}

const unreadOf = (page, peer) =>
  page.$eval(`#conversations li[data-peer="${peer}"] .unread`, (e) => Number(e.dataset.unread)).catch(() => null);

/** Each message once, in the order each side sent it. */
function assertShownOnce(messages, label) {
  const ids = messages.map((m) => m.clientMsgId);
  assert.equal(new Set(ids).size, ids.length, `${label}: a message is shown twice`);
  for (const uid of [A, B]) {
    const mine = label.startsWith(uid);
    const bodies = messages.filter((m) => m.mine === mine).map((m) => m.body);
    assert.deepEqual(bodies, sent[uid], `${label}: ${uid}'s messages, each once and in order`);
  }
}

test('two users exchange messages and every tick appears once, in order', async () => {
  const { alice, bob } = sides;
  await signIn(alice);
  await signIn(bob);
  await openChat(alice, B);
  await openChat(bob, A);
  for (const [who, body] of [
    [alice, 'Hi Bob!'],
    [bob, 'Hi Alice, got it.'],
    [alice, 'Two receipts: accepted, then saved'],
    [alice, 'and then delivered, and read'],
    [bob, 'I can see every tick'],
  ]) {
    await say(who, body);
    await new Promise((r) => setTimeout(r, 150));
  }
  await waitAllRead(alice, 3);
  await waitAllRead(bob, 2);
  for (const side of [alice, bob]) await collectTrace(side);
  assertTicks(alice, sent[A]);
  assertTicks(bob, sent[B]);
  assertShownOnce(await shownMessages(alice.page), `${A} page`);
  assertShownOnce(await shownMessages(bob.page), `${B} page`);
  await alice.page.screenshot({ path: join(OUT, '1-alice-chat.png') });
  await bob.page.screenshot({ path: join(OUT, '1-bob-chat.png') });
});

test('a page reload shows history and unread counts', async () => {
  const { alice, bob } = sides;
  // Bob looks at another conversation while Alice writes: her messages are delivered, not read.
  await openChat(bob, C);
  const unreadBodies = ['Are you there?', 'Unread one', 'Unread two'];
  for (const body of unreadBodies) await say(alice, body);
  await until(
    async () => (await shownMessages(alice.page)).filter((m) => m.mine).slice(-3).every((m) => m.state === 'delivered'),
    'delivered, not read',
  );
  await until(async () => (await unreadOf(bob.page, A)) === 3, "three unread in bob's list");
  await bob.page.screenshot({ path: join(OUT, '2-bob-unread.png') });
  await collectTrace(alice);
  const live = alice.trace.filter((t) => unreadBodies.includes(t.body)).map((t) => `${t.body}:${t.state}`);
  for (const body of unreadBodies) {
    assert.deepEqual(
      live.filter((t) => t.startsWith(`${body}:`)),
      STATES.slice(0, 4).map((s) => `${body}:${s}`),
      `ticks of "${body}": sending, accepted, saved, delivered — each once, in order`,
    );
  }

  // Alice reloads: history shows her messages with the ticks the peer positions give.
  await alice.page.reload();
  await alice.page.waitForSelector('#conn[data-state="online"]');
  await until(async () => (await shownMessages(alice.page)).length === sent[A].length + sent[B].length, 'alice history');
  let history = await shownMessages(alice.page);
  assertShownOnce(history, `${A} page after reload`);
  assert.deepEqual(
    history.filter((m) => m.mine).map((m) => m.state),
    sent[A].map((b) => (unreadBodies.includes(b) ? 'delivered' : 'read')),
    'history ticks from the peer positions',
  );

  // Bob reloads: the unread count is still there; opening the conversation shows the history.
  await bob.page.reload();
  await bob.page.waitForSelector('#conn[data-state="online"]');
  await until(async () => (await unreadOf(bob.page, A)) === 3, 'still three unread after the reload');
  await bob.page.click(`#conversations li[data-peer="${A}"]`);
  await until(async () => (await shownMessages(bob.page)).length === sent[A].length + sent[B].length, 'history');
  assertShownOnce(await shownMessages(bob.page), `${B} page after reload`);
  await until(async () => (await unreadOf(bob.page, A)) === 0, 'read once opened');

  // Alice's reloaded page turns the three to read as Bob's receipt arrives.
  await waitAllRead(alice, sent[A].length);
  history = await shownMessages(alice.page);
  assertShownOnce(history, `${A} page after Bob read`);
  await alice.page.screenshot({ path: join(OUT, '2-alice-after-reload.png') });
});

test('killing a shard worker mid-chat ends with every message delivered and saved once', async () => {
  const { alice, bob } = sides;
  await openChat(bob, A);
  const shard = cluster.shardOf(A);
  const owner = await cluster.ownerOf(shard);
  assert.ok(owner, `a worker owns shard ${shard}`);
  const already = { [A]: sent[A].length, [B]: sent[B].length };
  for (let i = 1; i <= 12; i++) {
    await say(alice, `Alice ${i} during the drill`);
    await say(bob, `Bob ${i} during the drill`);
    if (i === 4) {
      log(`killing worker ${owner.pid} (shard ${shard})`);
      cluster.kill(owner.pid);
    }
    if (i === 6) {
      // The killed worker's shard holds accepted, unsaved messages until a standby takes it over:
      // the backlog panel shows them while Alice's ticks stay at ✓ accepted.
      await until(
        async () => Number(await alice.page.textContent(`.shard[data-shard="${shard}"] b`).catch(() => 0)) > 0,
        `the backlog of shard ${shard} in the panel`,
        5_000,
      );
      await alice.page.screenshot({ path: join(OUT, '3-alice-worker-down.png') });
    }
    await new Promise((r) => setTimeout(r, 200));
  }
  await waitAllRead(alice, sent[A].length);
  await waitAllRead(bob, sent[B].length);
  for (const side of [alice, bob]) await collectTrace(side);
  assertTicks(alice, sent[A].slice(already[A]));
  assertTicks(bob, sent[B].slice(already[B]));
  assertShownOnce(await shownMessages(alice.page), `${A} page after the drill`);
  assertShownOnce(await shownMessages(bob.page), `${B} page after the drill`);
  await alice.page.screenshot({ path: join(OUT, '3-alice-after-drill.png') });
  await bob.page.screenshot({ path: join(OUT, '3-bob-after-drill.png') });

  // Saved once: the history API has exactly one row per message, in each sender's order.
  const rows = [];
  let beforeId;
  do {
    const url = `${cluster.gateways[0].http_url}/api/messages?peer=${B}&limit=100${beforeId ? `&before=${beforeId}` : ''}`;
    const page = await (await fetch(url, { headers: { Authorization: `Bearer ${token(A)}` } })).json();
    rows.push(...page.messages);
    beforeId = page.nextBefore;
  } while (beforeId);
  rows.reverse();
  for (const uid of [A, B]) {
    assert.deepEqual(
      rows.filter((r) => r.from === uid).map((r) => r.body),
      sent[uid],
      `${uid}'s rows: each saved once, in order`,
    );
  }
});

test('history pages back through older messages, each shown once', async () => {
  const { alice } = sides;
  const total = sent[A].length + sent[B].length;
  assert.ok(total > 30, 'more than one page of 30');
  await alice.page.reload();
  await alice.page.waitForSelector('#conn[data-state="online"]');
  await until(async () => (await shownMessages(alice.page)).length === 30, 'the newest page');
  await alice.page.click('#older');
  await until(async () => (await shownMessages(alice.page)).length === total, 'every page');
  assertShownOnce(await shownMessages(alice.page), `${A} page after paging`);
  assert.equal(await alice.page.isHidden('#older'), true, 'no older page left');
});

test('a bad token, an expired token and a server that is down each show a clear message', async () => {
  const context = await browser.newContext({ viewport: { width: 1100, height: 400 } });
  const page = await context.newPage();
  const [u] = userIds(1);
  const cases = [
    ['bad-token', demoUrl, token(u, 3600, 'some-other-secret-0123456789abcdef0123'), /rejected your token/],
    ['expired-token', demoUrl, token(u, -60), /token has expired/],
    ['server-down', `${demoUrl}?ws=ws://127.0.0.1:9/ws`, '', /Cannot reach the server at ws:\/\/127\.0\.0\.1:9\/ws/],
  ];
  for (const [name, url, tok, message] of cases) {
    await page.goto(url);
    await page.evaluate(() => sessionStorage.clear());
    await page.fill('#user', u);
    await page.fill('#token', tok);
    await page.click('#signin-button');
    await page.waitForSelector('#notice:not([hidden])');
    await until(async () => message.test(await page.textContent('#notice')), `${name}: ${message}`, 10_000);
    await page.screenshot({ path: join(OUT, `4-${name}.png`) });
  }
  await context.close();
});

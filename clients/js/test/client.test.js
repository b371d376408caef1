// The reference client against a real local cluster (`ops up`): 2 gateways, 2 shards, a standby.
// Run: `node --test test/client.test.js` (after `cargo build --workspace`; see test/cluster.js).

import assert from 'node:assert/strict';
import { after, afterEach, before, describe, test } from 'node:test';
import * as msgpack from '@msgpack/msgpack';
import WebSocket from 'ws';

import { ImClient, MemoryStorage, STATES, backoffDelay, msgpackCodec, tokenExpired } from '../src/im-client.js';
import { Cluster, token, until, userIds } from './cluster.js';

let cluster;
/** Every client a test made; closed after each test, also a failed one. */
const clients = [];

/** A client for `uid` on the cluster's gateways (first gateway first), with records of what it saw. */
function client(uid, { urls, storage, webSocket, ...opts } = {}) {
  const c = new ImClient({
    urls: urls ?? cluster.gateways.map((g) => g.ws_url),
    token: token(uid),
    WebSocket: webSocket ?? WebSocket,
    storage: storage ?? new MemoryStorage(),
    backoffInitialMs: 100,
    backoffMaxMs: 1000,
    ...opts,
  });
  c.received = [];
  c.states = new Map(); // clientMsgId → [state, ...]
  c.statuses = [];
  c.framesOut = [];
  c.on('message', (m) => c.received.push(m));
  c.on('state', ({ message, state }) => {
    if (!c.states.has(message.clientMsgId)) c.states.set(message.clientMsgId, []);
    c.states.get(message.clientMsgId).push(state);
  });
  c.on('status', (s) => c.statuses.push(s));
  c.on('frame', ({ direction, frame }) => direction === 'out' && c.framesOut.push(frame));
  clients.push(c);
  return c;
}

const online = (c) => until(() => c.status.state === 'online', `user ${c.uid} online`);
const bodies = (c, from) => c.received.filter((m) => m.from === from).map((m) => m.body);

/** Every state of every message, exactly once and in order, up to `last`. */
function assertStates(c, messages, last) {
  const want = STATES.slice(0, STATES.indexOf(last) + 1);
  for (const m of messages) {
    assert.deepEqual(c.states.get(m.clientMsgId), want, `states of ${m.body} (${m.clientMsgId})`);
  }
}

/** A `ws` WebSocket that loses the pushes `drop(frame)` picks, as a dropped connection would. */
function lossyWebSocket(drop) {
  return class extends WebSocket {
    constructor(...args) {
      super(...args);
      const deliver = (fn) => (ev) => {
        const frame = JSON.parse(String(ev.data));
        if (frame.type === 'SINGLE_CHAT' && drop(frame)) return;
        fn(ev);
      };
      const set = Object.getOwnPropertyDescriptor(WebSocket.prototype, 'onmessage').set;
      Object.defineProperty(this, 'onmessage', { set: (fn) => set.call(this, deliver(fn)) });
    }
  };
}

before(async () => {
  cluster = await new Cluster({ gateways: 2, shards: 2, workers: 3 }).up();
});

afterEach(() => {
  for (const c of clients.splice(0)) c.close();
});

after(async () => {
  await cluster?.down();
});

describe('encoding', () => {
  test('a client on MessagePack and one on JSON chat, each reading its own encoding', async () => {
    const [a, b] = userIds(2);
    const codec = msgpackCodec(msgpack);
    const decoded = { binary: 0, text: 0 };
    const counting = {
      ...codec,
      decode: (data) => {
        decoded[typeof data === 'string' ? 'text' : 'binary'] += 1;
        return codec.decode(data);
      },
    };
    const alice = client(a, { codec: counting }).connect();
    const bob = client(b).connect();
    await Promise.all([online(alice), online(bob)]);
    assert.equal(alice.ws.protocol, 'msgpack', 'the gateway selected the subprotocol');
    const sent = ['packed one', 'packed two'].map((body) => alice.send(b, body));
    bob.send(a, 'plain reply');
    await until(() => sent.every((m) => m.state === 'delivered'), 'both delivered');
    await until(() => alice.received.length === 1, 'alice has the reply');
    assert.deepEqual(bodies(bob, a), ['packed one', 'packed two']);
    assert.deepEqual(
      alice.received.map((m) => [m.body, m.seq, typeof m.serverMsgId]),
      [['plain reply', 1, 'string']],
    );
    assertStates(alice, sent, 'delivered');
    assert.ok(decoded.binary >= 5 && decoded.text === 0, JSON.stringify(decoded));
  });
});

describe('sending', () => {
  test('a message goes sending → accepted → saved → delivered → read, each state once and in order', async () => {
    const [a, b] = userIds(2);
    const alice = client(a).connect();
    const bob = client(b).connect();
    await Promise.all([online(alice), online(bob)]);
    const sent = ['one', 'two', 'three'].map((body) => alice.send(b, body));
    await until(() => bob.received.length === 3, 'bob has three messages');
    assert.deepEqual(bodies(bob, a), ['one', 'two', 'three']);
    assert.deepEqual(
      bob.received.map((m) => m.seq),
      [1, 2, 3],
    );
    await until(() => sent.every((m) => m.state === 'delivered'), 'all delivered');
    bob.markRead(a);
    await until(() => sent.every((m) => m.state === 'read'), 'all read');
    assertStates(alice, sent, 'read');
    // Delivered was confirmed by from+seq, coalesced, never one ACK per message per flush.
    const acks = bob.framesOut.filter((f) => f.type === 'ACK');
    assert.ok(acks.every((f) => f.from === a && Number.isInteger(f.seq) && !f.serverMsgId), JSON.stringify(acks));
    assert.deepEqual(acks.at(-1), { type: 'ACK', ackType: 'read', from: a, seq: 3 });
    alice.close();
    bob.close();
  });

  test('a message sent while offline keeps its clientMsgId and arrives once', async () => {
    const [a, b] = userIds(2);
    const alice = client(a);
    const early = alice.send(b, 'written offline');
    assert.equal(early.state, 'sending');
    const bob = client(b).connect();
    alice.connect();
    await until(() => early.state === 'delivered', 'delivered');
    assert.deepEqual(bodies(bob, a), ['written offline']);
    const singles = alice.framesOut.filter((f) => f.type === 'SINGLE_CHAT');
    assert.ok(singles.every((f) => f.clientMsgId === early.clientMsgId));
    alice.close();
    bob.close();
  });

  test('what the peer confirmed while the sender was offline reaches it through the conversation list', async () => {
    const [a, b] = userIds(2);
    const alice = client(a).connect();
    const bob = client(b).connect();
    await Promise.all([online(alice), online(bob)]);
    const sent = [alice.send(b, 'r1'), alice.send(b, 'r2')];
    await until(() => sent.every((m) => m.state === 'delivered'), 'delivered');
    alice.close();
    bob.markRead(a);
    await new Promise((r) => setTimeout(r, 400)); // the RECEIPT is relayed to nobody
    alice.connect();
    await until(() => sent.every((m) => m.state === 'read'), 'read after reconnecting');
    assertStates(alice, sent, 'read');
  });

  test('a message the server refuses for good fails with its reason and does not block the next', async () => {
    const [a, b] = userIds(2);
    const alice = client(a).connect();
    const bob = client(b).connect();
    await online(alice);
    const toSelf = alice.send(a, 'me');
    const tooLong = alice.send(b, 'x'.repeat(5000));
    const fine = alice.send(b, 'fine');
    await until(() => fine.state === 'delivered', 'the next message delivered');
    assert.equal(toSelf.state, 'failed');
    assert.equal(toSelf.reason, 'cannot_send_to_self');
    assert.equal(tooLong.state, 'failed');
    assert.equal(tooLong.reason, 'body_too_long');
    assert.deepEqual(bodies(bob, a), ['fine']);
    alice.close();
    bob.close();
  });
});

describe('connecting', () => {
  test('an expired token is reported as expired and not retried', async () => {
    const c = client(userIds(1)[0]);
    c.setToken(token(c.uid, -10));
    assert.ok(tokenExpired(c.token));
    c.connect();
    await until(() => c.status.state === 'auth_failed', 'auth_failed');
    assert.equal(c.status.reason, 'token_expired');
  });

  test('a token with a bad signature is reported as rejected, with the AUTH frame and with ?token=', async () => {
    for (const auth of ['frame', 'query']) {
      const [u] = userIds(1);
      const c = client(u, { auth });
      c.setToken(token(u, 3600, 'not-the-cluster-secret-0123456789abcdef'));
      c.connect();
      await until(() => c.status.state === 'auth_failed', `auth_failed (${auth})`);
      assert.equal(c.status.reason, 'token_rejected', auth);
      await new Promise((r) => setTimeout(r, 300));
      assert.equal(c.statuses.filter((s) => s.state === 'connecting').length, 1, `${auth}: tried once`);
    }
  });

  test('a server that is down is reported as unreachable and retried with growing, jittered backoff', async () => {
    const [u] = userIds(1);
    const c = client(u, { urls: ['ws://127.0.0.1:9/ws'] }).connect();
    await until(() => c.statuses.filter((s) => s.state === 'offline').length >= 4, 'four failed attempts', 15_000);
    c.close();
    const offline = c.statuses.filter((s) => s.state === 'offline');
    assert.ok(offline.every((s) => s.reason === 'server_unreachable'), JSON.stringify(offline));
    // Full jitter: each wait is random in [0, min(max, initial·2^attempt)].
    const caps = offline.map((_, i) => Math.min(1000, 100 * 2 ** i));
    assert.ok(offline.every((s, i) => s.retryInMs >= 0 && s.retryInMs <= caps[i]), JSON.stringify(offline));
    const draws = Array.from({ length: 200 }, () => backoffDelay(3, 100, 10_000));
    assert.ok(new Set(draws).size > 50 && Math.max(...draws) <= 800, 'jittered within the cap');
  });
});

describe('receiving', () => {
  test('positions survive a restart: the same device gets only what it does not hold, each once', async () => {
    const [a, b] = userIds(2);
    const alice = client(a).connect();
    const storage = new MemoryStorage();
    const bob = client(b, { storage }).connect();
    await Promise.all([online(alice), online(bob)]);
    const first = [1, 2, 3].map((i) => alice.send(b, `m${i}`));
    await until(() => first.every((m) => m.state === 'delivered'), 'first three delivered');
    bob.close();
    const later = [4, 5].map((i) => alice.send(b, `m${i}`));
    await until(() => later.every((m) => m.state === 'saved'), 'saved while bob is away');
    const again = client(b, { storage }).connect();
    await until(() => again.received.length === 2, 'the two new ones');
    await online(again);
    await new Promise((r) => setTimeout(r, 500));
    assert.deepEqual(bodies(again, a), ['m4', 'm5']);
    assert.deepEqual(
      again.received.map((m) => m.seq),
      [4, 5],
    );
    // The reconnecting device sent its own positions (`?sync=manual` + SYNC {positions}).
    assert.deepEqual(again.framesOut.find((f) => f.type === 'SYNC'), { type: 'SYNC', positions: { [a]: 3 } });
    await until(() => later.every((m) => m.state === 'delivered'), 'delivered after reconnect');
    alice.close();
    again.close();
  });

  test('a lost push opens a seq gap that SYNC {peer, afterSeq} closes; nothing is confirmed past the gap', async () => {
    const [a, b] = userIds(2);
    const alice = client(a).connect();
    let dropped = 0;
    const bob = client(b, {
      webSocket: lossyWebSocket((f) => f.seq === 3 && dropped === 0 && ++dropped === 1),
      gapWaitMs: 400,
    }).connect();
    await Promise.all([online(alice), online(bob)]);
    const sent = [1, 2, 3, 4, 5].map((i) => alice.send(b, `g${i}`));
    await until(() => bob.received.length === 5, 'all five, the lost one by sync');
    assert.equal(dropped, 1, 'one push was lost');
    assert.deepEqual(bodies(bob, a), ['g1', 'g2', 'g3', 'g4', 'g5']);
    const syncs = bob.framesOut.filter((f) => f.type === 'SYNC' && f.peer);
    // One SYNC for the gap (again only if the lost message was not saved yet when it was answered).
    assert.ok(syncs.length >= 1, 'the gap was synced');
    for (const f of syncs) assert.deepEqual(f, { type: 'SYNC', peer: a, afterSeq: 2 });
    await until(() => sent.every((m) => m.state === 'delivered'), 'all delivered');
    // While the gap was open, nothing past it was confirmed: every ACK before the gap's SYNC stops at 2.
    const gapSync = bob.framesOut.findIndex((f) => f.type === 'SYNC' && f.peer);
    const acks = bob.framesOut.map((f, i) => [f, i]).filter(([f]) => f.type === 'ACK' && f.ackType === 'delivered');
    assert.ok(
      acks.filter(([, i]) => i < gapSync).every(([f]) => f.seq <= 2),
      JSON.stringify(acks),
    );
    assert.equal(acks.at(-1)[0].seq, 5);
    alice.close();
    bob.close();
  });

  test('a second device with its own storage gets every message the server has not seen delivered', async () => {
    const [a, b] = userIds(2);
    const alice = client(a).connect();
    await online(alice);
    const sent = [1, 2].map((i) => alice.send(b, `o${i}`));
    await until(() => sent.every((m) => m.state === 'saved'), 'saved');
    const bob = client(b).connect();
    await until(() => bob.received.length === 2, 'offline messages on connect');
    assert.deepEqual(bodies(bob, a), ['o1', 'o2']);
    await until(() => sent.every((m) => m.state === 'delivered'), 'delivered');
    // History and the conversation list agree with what the client saw.
    const list = await bob.conversations();
    const conv = list.conversations.find((c) => c.peer === a);
    assert.equal(conv.lastSeqIn, 2);
    await until(async () => (await alice.conversations()).conversations[0]?.peerDelivered === 2, 'peerDelivered');
    const history = await alice.history(b);
    assert.deepEqual(
      history.messages.map((m) => [m.body, m.seq, m.state]),
      [
        ['o2', 2, 'delivered'],
        ['o1', 1, 'delivered'],
      ],
    );
    alice.close();
    bob.close();
  });
});

describe('failures', () => {
  test('a gateway that shuts down (1001 going_away) sends its clients to the next one, nothing lost', async () => {
    const [a, b] = userIds(2);
    const [g1, g2] = cluster.liveGateways();
    const alice = client(a, { urls: [g2.ws_url, g1.ws_url] }).connect();
    const bob = client(b, { urls: [g2.ws_url, g1.ws_url] }).connect();
    await Promise.all([online(alice), online(bob)]);
    const sent = [alice.send(b, 'before')];
    await until(() => sent[0].state === 'delivered', 'first delivered');
    cluster.kill(g2.pid, 'SIGTERM');
    sent.push(alice.send(b, 'during'), alice.send(b, 'after'));
    await until(() => sent.every((m) => m.state === 'delivered'), 'delivered through gateway 1', 30_000);
    assert.ok(alice.statuses.some((s) => s.state === 'offline' && s.code === 1001), JSON.stringify(alice.statuses));
    assert.deepEqual(bodies(bob, a), ['before', 'during', 'after']);
    assertStates(alice, sent, 'delivered');
  });

  test('a gateway killed mid-conversation: nothing lost, nothing shown twice, every state in order', async () => {
    const [a, b] = userIds(2);
    const live = cluster.liveGateways();
    if (live.length < 2) await cluster.scale({ gateways: 2 - live.length });
    const [g1, g2] = cluster.liveGateways();
    // Both start on gateway 1 (their first URL), then move to gateway 2 when it dies.
    const alice = client(a, { urls: [g1.ws_url, g2.ws_url] }).connect();
    const bob = client(b, { urls: [g1.ws_url, g2.ws_url] }).connect();
    await Promise.all([online(alice), online(bob)]);
    const total = 60;
    const sent = [];
    for (let i = 1; i <= total; i++) {
      sent.push(alice.send(b, `k${i}`));
      if (i === total / 2) {
        await until(() => bob.received.length >= 20, 'bob is receiving');
        cluster.kill(g1.pid);
      }
      await new Promise((r) => setTimeout(r, 15));
    }
    const killedAt = Date.now();
    await until(() => sent.every((m) => m.state === 'delivered'), 'every message delivered', 60_000);
    if (process.env.IM_JS_VERBOSE) {
      console.log(`all delivered ${Date.now() - killedAt} ms after the kill`);
      for (const c of [alice, bob]) console.log(c.uid, JSON.stringify(c.statuses.map((s) => [s.state, s.reason, s.code, s.url])));
    }
    await until(() => bob.received.length >= total, 'bob has everything', 30_000);
    await new Promise((r) => setTimeout(r, 500));
    assert.deepEqual(
      bodies(bob, a),
      sent.map((m) => m.body),
      'each once, in order',
    );
    assert.deepEqual(
      bob.received.map((m) => m.seq),
      sent.map((_, i) => i + 1),
    );
    assert.equal(new Set(sent.map((m) => m.serverMsgId)).size, total, 'one serverMsgId per message');
    assertStates(alice, sent, 'delivered');
    assert.ok(alice.statuses.some((s) => s.state === 'offline'), 'alice lost her connection');
    assert.ok(alice.status.state === 'online' && bob.status.state === 'online');
    // Every message is stored once: history has exactly these, with their seqs.
    const rows = [];
    let before;
    do {
      const page = await bob.history(a, { before, limit: 50 });
      rows.push(...page.messages);
      before = page.nextBefore;
    } while (before);
    assert.deepEqual(
      rows.map((m) => m.body).reverse(),
      sent.map((m) => m.body),
    );
    alice.close();
    bob.close();
  });
});

// im-client.js — the reference client of the im delivery engine (docs/PROTOCOL.md, docs/CLIENTS.md).
//
// One ES module, no dependencies, no build step: it runs in a browser as it is (the gateway serves it
// to the demo page at /demo/im-client.js) and in Node 20 with the `ws` package passed as `WebSocket`.
//
// What it does for the application, and why (docs/CLIENTS.md has the long form):
// - Sending: every message gets a clientMsgId once and keeps it for every retry, so a resend can never
//   become a second message. Messages are sent one at a time in order (the next only after the
//   previous one was accepted), so a refusal (`server_busy`, `too_many_requests`) retried later can
//   never let a later message overtake it. Everything without `ACK(saved)` is resent after a
//   reconnect: the answer to a resend is the state the message reached.
// - States: sending → accepted → saved → delivered → read (or failed, with the reason), emitted in that
//   order and each once. A receipt that arrives before the state it builds on waits for it.
// - Receiving: pushes are deduplicated by serverMsgId and seq, handed to the application per
//   conversation in seq order, and a gap in seqs is closed with `SYNC {peer, afterSeq}`.
// - Positions: per conversation, the highest seq held with nothing missing below. They are kept
//   (memory, or a `localStorage`-like storage), sent on every (re)connect (`?sync=manual` +
//   `SYNC {positions}`), and confirmed to the server with coalesced `ACK delivered` by from+seq,
//   never past a gap; `read` on demand.
// - Encoding: JSON text frames, or MessagePack binary frames through a codec the application passes
//   (`codec: msgpackCodec(await import('@msgpack/msgpack'))`), so the client itself stays free of
//   dependencies.
// - Connection: token by `AUTH` frame (default) or `?token=`; reconnect with capped exponential
//   backoff and full jitter, also after close 1001/1012/4001; a failure is classified (token expired,
//   token rejected, server unreachable) so an application can say what is wrong.

/** Outgoing message states, in the only order they are ever emitted. */
export const STATES = Object.freeze(['sending', 'accepted', 'saved', 'delivered', 'read']);

/** ERROR reasons after which the same clientMsgId is sent again later (PROTOCOL.md "Errors"). */
const RETRIABLE = new Set(['server_busy', 'too_many_requests', 'internal_error']);

const DEFAULTS = Object.freeze({
  auth: 'frame', // 'frame': `?auth=frame` + AUTH frame (answers AUTH_FAIL); 'query': `?token=`
  backoffInitialMs: 250,
  backoffMaxMs: 10_000,
  ackDelayMs: 50, // coalescing window for `ACK delivered`
  gapWaitMs: 150, // how long a gap may wait for the in-order push before `SYNC {peer, afterSeq}`
  pingIntervalMs: 25_000, // below the gateway's idle timeout (120 s by default)
  answerTimeoutMs: 10_000, // no answer to a frame or a ping this long: the connection is dead
  savedRecheckMs: 15_000, // an accepted message without ACK(saved) this long is asked about again
  maxInFlight: 1, // messages sent but not yet answered (1 keeps order through refusals)
  seenIdsMax: 10_000,
});

/** A small event emitter that works the same in browsers and Node. */
class Emitter {
  #handlers = new Map();
  on(event, fn) {
    if (!this.#handlers.has(event)) this.#handlers.set(event, new Set());
    this.#handlers.get(event).add(fn);
    return () => this.off(event, fn);
  }
  off(event, fn) {
    this.#handlers.get(event)?.delete(fn);
  }
  emit(event, value) {
    for (const fn of this.#handlers.get(event) ?? []) {
      try {
        fn(value);
      } catch (e) {
        // An application handler that throws must not break the protocol state machine.
        queueMicrotask(() => {
          throw e;
        });
      }
    }
  }
}

/** A `localStorage`-like storage in memory (the default outside browsers). */
export class MemoryStorage {
  #map = new Map();
  getItem(k) {
    return this.#map.has(k) ? this.#map.get(k) : null;
  }
  setItem(k, v) {
    this.#map.set(k, String(v));
  }
  removeItem(k) {
    this.#map.delete(k);
  }
}

/** The claims of a JWT (not verified: the server does that), or null if it is not readable. */
export function decodeToken(token) {
  try {
    const part = String(token).split('.')[1];
    const b64 = part.replace(/-/g, '+').replace(/_/g, '/').padEnd(Math.ceil(part.length / 4) * 4, '=');
    const text = typeof atob === 'function' ? atob(b64) : Buffer.from(b64, 'base64').toString('binary');
    const json = decodeURIComponent(
      Array.from(text, (c) => '%' + c.charCodeAt(0).toString(16).padStart(2, '0')).join(''),
    );
    return JSON.parse(json);
  } catch {
    return null;
  }
}

/** Whether the token's `exp` (seconds) lies in the past. Tokens without `exp` never expire here. */
export function tokenExpired(token, nowMs = Date.now()) {
  const exp = decodeToken(token)?.exp;
  return typeof exp === 'number' && exp * 1000 <= nowMs;
}

/** Capped exponential backoff with full jitter: a random wait in [0, min(max, initial·2^attempt)]. */
export function backoffDelay(attempt, initialMs, maxMs, random = Math.random) {
  const cap = Math.min(maxMs, initialMs * 2 ** Math.min(attempt, 30));
  return Math.round(random() * cap);
}

/** The default codec: one JSON object per text frame. */
const JSON_CODEC = Object.freeze({
  subprotocol: null,
  encode: (frame) => JSON.stringify(frame),
  decode: (data) => JSON.parse(typeof data === 'string' ? data : String(data)),
});

/**
 * A codec for MessagePack binary frames (PROTOCOL.md "MessagePack") from a library's `encode` and
 * `decode`, e.g. `msgpackCodec(await import('@msgpack/msgpack'))`. A text frame (JSON) is still read.
 */
export function msgpackCodec({ encode, decode }) {
  return Object.freeze({
    subprotocol: 'msgpack',
    encode: (frame) => encode(frame),
    decode: (data) => (typeof data === 'string' ? JSON.parse(data) : decode(new Uint8Array(data))),
  });
}

function randomHex(bytes) {
  const a = new Uint8Array(bytes);
  globalThis.crypto.getRandomValues(a);
  return Array.from(a, (b) => b.toString(16).padStart(2, '0')).join('');
}

/** `ws://host:port/ws` → `http://host:port`. */
function httpBaseOf(wsUrl) {
  const u = new URL(wsUrl);
  u.protocol = u.protocol === 'wss:' ? 'https:' : 'http:';
  return u.origin;
}

const idLess = (a, b) => BigInt(a) <= BigInt(b);

/**
 * The client. Events (`client.on(name, fn)`):
 * - `status`   {state: 'connecting'|'syncing'|'online'|'offline'|'auth_failed'|'closed', reason?, code?, retryInMs?, url?}
 * - `message`  an incoming message ({from, to, seq, serverMsgId, clientMsgId, body, msgType, ts}), once, in seq order per peer
 * - `state`    {message, state, previous, via} for an outgoing message: via 'local' (sending), 'ack' (an ACK
 *              said so), 'receipt' (a RECEIPT covers it), 'error' (failed) or 'implied' (a later state
 *              arrived first: a resend answered `saved` at once; a `read` that came without `delivered`)
 * - `receipt`  a RECEIPT frame as received ({ackType, peer, seq, serverMsgId?})
 * - `synced`   {} after the connect-time SYNC_DONE
 * - `error`    {reason, frame} for an ERROR that concerns no message of ours
 * - `frame`    {direction: 'in'|'out', frame} every frame (for logging and tests)
 */
export class ImClient extends Emitter {
  constructor(options = {}) {
    super();
    const o = { ...DEFAULTS, ...options };
    this.opts = o;
    this.urls = [].concat(o.urls ?? o.url ?? []);
    if (this.urls.length === 0) throw new Error('ImClient: `url` (or `urls`) is required');
    this.WebSocket = o.WebSocket ?? globalThis.WebSocket;
    this.codec = o.codec ?? JSON_CODEC;
    if (!this.WebSocket) throw new Error('ImClient: no WebSocket implementation (pass `WebSocket`, e.g. from the `ws` package)');
    this.fetch = o.fetch ?? globalThis.fetch?.bind(globalThis);
    this.storage = o.storage ?? new MemoryStorage();
    this.random = o.random ?? Math.random;
    this.tokenSource = o.token;
    this.token = typeof o.token === 'string' ? o.token : null;
    this.uid = this.token ? String(decodeToken(this.token)?.uid ?? '') : null;

    this.ws = null;
    this.connId = 0; // increases with every socket; frames are only sent on the current one
    this.ready = false; // authenticated on the current socket
    this.stopped = true;
    this.urlIndex = 0;
    this.attempt = 0; // reconnect attempts since the last complete sync
    this.timers = new Set();
    this.status = { state: 'closed' };

    // Outgoing.
    this.outbox = []; // records without ACK(saved), in send order
    this.byClientId = new Map(); // clientMsgId → record (also saved ones, for receipts)
    this.sentTo = new Map(); // peer → records in send order
    this.receiptPos = new Map(); // peer → {delivered, read}: how far the peer confirmed our messages
    this.seqOnly = new Set(); // peers with a RECEIPT we could not map to our messages yet
    this.counter = 0;

    // Incoming.
    this.positions = new Map(); // peer → highest seq held with nothing missing below
    this.readPos = new Map(); // peer → highest seq confirmed read
    this.historySeq = new Map(); // peer → highest seq of theirs shown from history
    this.buffer = new Map(); // peer → Map(seq → message) beyond a gap
    this.seenIds = new Set();
    this.syncing = false; // the connect-time sync is running
    this.gapSyncs = new Map(); // peer → {inFlight, attempt, timer}
    this.ackDirty = new Set();
    this.ackedDelivered = new Map(); // peer → seq sent in the last ACK delivered
    this.touched = new Set(); // peers whose positions moved since start (re-confirmed on reconnect)
    this.readTouched = new Set();
    this.stats = { duplicates: 0, gapSyncs: 0, reconnects: 0, resent: 0 };

    if (this.uid) this.#load();
  }

  // ---------------------------------------------------------------- public API

  /** Opens the connection (and keeps it open until `close()`). */
  connect() {
    if (!this.stopped) return this;
    this.stopped = false;
    this.#open();
    return this;
  }

  /** Closes the connection for good; unconfirmed messages stay in the outbox (and storage). */
  close() {
    this.stopped = true;
    this.#clearTimers();
    const ws = this.ws;
    this.ws = null;
    this.ready = false;
    if (ws) {
      try {
        ws.close(1000);
      } catch {
        /* already closed */
      }
    }
    this.#setStatus({ state: 'closed' });
  }

  /** Replaces the token (e.g. after `auth_failed`) and reconnects if the client is running. */
  setToken(token) {
    this.tokenSource = token;
    this.token = typeof token === 'string' ? token : null;
    const uid = this.token ? String(decodeToken(this.token)?.uid ?? '') : null;
    if (uid && uid !== this.uid) {
      this.uid = uid;
      this.#load();
    }
  }

  /**
   * Sends a message; returns its record at once ({clientMsgId, to, body, state, ...}). The record's
   * state changes are `state` events. `to` is a user id (number or string).
   */
  send(to, body, { msgType = 'TEXT', clientMsgId } = {}) {
    const rec = {
      clientMsgId: clientMsgId ?? this.#newClientMsgId(),
      to: String(to),
      body,
      msgType,
      state: 'sending',
      flags: { accepted: false, saved: false, delivered: false, read: false },
      serverMsgId: null,
      seq: null,
      ts: null,
      reason: null,
      createdAt: Date.now(),
      sentOn: 0, // connId of the socket it was last sent on
      answered: false, // answered on that socket
      sentAt: 0,
      attempts: 0,
      retryAt: 0,
    };
    this.#track(rec);
    this.outbox.push(rec);
    this.#saveOutbox();
    this.#emitState(rec, 'sending', null, 'local');
    this.#pump();
    return rec;
  }

  /**
   * Marks the peer's messages read up to `seq` (default: everything held). Never past what this
   * device holds without a gap — or has shown from history (`history()` pages are saved messages the
   * user sees, so a new device can mark them read before it holds them as pushes).
   */
  markRead(peer, seq) {
    peer = String(peer);
    const held = Math.max(this.positions.get(peer) ?? 0, this.historySeq.get(peer) ?? 0);
    const upTo = Math.min(seq ?? held, held);
    if (upTo <= (this.readPos.get(peer) ?? 0)) return;
    this.readPos.set(peer, upTo);
    this.readTouched.add(peer);
    this.#saveState();
    this.#sendFrame({ type: 'ACK', ackType: 'read', from: peer, seq: upTo });
  }

  /** Messages of ours not yet saved (in send order), for a peer or all. */
  pending(peer) {
    return this.outbox.filter((r) => peer == null || r.to === String(peer));
  }

  /** Our sent message records for a peer (this session's, and those restored from storage). */
  sent(peer) {
    return this.sentTo.get(String(peer)) ?? [];
  }

  /** The highest seq held from `peer` with nothing missing below. */
  position(peer) {
    return this.positions.get(String(peer)) ?? 0;
  }

  /** The highest seq of `peer`'s messages confirmed read (by this device, or the server's list). */
  readPosition(peer) {
    return this.readPos.get(String(peer)) ?? 0;
  }

  /** How far `peer` confirmed our messages: {delivered, read} seqs. */
  peerPosition(peer) {
    return { delivered: 0, read: 0, ...this.receiptPos.get(String(peer)) };
  }

  /** `GET /api/conversations`: the conversation list; also learns the peers' receipt positions. */
  async conversations({ limit, before } = {}) {
    const body = await this.#api('/api/conversations', { limit, before });
    for (const c of body.conversations ?? []) {
      this.#raiseReceipt(c.peer, 'delivered', c.peerDelivered ?? 0, null);
      this.#raiseReceipt(c.peer, 'read', c.peerRead ?? 0, null);
      if ((c.read ?? 0) > (this.readPos.get(c.peer) ?? 0)) this.readPos.set(c.peer, c.read);
      // Receipts relayed while we were offline reached nobody: the list has them.
      if (this.#applyReceipts(c.peer)) {
        this.seqOnly.add(c.peer);
        this.#resolveSeqs(c.peer);
      }
    }
    return body;
  }

  /**
   * `GET /api/messages?peer=`: saved messages of the conversation, newest first. Our own messages get
   * a `state` from the peer's positions (saved, delivered or read).
   */
  async history(peer, { before, limit, afterSeq } = {}) {
    peer = String(peer);
    const body = await this.#api('/api/messages', { peer, before, limit, afterSeq });
    const pos = this.peerPosition(peer);
    for (const m of body.messages ?? []) {
      if (m.from === peer) {
        if (m.seq > (this.historySeq.get(peer) ?? 0)) this.historySeq.set(peer, m.seq);
        continue;
      }
      const rec = this.byClientId.get(m.clientMsgId);
      if (rec && rec.seq == null) rec.seq = m.seq;
      m.state = m.seq <= pos.read ? 'read' : m.seq <= pos.delivered ? 'delivered' : 'saved';
      if (rec) m.state = STATES[Math.max(STATES.indexOf(m.state), STATES.indexOf(rec.state))];
    }
    return body;
  }

  // ---------------------------------------------------------------- connection

  async #token() {
    if (typeof this.tokenSource === 'function') {
      this.token = await this.tokenSource();
      const uid = String(decodeToken(this.token)?.uid ?? '');
      if (uid && uid !== this.uid) {
        this.uid = uid;
        this.#load();
      }
    }
    return this.token;
  }

  async #open() {
    if (this.stopped) return;
    const url = this.urls[this.urlIndex % this.urls.length];
    this.#setStatus({ state: 'connecting', url, attempt: this.attempt });
    let token;
    try {
      token = await this.#token();
    } catch (e) {
      return this.#authFailed('no_token', String(e?.message ?? e));
    }
    if (!token) return this.#authFailed('no_token');
    if (tokenExpired(token)) return this.#authFailed('token_expired');
    if (this.stopped) return;
    const q = this.opts.auth === 'query' ? `token=${encodeURIComponent(token)}&sync=manual` : 'auth=frame&sync=manual';
    const id = ++this.connId;
    let ws;
    try {
      const address = `${url}${url.includes('?') ? '&' : '?'}${q}`;
      const subprotocol = this.codec.subprotocol;
      ws = subprotocol ? new this.WebSocket(address, [subprotocol]) : new this.WebSocket(address);
      if (subprotocol) ws.binaryType = 'arraybuffer';
    } catch (e) {
      return this.#closed(id, 1006, String(e?.message ?? e), false);
    }
    this.ws = ws;
    this.ready = false;
    let opened = false;
    ws.onopen = () => {
      if (id !== this.connId) return;
      opened = true;
      if (this.opts.auth === 'query') this.#authenticated();
      else this.#sendRaw({ type: 'AUTH', token }, true);
    };
    ws.onmessage = (ev) => {
      if (id !== this.connId) return;
      this.#alive();
      let frame;
      try {
        frame = this.codec.decode(ev.data);
      } catch {
        return;
      }
      this.emit('frame', { direction: 'in', frame });
      this.#handle(frame);
    };
    ws.onerror = () => {
      /* a close event follows */
    };
    ws.onclose = (ev) => this.#closed(id, ev.code, ev.reason, opened);
  }

  #authenticated() {
    this.ready = true;
    this.#setStatus({ state: 'syncing' });
    // Our own positions: the server syncs the other conversations from its own (PROTOCOL "Sync").
    this.syncing = true;
    this.#sendFrame({ type: 'SYNC', positions: Object.fromEntries(this.positions) });
    // Confirmations sent on a socket that died may never have arrived: they are idempotent, so send
    // the current ones again.
    for (const peer of this.touched) this.#sendAck(peer, true);
    for (const peer of this.readTouched) {
      const seq = this.readPos.get(peer);
      if (seq) this.#sendFrame({ type: 'ACK', ackType: 'read', from: peer, seq });
    }
    this.#schedulePing();
    this.#pump();
  }

  async #closed(id, code, reason, opened) {
    // A connection we gave up on reports its close again later: handle each socket's end once.
    if (id !== this.connId || this.closedConn === id) return;
    this.closedConn = id;
    this.ws = null;
    this.ready = false;
    this.syncing = false;
    this.#clearTimers();
    for (const g of this.gapSyncs.values()) g.inFlight = false;
    if (this.stopped) return;
    if (code === 1008 || this.authFailReason) {
      // AUTH_FAIL / ERROR unauthorized then close 1008: the token is the problem, retrying won't help.
      const expired = tokenExpired(this.token);
      this.authFailReason = null;
      return this.#authFailed(expired ? 'token_expired' : 'token_rejected');
    }
    let why = reason || (opened ? 'closed' : 'connect_failed');
    if (!opened) {
      // A browser shows an HTTP 401 at the upgrade as a bare close 1006: ask over HTTP what is wrong.
      const probe = await this.#probe();
      if (id !== this.connId || this.stopped) return;
      if (probe === 'unauthorized') return this.#authFailed(tokenExpired(this.token) ? 'token_expired' : 'token_rejected');
      why = probe;
    }
    // going_away, a connection that broke off, or unreachable: try the next gateway.
    if (code === 1001 || code === 1006 || !opened) this.urlIndex++;
    const delay = backoffDelay(this.attempt, this.opts.backoffInitialMs, this.opts.backoffMaxMs, this.random);
    this.attempt++;
    this.stats.reconnects++;
    this.#setStatus({ state: 'offline', reason: why, code, retryInMs: delay });
    this.#later(delay, () => this.#open());
  }

  /** Why a connection could not open: 'server_unreachable', 'unauthorized' or 'unavailable'. */
  async #probe() {
    if (!this.fetch) return 'server_unreachable';
    const base = this.opts.httpUrl ?? httpBaseOf(this.urls[this.urlIndex % this.urls.length]);
    try {
      const r = await this.fetch(`${base}/api/conversations?limit=1`, {
        headers: { Authorization: `Bearer ${this.token}` },
      });
      if (r.status === 401) return 'unauthorized';
      return r.ok ? 'unavailable' : `unavailable_http_${r.status}`;
    } catch {
      return 'server_unreachable';
    }
  }

  #authFailed(reason, detail) {
    this.stopped = true;
    this.#clearTimers();
    this.#setStatus({ state: 'auth_failed', reason, detail });
  }

  #setStatus(status) {
    this.status = status;
    this.emit('status', status);
  }

  #alive() {
    clearTimeout(this.pongTimer);
    this.pongTimer = null;
  }

  #schedulePing() {
    const id = this.connId;
    this.#later(this.opts.pingIntervalMs, () => {
      if (id !== this.connId || !this.ready) return;
      this.#sendFrame({ type: 'PING' });
      this.pongTimer = setTimeout(() => this.#dropConnection('ping_timeout'), this.opts.answerTimeoutMs);
      this.timers.add(this.pongTimer);
      this.#schedulePing();
    });
  }

  /** Gives up on the current socket (it answers nothing); the close handler reconnects. */
  #dropConnection(reason) {
    const ws = this.ws;
    const id = this.connId;
    if (!ws) return;
    try {
      ws.close(4100, reason);
    } catch {
      /* ignore */
    }
    // Some implementations wait for the peer's close frame, which a dead peer never sends.
    this.#closed(id, 4100, reason, true);
  }

  #later(ms, fn) {
    const t = setTimeout(() => {
      this.timers.delete(t);
      fn();
    }, ms);
    this.timers.add(t);
    return t;
  }

  #clearTimers() {
    for (const t of this.timers) clearTimeout(t);
    this.timers.clear();
    this.savedTimer = null;
    this.refusedTimer = null;
    clearTimeout(this.pongTimer);
    this.pongTimer = null;
    clearTimeout(this.ackTimer);
    this.ackTimer = null;
    for (const g of this.gapSyncs.values()) {
      clearTimeout(g.timer);
      g.timer = null;
    }
  }

  #sendRaw(frame) {
    const ws = this.ws;
    if (!ws || ws.readyState !== 1) return false;
    try {
      ws.send(this.codec.encode(frame));
    } catch {
      return false;
    }
    this.emit('frame', { direction: 'out', frame });
    return true;
  }

  /** Sends on an authenticated socket; false when there is none (the frame is not queued). */
  #sendFrame(frame) {
    return this.ready && this.#sendRaw(frame);
  }

  // ---------------------------------------------------------------- frames in

  #handle(f) {
    switch (f.type) {
      case 'AUTH_OK':
        if (!this.ready) this.#authenticated();
        return;
      case 'AUTH_FAIL':
        this.authFailReason = 'auth_failed';
        return;
      case 'ACK':
        return this.#onAck(f);
      case 'ERROR':
        return this.#onError(f);
      case 'SINGLE_CHAT':
        return this.#onPush(f);
      case 'SYNC_DONE':
        return this.#onSyncDone(f);
      case 'RECEIPT':
        this.#onReceipt(f);
        return this.emit('receipt', f);
      default:
        return; // PONG and anything newer
    }
  }

  // ---------------------------------------------------------------- outgoing

  #newClientMsgId() {
    if (!this.deviceId) {
      this.deviceId = this.storage.getItem('im:device') ?? randomHex(6);
      this.storage.setItem('im:device', this.deviceId);
    }
    return `${this.deviceId}-${Date.now().toString(36)}-${(this.counter++).toString(36)}`;
  }

  #track(rec) {
    this.byClientId.set(rec.clientMsgId, rec);
    if (!this.sentTo.has(rec.to)) this.sentTo.set(rec.to, []);
    this.sentTo.get(rec.to).push(rec);
  }

  /** Sends what the window allows, strictly in outbox order. */
  #pump() {
    if (!this.ready) return;
    const now = Date.now();
    let inFlight = this.outbox.filter((r) => r.sentOn === this.connId && !r.answered).length;
    for (const rec of this.outbox) {
      if (inFlight >= this.opts.maxInFlight) break;
      const needs =
        rec.sentOn !== this.connId || // never sent on this socket: resend (same clientMsgId)
        (rec.answered && !rec.flags.accepted) || // refused for now: retry when due
        (rec.flags.accepted && now - rec.sentAt >= this.opts.savedRecheckMs); // no ACK(saved) yet: ask again
      if (!needs) continue;
      if (rec.answered && !rec.flags.accepted && rec.retryAt > now) {
        // A refused message blocks the ones after it: sending them now could overtake it.
        this.#later(rec.retryAt - now, () => this.#pump());
        break;
      }
      if (rec.sentOn !== 0 && rec.sentOn !== this.connId) this.stats.resent++;
      rec.sentOn = this.connId;
      rec.answered = false;
      rec.sentAt = now;
      rec.attempts++;
      this.#sendFrame({ type: 'SINGLE_CHAT', to: rec.to, clientMsgId: rec.clientMsgId, msgType: rec.msgType, body: rec.body });
      inFlight++;
      this.#watchAnswer(rec, this.connId);
    }
    const accepted = this.outbox.find((r) => r.flags.accepted && !r.flags.saved);
    if (accepted && !this.savedTimer) {
      this.savedTimer = this.#later(this.opts.savedRecheckMs, () => {
        this.savedTimer = null;
        this.#pump();
      });
    }
  }

  #watchAnswer(rec, id) {
    this.#later(this.opts.answerTimeoutMs, () => {
      if (id === this.connId && rec.sentOn === id && !rec.answered && !rec.flags.saved && rec.state !== 'failed') {
        this.#dropConnection('answer_timeout');
      }
    });
  }

  #onAck(f) {
    const rec = this.byClientId.get(f.clientMsgId);
    if (!rec || rec.state === 'failed') return;
    if (rec.sentOn === this.connId) rec.answered = true;
    rec.serverMsgId = f.serverMsgId ?? rec.serverMsgId;
    rec.ts = f.ts ?? rec.ts;
    if (f.ackType === 'accepted') rec.flags.accepted = rec.flags.acceptedByAck = true;
    if (f.ackType === 'saved') {
      rec.flags.accepted = true;
      rec.flags.saved = true;
      const i = this.outbox.indexOf(rec);
      if (i >= 0) this.outbox.splice(i, 1);
    }
    rec.attempts = 0;
    this.#applyReceipts(rec.to);
    this.#advance(rec, 'ack');
    this.#saveOutbox();
    if (rec.flags.saved && this.seqOnly.has(rec.to)) this.#resolveSeqs(rec.to);
    this.#pump();
  }

  #onError(f) {
    const rec = f.clientMsgId != null ? this.byClientId.get(String(f.clientMsgId)) : null;
    if (!rec || rec.flags.saved || rec.state === 'failed') {
      if (f.reason === 'unauthorized') this.authFailReason = 'unauthorized';
      if (f.reason === 'too_many_requests' && f.clientMsgId == null) this.#refused();
      this.emit('error', { reason: f.reason, frame: f });
      return;
    }
    if (rec.sentOn === this.connId) rec.answered = true;
    if (RETRIABLE.has(f.reason) && !rec.flags.accepted) {
      rec.retryAt = Date.now() + backoffDelay(rec.attempts, 200, this.opts.backoffMaxMs, this.random) + 50;
      rec.lastError = f.reason;
      this.#pump();
      return;
    }
    if (RETRIABLE.has(f.reason)) return; // a recheck of an accepted message was refused: ask again later
    // save_failed, or the message itself is invalid: it will never be delivered.
    const previous = rec.state;
    rec.state = 'failed';
    rec.reason = f.reason;
    const i = this.outbox.indexOf(rec);
    if (i >= 0) this.outbox.splice(i, 1);
    this.#saveOutbox();
    this.emit('state', { message: rec, state: 'failed', previous, via: 'error' });
    this.#pump();
  }

  /**
   * An ACK or SYNC of ours was refused by the rate limit (it names no message): send the current
   * positions and the open gap syncs again in a moment — they are idempotent.
   */
  #refused() {
    if (this.refusedTimer) return;
    this.refusedTimer = this.#later(1000, () => {
      this.refusedTimer = null;
      for (const peer of this.touched) this.#sendAck(peer, true);
      for (const peer of this.readTouched) {
        const seq = this.readPos.get(peer);
        if (seq) this.#sendFrame({ type: 'ACK', ackType: 'read', from: peer, seq });
      }
      for (const [peer, g] of this.gapSyncs) {
        g.inFlight = false;
        if (this.buffer.has(peer)) this.#gapSync(peer);
      }
    });
  }

  /** Moves a record's state as far as its flags allow, one state at a time. */
  #advance(rec, via) {
    if (rec.state === 'failed') return;
    const f = rec.flags;
    let target = 0;
    if (f.accepted || f.saved) target = 1;
    if (f.saved) target = 2;
    // A receipt does not overtake ACK(saved): delivered and read are shown after saved.
    if (f.saved && (f.delivered || f.read)) target = 3;
    if (f.saved && f.read) target = 4;
    let at = STATES.indexOf(rec.state);
    while (at < target) {
      at++;
      const previous = rec.state;
      rec.state = STATES[at];
      const direct = [null, f.acceptedByAck, f.saved, f.deliveredByReceipt, f.read][at] ? (at <= 2 ? 'ack' : 'receipt') : 'implied';
      this.#emitState(rec, rec.state, previous, direct);
    }
  }

  #emitState(rec, state, previous, via) {
    this.emit('state', { message: rec, state, previous, via });
  }

  // ---------------------------------------------------------------- receipts

  #raiseReceipt(peer, type, seq, serverMsgId) {
    peer = String(peer);
    const p = this.receiptPos.get(peer) ?? { delivered: 0, read: 0, delivered_id: null, read_id: null };
    const types = type === 'read' ? ['read', 'delivered'] : ['delivered'];
    for (const t of types) {
      if (seq > p[t]) {
        p[t] = seq;
        p[`${t}_id`] = serverMsgId ?? null;
      } else if (seq === p[t] && serverMsgId && !p[`${t}_id`]) {
        p[`${t}_id`] = serverMsgId;
      }
    }
    this.receiptPos.set(peer, p);
  }

  #onReceipt(f) {
    const peer = String(f.peer);
    const seq = Number(f.seq);
    if (!(seq > 0) || (f.ackType !== 'delivered' && f.ackType !== 'read')) return;
    this.#raiseReceipt(peer, f.ackType, seq, f.serverMsgId ?? null);
    if (f.ackType === 'delivered') this.receiptPos.get(peer).deliveredSeen = true;
    if (f.serverMsgId) {
      const rec = (this.sentTo.get(peer) ?? []).find((r) => r.serverMsgId === f.serverMsgId);
      if (rec) rec.seq = seq;
    }
    const unmapped = this.#applyReceipts(peer);
    if (unmapped) {
      this.seqOnly.add(peer);
      this.#resolveSeqs(peer);
    }
  }

  /**
   * Flags our messages to `peer` that its receipt positions cover: by seq when we know the message's
   * seq, else by serverMsgId against the id at the receipt's seq (a sender's messages to one peer get
   * ids and seqs in the same order). Returns whether some message might be covered but could not be
   * decided (its seq is unknown and the receipt came without an id).
   */
  #applyReceipts(peer) {
    const p = this.receiptPos.get(peer);
    if (!p) return false;
    this.#prune(peer);
    let unmapped = false;
    for (const rec of this.sentTo.get(peer) ?? []) {
      if (rec.state === 'failed' || rec.flags.read) continue;
      for (const t of ['delivered', 'read']) {
        if (rec.flags[t] || p[t] === 0) continue;
        let covered = null;
        if (rec.seq != null) covered = rec.seq <= p[t];
        else if (rec.serverMsgId && p[`${t}_id`]) covered = idLess(rec.serverMsgId, p[`${t}_id`]);
        if (covered) {
          rec.flags[t] = true;
          if (t === 'delivered' && p.deliveredSeen) rec.flags.deliveredByReceipt = true;
        }
        else if (covered === null && rec.flags.accepted) unmapped = true;
      }
      this.#advance(rec, 'receipt');
    }
    return unmapped;
  }

  /** Forgets the oldest finished (read or failed) records of a peer beyond the last 500. */
  #prune(peer) {
    const list = this.sentTo.get(peer);
    if (!list || list.length <= 500) return;
    while (list.length > 500 && (list[0].state === 'read' || list[0].state === 'failed')) {
      this.byClientId.delete(list.shift().clientMsgId);
    }
  }

  /**
   * Learns the seqs of our saved messages to `peer` from history (ACKs carry no seq), so receipts
   * that came without a serverMsgId can be mapped. Unsaved ones are looked up again once saved.
   */
  #resolveSeqs(peer) {
    if (this.resolving?.has(peer)) return;
    this.resolving ??= new Set();
    this.resolving.add(peer);
    setTimeout(async () => {
      try {
        const unknown = (this.sentTo.get(peer) ?? []).filter((r) => r.seq == null && r.flags.saved && !r.flags.read);
        if (unknown.length > 0 && this.fetch && this.token) {
          const limit = Math.min(200, unknown.length * 2 + 10);
          const body = await this.#api('/api/messages', { peer, limit });
          for (const m of body.messages ?? []) {
            const rec = m.from !== peer ? this.byClientId.get(m.clientMsgId) : null;
            if (rec && rec.seq == null) rec.seq = m.seq;
          }
        }
        const stillUnmapped = this.#applyReceipts(peer);
        const unsaved = (this.sentTo.get(peer) ?? []).some((r) => !r.flags.saved && r.state !== 'failed');
        if (!stillUnmapped || !unsaved) this.seqOnly.delete(peer);
      } catch {
        // History unavailable: the next receipt or save tries again.
      } finally {
        this.resolving.delete(peer);
      }
    }, 100);
  }

  // ---------------------------------------------------------------- incoming

  #onPush(m) {
    const peer = String(m.from);
    if (m.serverMsgId && this.seenIds.has(m.serverMsgId)) {
      this.stats.duplicates++;
      return;
    }
    if (typeof m.seq !== 'number') {
      // A server without seqs: dedupe by id is all there is.
      this.#remember(m.serverMsgId);
      this.emit('message', m);
      return;
    }
    if (!this.positions.has(peer) && !this.syncing) {
      // A conversation this device never held: it starts where the server's position put it.
      this.positions.set(peer, m.seq - 1);
    }
    const held = this.positions.get(peer);
    const buf = this.buffer.get(peer) ?? new Map();
    if ((held !== undefined && m.seq <= held) || buf.has(m.seq)) {
      this.stats.duplicates++;
      this.#remember(m.serverMsgId);
      return;
    }
    buf.set(m.seq, m);
    this.buffer.set(peer, buf);
    if (held === undefined) return; // unknown peer during the connect-time sync: decided at SYNC_DONE
    this.#drain(peer);
  }

  /** Hands over the peer's buffered messages that follow its position; asks for a gap. */
  #drain(peer) {
    const buf = this.buffer.get(peer);
    let pos = this.positions.get(peer) ?? 0;
    const before = pos;
    while (buf?.has(pos + 1)) {
      const m = buf.get(pos + 1);
      buf.delete(pos + 1);
      pos++;
      this.positions.set(peer, pos);
      this.#remember(m.serverMsgId);
      this.emit('message', m);
    }
    if (buf && buf.size === 0) this.buffer.delete(peer);
    if (pos > before) {
      this.touched.add(peer);
      this.#saveState();
      this.#scheduleAck(peer);
    }
    if (this.buffer.has(peer) && !this.syncing) this.#gapSync(peer);
  }

  #remember(id) {
    if (!id) return;
    this.seenIds.add(id);
    if (this.seenIds.size > this.opts.seenIdsMax) this.seenIds.delete(this.seenIds.values().next().value);
  }

  #onSyncDone(f) {
    if (f.peer != null) {
      const peer = String(f.peer);
      const g = this.gapSyncs.get(peer);
      if (g) g.inFlight = false;
      if (this.buffer.has(peer)) {
        // The missing message is not saved yet (or was pushed and lost): ask again, backing off.
        if (g) g.attempt++;
        this.#gapSync(peer);
      } else if (g) g.attempt = 0;
      return;
    }
    if (!this.syncing) return;
    this.syncing = false;
    for (const [peer, buf] of this.buffer) {
      if (!this.positions.has(peer)) this.positions.set(peer, Math.min(...buf.keys()) - 1);
    }
    for (const peer of [...this.buffer.keys()]) this.#drain(peer);
    this.attempt = 0;
    this.#setStatus({ state: 'online' });
    this.emit('synced', {});
    // RECEIPTs are only relayed to live connections: what the peers confirmed while we were away is
    // in the conversation list (positions are stored before receipts are relayed).
    const waiting = [...this.byClientId.values()].some((r) => r.flags.accepted && !r.flags.read && r.state !== 'failed');
    if (waiting && this.fetch) this.conversations({ limit: 200 }).catch(() => {});
  }

  #gapSync(peer) {
    const g = this.gapSyncs.get(peer) ?? { inFlight: false, attempt: 0, timer: null };
    this.gapSyncs.set(peer, g);
    if (g.inFlight || g.timer || !this.ready) return;
    const wait = g.attempt === 0 ? this.opts.gapWaitMs : backoffDelay(g.attempt, 250, 5000, this.random) + 100;
    g.timer = this.#later(wait, () => {
      g.timer = null;
      if (!this.buffer.has(peer) || !this.ready) return;
      g.inFlight = true;
      this.stats.gapSyncs++;
      this.#sendFrame({ type: 'SYNC', peer, afterSeq: this.positions.get(peer) ?? 0 });
    });
  }

  #scheduleAck(peer) {
    this.ackDirty.add(peer);
    if (this.ackTimer) return;
    this.ackTimer = setTimeout(() => {
      this.ackTimer = null;
      for (const p of this.ackDirty) this.#sendAck(p, false);
      this.ackDirty.clear();
    }, this.opts.ackDelayMs);
  }

  #sendAck(peer, again) {
    const seq = this.positions.get(peer) ?? 0;
    if (seq <= 0 || (!again && seq <= (this.ackedDelivered.get(peer) ?? 0))) return;
    if (this.#sendFrame({ type: 'ACK', ackType: 'delivered', from: peer, seq })) this.ackedDelivered.set(peer, seq);
  }

  // ---------------------------------------------------------------- HTTP

  async #api(path, params) {
    if (!this.fetch) throw new Error('no fetch');
    const token = await this.#token();
    const base = this.opts.httpUrl ?? httpBaseOf(this.urls[this.urlIndex % this.urls.length]);
    const q = Object.entries(params)
      .filter(([, v]) => v != null)
      .map(([k, v]) => `${k}=${encodeURIComponent(v)}`)
      .join('&');
    const r = await this.fetch(`${base}${path}${q ? '?' + q : ''}`, { headers: { Authorization: `Bearer ${token}` } });
    const body = await r.json().catch(() => ({}));
    if (!r.ok) {
      const e = new Error(`${path}: HTTP ${r.status} ${body.error ?? ''}`.trim());
      e.status = r.status;
      e.reason = body.error;
      throw e;
    }
    return body;
  }

  // ---------------------------------------------------------------- storage

  #key(name) {
    return `im:${this.uid}:${name}`;
  }

  #load() {
    try {
      const state = JSON.parse(this.storage.getItem(this.#key('positions')) ?? '{}');
      this.positions = new Map(Object.entries(state.positions ?? {}));
      this.readPos = new Map(Object.entries(state.read ?? {}));
      const outbox = JSON.parse(this.storage.getItem(this.#key('outbox')) ?? '[]');
      for (const o of outbox) {
        if (this.byClientId.has(o.clientMsgId)) continue;
        const rec = {
          ...o,
          state: o.flags?.accepted ? 'accepted' : 'sending',
          flags: { accepted: !!o.flags?.accepted, saved: false, delivered: false, read: false },
          seq: null,
          reason: null,
          sentOn: -1, // sent by an earlier session: resend
          answered: false,
          sentAt: 0,
          attempts: 0,
          retryAt: 0,
          restored: true,
        };
        this.#track(rec);
        this.outbox.push(rec);
      }
    } catch {
      // Unreadable storage: start empty (the server's positions take over).
    }
  }

  #saveState() {
    if (!this.uid || this.saveStateQueued) return;
    this.saveStateQueued = true;
    queueMicrotask(() => {
      this.saveStateQueued = false;
      const state = { positions: Object.fromEntries(this.positions), read: Object.fromEntries(this.readPos) };
      try {
        this.storage.setItem(this.#key('positions'), JSON.stringify(state));
      } catch {
        /* full or unavailable storage: positions stay in memory */
      }
    });
  }

  #saveOutbox() {
    if (!this.uid || this.saveOutboxQueued) return;
    this.saveOutboxQueued = true;
    queueMicrotask(() => {
      this.saveOutboxQueued = false;
      const slim = this.outbox.map((r) => ({
        clientMsgId: r.clientMsgId,
        to: r.to,
        body: r.body,
        msgType: r.msgType,
        serverMsgId: r.serverMsgId,
        ts: r.ts,
        createdAt: r.createdAt,
        flags: { accepted: r.flags.accepted },
      }));
      try {
        this.storage.setItem(this.#key('outbox'), JSON.stringify(slim));
      } catch {
        /* see #saveState */
      }
    });
  }
}

export default ImClient;

// The demo chat page: the reference client (im-client.js) with a conversation list, a chat view with
// every tick, history paging and the shard backlog. Everything it knows about the protocol is in the
// client; this file only draws. `window.demoTrace` records every tick as it is drawn, for the browser
// test (clients/js/test/browser.test.js) and for anyone curious in the console.
//
// Query parameters: `ws=<url>` connects to another gateway than the one serving the page.

import { ImClient, STATES, decodeToken, tokenExpired } from './im-client.js';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const wsUrl = params.get('ws') ?? `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws`;
const TICKS = { sending: '…', accepted: '✓', saved: '✓✓', delivered: '✓✓', read: '✓✓', failed: '✗' };
const SESSION_KEY = 'im-demo:token';

window.demoTrace = [];
let client = null;
let me = null;
let openPeer = null;
let olderBefore = null;
let serverInfo = null;
let listLoaded = Promise.resolve(); // the first conversation list: history ticks need the peers' positions
const convs = new Map(); // peer → {peer, lastSeqIn, read, preview, ts}
const shown = new Map(); // `${from}:${clientMsgId}` → <li> of the open chat

// ------------------------------------------------------------------ notices and status

function notice(text, kind = 'error') {
  const n = $('notice');
  n.hidden = !text;
  n.textContent = text ?? '';
  n.dataset.kind = kind;
}

function showStatus(s) {
  const conn = $('conn');
  conn.dataset.state = s.state;
  const secs = (ms) => `${Math.max(1, Math.round(ms / 1000))} s`;
  switch (s.state) {
    case 'connecting':
      conn.textContent = 'connecting…';
      break;
    case 'syncing':
      conn.textContent = 'catching up…';
      break;
    case 'online':
      conn.textContent = 'online';
      notice(null);
      refreshConversations();
      break;
    case 'offline':
      conn.textContent = `offline — retrying in ${secs(s.retryInMs)}`;
      notice(
        s.reason === 'server_unreachable'
          ? `Cannot reach the server at ${wsUrl}. Is the cluster running? Retrying in ${secs(s.retryInMs)}; messages you write meanwhile are sent when it is back.`
          : `The connection to the server was lost (${s.reason}${s.code ? `, code ${s.code}` : ''}). Reconnecting in ${secs(s.retryInMs)}; nothing you sent is lost.`,
      );
      break;
    case 'auth_failed':
      conn.textContent = 'signed out';
      signOut(
        s.reason === 'token_expired'
          ? 'Your token has expired. Sign in again to get a new one.'
          : s.reason === 'token_rejected'
            ? 'The server rejected your token (a bad signature, or a token for another cluster). Sign in again.'
            : `Could not get a token (${s.detail ?? s.reason}). Sign in again.`,
      );
      break;
    case 'closed':
      conn.textContent = 'signed out';
      break;
  }
}

// ------------------------------------------------------------------ sign in / out

async function loadServerInfo() {
  try {
    const r = await fetch('/demo/status');
    serverInfo = await r.json();
    $('signin-help').textContent = serverInfo.devTokens
      ? `Local cluster (${serverInfo.mode} mode, gateway ${serverInfo.node}): sign in as any user id; this gateway signs a development token for it. Open a second browser window as another user to chat.`
      : 'This gateway does not sign tokens (gateway.demo_dev_tokens is off, as in production): paste a token from your identity provider, or from `ops token --user <id>`.';
  } catch {
    serverInfo = null;
    $('signin-help').textContent = 'The gateway that served this page does not answer. Is the cluster running?';
  }
}

async function devToken(user) {
  let r;
  try {
    r = await fetch(`/demo/token?user=${encodeURIComponent(user)}`, { method: 'POST' });
  } catch {
    throw new Error('the gateway that served this page does not answer: is the cluster running?');
  }
  const body = await r.json().catch(() => ({}));
  if (r.status === 403) throw new Error('this gateway does not sign tokens (gateway.demo_dev_tokens is off): paste one');
  if (!r.ok) throw new Error(`the gateway refused (${body.error ?? r.status})`);
  return body.token;
}

async function signIn(event) {
  event?.preventDefault();
  const user = $('user').value.trim();
  let token = $('token').value.trim();
  notice(null);
  try {
    if (!token) token = await devToken(user);
  } catch (e) {
    return notice(`Cannot sign in: ${e.message}.`);
  }
  const claims = decodeToken(token);
  if (!claims) return notice('That is not a token (a JWT has three dot-separated parts).');
  if (user && claims.uid != null && String(claims.uid) !== user) {
    return notice(`That token is for user ${claims.uid}, not ${user}.`);
  }
  start(token);
}

function start(token) {
  if (tokenExpired(token)) {
    signOut('Your token has expired. Sign in again to get a new one.');
    return;
  }
  me = String(decodeToken(token)?.uid ?? '');
  sessionStorage.setItem(SESSION_KEY, token);
  client = new ImClient({ url: wsUrl, token, storage: window.localStorage });
  window.demoClient = client;
  client.on('status', showStatus);
  client.on('message', onMessage);
  client.on('state', onState);
  client.on('receipt', (r) => r.peer === openPeer && historyTicks());
  $('who').textContent = `signed in as user ${me}`;
  $('signin').hidden = true;
  $('app').hidden = false;
  $('signout').hidden = false;
  client.connect();
  listLoaded = refreshConversations();
  const peer = location.hash.slice(1);
  if (/^[0-9]+$/.test(peer)) openChat(peer);
}

function signOut(message) {
  client?.close();
  client = null;
  sessionStorage.removeItem(SESSION_KEY);
  $('app').hidden = true;
  $('signin').hidden = false;
  $('signout').hidden = true;
  $('who').textContent = '';
  if (me) $('user').value = me;
  $('token').value = '';
  openPeer = null;
  convs.clear();
  notice(message ?? null, message ? 'error' : 'info');
}

// ------------------------------------------------------------------ conversation list

function conv(peer) {
  if (!convs.has(peer)) convs.set(peer, { peer, lastSeqIn: 0, read: 0, preview: '', ts: 0 });
  return convs.get(peer);
}

function unread(c) {
  const last = Math.max(c.lastSeqIn, client?.position(c.peer) ?? 0);
  return Math.max(0, last - Math.max(c.read, client?.readPosition(c.peer) ?? 0));
}

async function refreshConversations() {
  if (!client) return;
  try {
    const list = await client.conversations({ limit: 100 });
    for (const c of list.conversations) {
      const mine = conv(c.peer);
      mine.lastSeqIn = Math.max(mine.lastSeqIn, c.lastSeqIn);
      mine.read = Math.max(mine.read, c.read);
      if ((c.lastMessage?.ts ?? 0) >= mine.ts) {
        mine.ts = c.lastMessage?.ts ?? 0;
        mine.preview = (c.lastMessage?.from === me ? 'you: ' : '') + (c.lastMessage?.preview ?? '');
      }
    }
    renderList();
    historyTicks();
  } catch (e) {
    if (e.status === 401) return showStatus({ state: 'auth_failed', reason: tokenExpired(client.token) ? 'token_expired' : 'token_rejected' });
    if (convs.size === 0) {
      const li = document.createElement('li');
      li.className = 'empty';
      li.textContent = `Could not load conversations (${e.message}); retrying when the connection is back.`;
      $('conversations').replaceChildren(li);
    }
  }
}

function renderList() {
  const ul = $('conversations');
  ul.textContent = '';
  const sorted = [...convs.values()].sort((a, b) => b.ts - a.ts);
  if (sorted.length === 0) ul.innerHTML = '<li class="empty">No conversations yet.</li>';
  for (const c of sorted) {
    const li = document.createElement('li');
    li.dataset.peer = c.peer;
    li.className = c.peer === openPeer ? 'open' : '';
    const n = unread(c);
    li.innerHTML = `<span class="peer"></span><span class="unread" data-unread="${n}">${n}</span><span class="preview"></span>`;
    li.querySelector('.peer').textContent = `user ${c.peer}`;
    li.querySelector('.preview').textContent = c.preview;
    li.onclick = () => openChat(c.peer);
    ul.append(li);
  }
}

// ------------------------------------------------------------------ chat view

async function openChat(peer) {
  peer = String(peer);
  if (!client || peer === me) return;
  openPeer = peer;
  location.hash = peer;
  conv(peer);
  shown.clear();
  $('list').textContent = '';
  $('chat-head').textContent = `user ${peer}`;
  $('text').disabled = $('send').disabled = false;
  $('text').focus();
  renderList();
  olderBefore = null;
  await listLoaded;
  if (peer !== openPeer) return;
  await loadHistory(peer);
  // Our messages still on their way (this session's, or restored from storage) after the saved ones.
  for (const rec of client.sent(peer)) drawOutgoing(rec, 'live');
  markRead();
}

async function loadHistory(peer, before) {
  let page;
  try {
    page = await client.history(peer, { before, limit: 30 });
  } catch (e) {
    notice(`Could not load the history (${e.message}).`);
    return;
  }
  if (peer !== openPeer) return;
  const list = $('list');
  const anchor = before ? list.firstChild : null;
  // Newest first from the server: insert each above the previous one.
  let above = anchor;
  for (const m of page.messages) {
    const key = `${m.from}:${m.clientMsgId}`;
    if (shown.has(key)) continue;
    const li = m.from === me ? messageElement(m, m.state) : messageElement(m);
    shown.set(key, li);
    list.insertBefore(li, above);
    above = li;
    if (m.from === me) trace(m.clientMsgId, m.body, m.state, 'history');
  }
  olderBefore = page.nextBefore ?? null;
  $('older').hidden = !olderBefore;
  if (!before && page.messages.length === 0 && list.children.length === 0) {
    list.innerHTML = '<li class="empty">No messages yet: say hello.</li>';
  }
  if (!before) $('messages').scrollTop = $('messages').scrollHeight;
}

/**
 * Moves the ticks of our messages drawn from history (no live record behind them) up to the peer's
 * positions, as the conversation list reports them — also what the peer confirmed while we were away.
 */
function historyTicks() {
  if (!client || !openPeer) return;
  const pos = client.peerPosition(openPeer);
  for (const li of $('list').querySelectorAll('li.msg.mine[data-seq]')) {
    const seq = Number(li.dataset.seq);
    const state = seq <= pos.read ? 'read' : seq <= pos.delivered ? 'delivered' : null;
    if (state && STATES.indexOf(state) > STATES.indexOf(li.dataset.state)) {
      setTick(li, state);
      trace(li.dataset.clientMsgId, li.querySelector('.body').textContent, state, 'history');
    }
  }
}

function messageElement(m, state) {
  const li = document.createElement('li');
  const mine = m.from === me;
  li.className = `msg ${mine ? 'mine' : 'theirs'}`;
  li.dataset.clientMsgId = m.clientMsgId;
  if (m.serverMsgId) li.dataset.serverMsgId = m.serverMsgId;
  if (m.seq != null) li.dataset.seq = m.seq;
  if (m.ts) li.dataset.ts = m.ts;
  const time = m.ts ? new Date(m.ts).toLocaleTimeString() : '';
  li.innerHTML = `<div class="body"></div><div class="meta"><time></time>${mine ? ' <span class="tick"></span><span class="tick-label"></span>' : ''}</div>`;
  li.querySelector('.body').textContent = m.body;
  li.querySelector('time').textContent = time;
  if (mine) setTick(li, state ?? 'sending');
  return li;
}

/**
 * Puts a message that arrived late (held up by a shard's outage, say) where its time says, not at
 * the bottom: above the messages accepted after it. Our own unsent ones stay last.
 */
function insertByTime(li) {
  const list = $('list');
  let after = list.lastElementChild;
  const ts = Number(li.dataset.ts);
  while (after && (after.dataset.ts === undefined ? after.classList.contains('mine') : Number(after.dataset.ts) > ts)) {
    after = after.previousElementSibling;
  }
  list.insertBefore(li, after ? after.nextSibling : list.firstChild);
}

function setTick(li, state, reason) {
  li.dataset.state = state;
  li.querySelector('.tick').textContent = TICKS[state] ?? '';
  li.querySelector('.tick-label').textContent = state === 'failed' ? `failed: ${reason}` : state;
}

function trace(clientMsgId, body, state, source) {
  window.demoTrace.push({ side: me, clientMsgId, body, state, source, at: Date.now() });
}

/** Draws (or updates) one of our messages in the open chat. */
function drawOutgoing(rec, source) {
  const key = `${me}:${rec.clientMsgId}`;
  let li = shown.get(key);
  if (!li) {
    $('list').querySelector('.empty')?.remove();
    li = messageElement({ ...rec, from: me }, rec.state);
    shown.set(key, li);
    $('list').append(li);
    $('messages').scrollTop = $('messages').scrollHeight;
    trace(rec.clientMsgId, rec.body, rec.state, source);
    return;
  }
  if (rec.serverMsgId) li.dataset.serverMsgId = rec.serverMsgId;
  if (rec.ts && !li.dataset.ts) {
    li.dataset.ts = rec.ts;
    li.querySelector('time').textContent = new Date(rec.ts).toLocaleTimeString();
  }
  // History may already show a later state than this record has seen (the peer's positions).
  if (rec.state !== 'failed' && STATES.indexOf(rec.state) <= STATES.indexOf(li.dataset.state)) return;
  setTick(li, rec.state, rec.reason);
  trace(rec.clientMsgId, rec.body, rec.state, source);
}

function onState({ message }) {
  const c = conv(message.to);
  if (message.state === 'sending') {
    c.preview = `you: ${message.body}`;
    c.ts = Date.now();
    renderList();
  }
  if (message.to === openPeer) drawOutgoing(message, 'live');
}

function onMessage(m) {
  const c = conv(m.from);
  c.lastSeqIn = Math.max(c.lastSeqIn, m.seq ?? 0);
  c.preview = m.body;
  c.ts = m.ts ?? Date.now();
  if (m.from === openPeer) {
    const key = `${m.from}:${m.clientMsgId}`;
    if (!shown.has(key)) {
      $('list').querySelector('.empty')?.remove();
      const li = messageElement(m);
      shown.set(key, li);
      insertByTime(li);
      $('messages').scrollTop = $('messages').scrollHeight;
    }
    markRead();
  }
  renderList();
}

function markRead() {
  if (!client || !openPeer || document.visibilityState === 'hidden') return;
  client.markRead(openPeer);
  const c = convs.get(openPeer);
  if (c) c.read = Math.max(c.read, client.readPosition(openPeer));
  renderList();
}

// ------------------------------------------------------------------ backlog panel

async function pollBacklog() {
  try {
    const r = await fetch('/demo/status', { cache: 'no-store' });
    const s = await r.json();
    const max = Math.max(10, ...s.shards.map((x) => x.backlog));
    $('shards').innerHTML = s.shards
      .map(
        (x) =>
          `<div class="shard" data-shard="${x.shard}"><span>shard ${x.shard}</span><span class="bar"><i style="width:${(100 * x.backlog) / max}%"></i></span><b>${x.backlog}</b></div>`,
      )
      .join('');
    $('backlog-state').textContent = `${s.mode} mode · gateway ${s.node} · unsaved entries per shard (accepted + to_save); server_busy at ${s.maxBacklog}`;
  } catch {
    $('backlog-state').textContent = 'backlog: the gateway that served this page does not answer';
  }
}

// ------------------------------------------------------------------ wiring

$('signin-form').addEventListener('submit', signIn);
$('signout').addEventListener('click', () => signOut());
$('new-chat').addEventListener('submit', (e) => {
  e.preventDefault();
  const peer = $('peer-input').value.trim();
  if (/^[0-9]+$/.test(peer)) openChat(peer);
  $('peer-input').value = '';
});
$('composer').addEventListener('submit', (e) => {
  e.preventDefault();
  const text = $('text').value;
  if (!text.trim() || !openPeer || !client) return;
  client.send(openPeer, text);
  $('text').value = '';
});
$('older').addEventListener('click', () => openPeer && olderBefore && loadHistory(openPeer, olderBefore));
document.addEventListener('visibilitychange', markRead);

await loadServerInfo();
window.demoReady = true;
const saved = sessionStorage.getItem(SESSION_KEY);
if (saved) start(saved);
else {
  $('conn').textContent = 'signed out';
  $('user').focus();
}
setInterval(pollBacklog, 500);
pollBacklog();

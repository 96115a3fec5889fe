// The PeerNet protocol client (shared/protocol.md, version 1.1), the one module that speaks it:
// msgpack frames over /v1/ws, hello with `resume`, reconnects with backoff, duplicate inbox
// items dropped by id, `ping` frames on the announced heartbeat, cumulative `ack`s, and a
// connection state the UI can show. Requests made while disconnected wait in an outbox. The
// HTTP reads (following, followers, presence, history) go through `get` with the same token.
import { decode, encode } from "@msgpack/msgpack";

export type Frame = { t: string; rid?: number | string; [field: string]: unknown };

export type ConnectionState = "connecting" | "online" | "reconnecting" | "offline" | "stopped";

/** User ids, as the protocol defines them. */
export const USER_ID = /^[a-z0-9_]{1,32}$/;
/** The longest `body` of a post or message, in characters (code points, as the server counts). */
export const MAX_BODY_CHARS = 4000;
/** Group titles: 1 to 100 characters. */
export const MAX_TITLE_CHARS = 100;

export function bodyLength(text: string): number {
  return [...text].length;
}

/** The conversation of two users: `dm:a:b` with a < b. */
export function dmConv(a: string, b: string): string {
  return a < b ? `dm:${a}:${b}` : `dm:${b}:${a}`;
}

export function isGroupConv(conv: string): boolean {
  return conv.startsWith("g:");
}

/** The other participant of a `dm:a:b` conversation. */
export function dmPeer(conv: string, me: string): string {
  const [, a, b] = conv.split(":");
  return a === me ? b : a;
}

/** `liked` comes with feed pages (version 1.1), not with the `feed` push. */
export interface Post { id: string; author: string; body: string; ts: number; likes: number; liked?: boolean }

/** A message as history gives it: the `msg` item without `t` and `seq`; a group's has no `to`. */
export interface StoredMsg { id: string; conv: string; from: string; to?: string; body: string; ts: number }

export interface Msg extends StoredMsg { t: "msg"; seq: number }

export interface Note {
  t: "note"; seq: number; id: string; kind: string; from: string; ts: number; post?: string;
  /** kind `group`: the group, its title and owner, and its members after the change ([] for a
   * user it took out); `change` is the server's addition (create, add, remove, leave). */
  conv?: string; title?: string; owner?: string; members?: string[]; change?: string;
}

/** A conversation as `GET /v1/conversations` lists it (protocol 1.1): `unread` my messages
 * from others after my marker, `read` every member's marker. */
export interface ConversationSummary {
  conv: string; kind: "dm" | "group"; title: string | null; owner: string | null; members: string[];
  last: StoredMsg | null; unread: number; read: Record<string, string>;
}

/** A `read` push: `user`'s read marker in `conv` moved to message `id`. */
export interface ReadReceipt { conv: string; user: string; id: string; ts: number }

export interface Page<T> { items: T[]; next: string | null }

export type InboxItem = Msg | Note;

export class RequestError extends Error {
  constructor(readonly code: string, message: string) {
    super(message);
  }
}

interface Events {
  state: ConnectionState;
  /** An inbox item never seen before, in seq order. `live` is false while a resume replays. */
  item: { item: InboxItem; live: boolean };
  /** A push that is neither a reply nor an inbox item: feed, typing, presence. */
  push: Frame;
  /** Connected and caught up (after `resumed`): watches and pages are (re)loaded here. */
  ready: { first: boolean; welcome: Frame };
  /** An error frame without a pending request. */
  error: Frame;
}

interface Pending {
  frame: Frame;
  retry: boolean;
  sent: boolean;
  attempts: number;
  resolve: (reply: Frame) => void;
  reject: (err: Error) => void;
}

export interface ClientOptions {
  /** http(s) origin of the Serve ingress; the WebSocket is its /v1/ws. */
  baseUrl: string;
  user: string;
  /** Replay the retained inbox on the first connection (resume from 0): history and notes. */
  history?: boolean;
}

const MAX_BACKOFF_MS = 15_000;
const SEEN_IDS = 20_000;
const ACK_DELAY_MS = 250;

function isInboxItem(f: Frame): f is Frame & InboxItem {
  return (f.t === "msg" || f.t === "note") && typeof f.seq === "number" && typeof f.id === "string";
}

export async function devToken(baseUrl: string, user: string): Promise<string> {
  const reply = await fetch(`${baseUrl}/v1/dev/token`, {
    method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ user }),
  });
  const body = await reply.json().catch(() => ({}));
  if (!reply.ok || typeof body.token !== "string") {
    throw new RequestError(body?.error?.code ?? "unavailable",
      body?.error?.message ?? `token request failed (${reply.status})`);
  }
  return body.token;
}

export class PeerNetClient {
  readonly user: string;
  state: ConnectionState = "connecting";
  /** Newest inbox seq seen: the `resume` of the next hello. */
  lastSeq = 0;
  /** Milliseconds until the next reconnect attempt is made (while reconnecting). */
  retryAt = 0;

  private readonly baseUrl: string;
  private readonly history: boolean;
  private ws: WebSocket | null = null;
  private token: string | null = null;
  private ready = false;
  private everReady = false;
  private replaying = false;
  private attempt = 0;
  private nextRid = 1;
  private ackedSeq = 0;
  private heartbeatMs = 25_000;
  private readonly pending = new Map<number, Pending>();
  private readonly seen = new Set<string>();
  private readonly seenOrder: string[] = [];
  private readonly listeners = new Map<keyof Events, Set<(value: never) => void>>();
  private timers: { reconnect?: number; ping?: number; watchdog?: number; ack?: number } = {};
  private lastHeard = 0;
  private welcome: Frame | null = null;

  constructor(opts: ClientOptions) {
    this.baseUrl = opts.baseUrl.replace(/\/$/, "");
    this.user = opts.user;
    this.history = opts.history ?? true;
    window.addEventListener("online", this.onOnline);
    window.addEventListener("offline", this.onOffline);
  }

  on<K extends keyof Events>(event: K, fn: (value: Events[K]) => void): () => void {
    let set = this.listeners.get(event);
    if (!set) this.listeners.set(event, (set = new Set()));
    set.add(fn as (value: never) => void);
    return () => set.delete(fn as (value: never) => void);
  }

  start(): void {
    this.connect();
  }

  stop(): void {
    this.setState("stopped");
    window.removeEventListener("online", this.onOnline);
    window.removeEventListener("offline", this.onOffline);
    this.drop(false);
    for (const p of this.pending.values()) p.reject(new RequestError("stopped", "signed out"));
    this.pending.clear();
  }

  /**
   * A GET of the HTTP API with this user's token: the parsed JSON, or a RequestError with the
   * protocol's code (a refused token is fetched again once).
   */
  async get<T>(path: string): Promise<T> {
    for (let attempt = 0; ; attempt++) {
      this.token ??= await devToken(this.baseUrl, this.user);
      const reply = await fetch(this.baseUrl + path, { headers: { authorization: `Bearer ${this.token}` } });
      if (reply.status === 401 && attempt === 0) {
        this.token = null;
        continue;
      }
      const body = await reply.json().catch(() => ({}));
      if (!reply.ok) {
        throw new RequestError(body?.error?.code ?? (reply.status === 404 ? "not_found" : "unavailable"),
          body?.error?.message ?? `${path}: ${reply.status}`);
      }
      return body as T;
    }
  }

  /** Every page of a paged list (following, followers), up to `max` items. */
  async getAll<T>(path: string, max = 5_000): Promise<T[]> {
    const items: T[] = [];
    let before: string | null = null;
    do {
      const sep = path.includes("?") ? "&" : "?";
      const cursor: string = before === null ? "" : `&before=${encodeURIComponent(before)}`;
      const page: Page<T> = await this.get<Page<T>>(`${path}${sep}limit=100${cursor}`);
      items.push(...page.items);
      before = page.next;
    } while (before !== null && items.length < max);
    return items;
  }

  /**
   * Send a request and wait for its reply (`ok`, `feed_page`, `presence_state`...). With `retry`
   * (idempotent requests: dm with a cid, follow, like, feed, watch) a request cut off by a
   * disconnect, or refused as `unavailable`, is sent again; without it, it fails instead.
   */
  request(frame: Frame, { retry = true } = {}): Promise<Frame> {
    const rid = this.nextRid++;
    return new Promise((resolve, reject) => {
      if (this.state === "stopped") return reject(new RequestError("stopped", "signed out"));
      const p: Pending = { frame: { ...frame, rid }, retry, sent: false, attempts: 0, resolve, reject };
      this.pending.set(rid, p);
      if (this.ready) this.transmit(p);
    });
  }

  /** Fire and forget (typing): dropped when not connected. */
  send(frame: Frame): void {
    if (this.ready) this.write(frame);
  }

  // --- connection -------------------------------------------------------------------------

  private readonly onOnline = () => {
    if (this.state === "stopped") return;
    this.attempt = 0;
    this.scheduleReconnect(0);
  };

  private readonly onOffline = () => {
    if (this.state === "stopped") return;
    this.drop(false);
    this.setState("offline");
  };

  private setState(state: ConnectionState): void {
    if (this.state === state) return;
    this.state = state;
    this.emit("state", state);
  }

  private async connect(): Promise<void> {
    if (this.state === "stopped") return;
    clearTimeout(this.timers.reconnect);
    if (!navigator.onLine) {
      this.setState("offline");
      return;
    }
    this.setState(this.everReady ? "reconnecting" : "connecting");
    try {
      this.token ??= await devToken(this.baseUrl, this.user);
    } catch (err) {
      if (err instanceof RequestError && err.code === "bad_request") {
        this.emit("error", { t: "error", code: err.code, message: err.message });
        this.stop();
        return;
      }
      this.scheduleReconnect();
      return;
    }
    // The await above may have outlived a sign-out or raced another connect.
    if ((this.state as ConnectionState) === "stopped" || this.ws) return;
    const ws = new WebSocket(this.baseUrl.replace(/^http/, "ws") + "/v1/ws");
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    ws.onopen = () => {
      const resume = this.everReady || this.history ? { resume: this.lastSeq } : {};
      this.replaying = "resume" in resume;
      this.write({ t: "hello", token: this.token, ...resume });
    };
    ws.onmessage = (ev) => this.onFrame(ev.data);
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      if (ev.code === 4401) this.token = null; // expired or refused: fetch a new one
      this.drop(true);
    };
    ws.onerror = () => undefined; // onclose follows
  }

  /** Forget the socket; in-flight requests are queued again (retry) or failed. */
  private drop(reconnect: boolean): void {
    const ws = this.ws;
    this.ws = null;
    this.ready = false;
    this.replaying = false;
    clearInterval(this.timers.ping);
    clearInterval(this.timers.watchdog);
    clearTimeout(this.timers.ack);
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      try { ws.close(1000); } catch { /* already closed */ }
    }
    for (const [rid, p] of this.pending) {
      if (!p.sent) continue;
      if (p.retry) {
        p.sent = false;
      } else {
        this.pending.delete(rid);
        p.reject(new RequestError("disconnected", "the connection dropped before the reply"));
      }
    }
    if (reconnect && this.state !== "stopped" && this.state !== "offline") this.scheduleReconnect();
  }

  private scheduleReconnect(delay?: number): void {
    if (this.state === "stopped") return;
    clearTimeout(this.timers.reconnect);
    const backoff = delay ?? Math.min(MAX_BACKOFF_MS, 400 * 2 ** this.attempt) * (0.5 + Math.random() / 2);
    this.attempt += 1;
    this.retryAt = Date.now() + backoff;
    if (this.state !== "offline") this.setState(this.everReady ? "reconnecting" : "connecting");
    this.timers.reconnect = window.setTimeout(() => void this.connect(), backoff);
  }

  private write(frame: Frame): void {
    if (this.ws?.readyState === WebSocket.OPEN) this.ws.send(encode(frame));
  }

  private transmit(p: Pending): void {
    p.sent = true;
    p.attempts += 1;
    this.write(p.frame);
  }

  // --- frames -----------------------------------------------------------------------------

  private onFrame(data: unknown): void {
    let frame: Frame;
    try {
      frame = decode(new Uint8Array(data as ArrayBuffer)) as Frame;
    } catch {
      return;
    }
    this.lastHeard = Date.now();
    if (frame.t === "welcome") return this.onWelcome(frame);
    if (frame.t === "resumed") return this.onSynced(frame);
    if (isInboxItem(frame)) return this.onItem(frame);
    if (typeof frame.rid === "number" && this.pending.has(frame.rid)) return this.onReply(frame.rid, frame);
    if (frame.t === "pong") return;
    if (frame.t === "error") return this.emit("error", frame);
    this.emit("push", frame);
  }

  private onWelcome(frame: Frame): void {
    this.heartbeatMs = Number(frame.heartbeat) || 25_000;
    this.attempt = 0;
    // Browsers cannot send WebSocket pings and the server closes a connection silent for 2 x
    // heartbeat: a ping frame every half heartbeat, and a watchdog for a network that died
    // without a close (no frame at all, pongs included, for one heartbeat).
    this.timers.ping = window.setInterval(() => this.write({ t: "ping", rid: `hb${Date.now()}` }),
      this.heartbeatMs / 2);
    this.lastHeard = Date.now();
    this.timers.watchdog = window.setInterval(() => {
      if (Date.now() - this.lastHeard > this.heartbeatMs) this.drop(true);
    }, Math.min(2_000, this.heartbeatMs / 4));
    if (!this.replaying) this.onSynced(frame);
    else this.welcome = frame;
  }

  private onSynced(frame: Frame): void {
    const welcome = frame.t === "welcome" ? frame : this.welcome ?? frame;
    this.replaying = false;
    this.ready = true;
    const first = !this.everReady;
    this.everReady = true;
    this.setState("online");
    this.emit("ready", { first, welcome });
    for (const p of [...this.pending.values()].filter((q) => !q.sent)) this.transmit(p);
    this.scheduleAck();
  }

  private onItem(item: InboxItem): void {
    if (item.seq > this.lastSeq) this.lastSeq = item.seq;
    if (this.seen.has(item.id)) return;
    this.seen.add(item.id);
    this.seenOrder.push(item.id);
    if (this.seenOrder.length > SEEN_IDS) this.seen.delete(this.seenOrder.shift()!);
    this.emit("item", { item, live: !this.replaying });
    this.scheduleAck();
  }

  private onReply(rid: number, frame: Frame): void {
    const p = this.pending.get(rid)!;
    if (frame.t === "error") {
      const code = String(frame.code);
      if (p.retry && code === "unavailable" && p.attempts < 5) {
        p.sent = false;
        window.setTimeout(() => { if (this.ready && !p.sent && this.pending.has(rid)) this.transmit(p); },
          500 * p.attempts);
        return;
      }
      this.pending.delete(rid);
      p.reject(new RequestError(code, String(frame.message ?? code)));
      return;
    }
    this.pending.delete(rid);
    p.resolve(frame);
  }

  /** Cumulative ack of everything handed to the app, a moment after it settles. */
  private scheduleAck(): void {
    clearTimeout(this.timers.ack);
    this.timers.ack = window.setTimeout(() => {
      if (this.ready && this.lastSeq > this.ackedSeq) {
        this.write({ t: "ack", seq: this.lastSeq });
        this.ackedSeq = this.lastSeq;
      }
    }, ACK_DELAY_MS);
  }

  private emit<K extends keyof Events>(event: K, value: Events[K]): void {
    for (const fn of this.listeners.get(event) ?? []) {
      try {
        (fn as (v: Events[K]) => void)(value);
      } catch (err) {
        console.error(`peernet: a ${event} listener failed`, err);
      }
    }
  }
}

// What the screens show, kept from the client's events: feed, people, presence, conversations,
// notes. Immutable snapshots for React's useSyncExternalStore; the few things the protocol
// cannot tell a client (whom I follow, what I liked, which notes I read) live in localStorage.
import { useSyncExternalStore } from "react";
import {
  type ConnectionState, type Frame, type InboxItem, type Msg, type Note, type Post, PeerNetClient,
} from "./peernet";

export type Tick = "pending" | "sent" | "delivered" | "failed";

export interface ChatLine {
  key: string; id?: string; from: string; to: string; body: string; ts: number; status: Tick; seq?: number;
}

export interface Presence { status: "online" | "offline"; since: number }

export interface State {
  me: string;
  conn: ConnectionState;
  retryAt: number;
  posts: Post[];
  liked: Record<string, true>;
  following: Record<string, true>;
  people: string[];
  presence: Record<string, Presence>;
  convs: Record<string, ChatLine[]>;
  typing: Record<string, number>;
  notes: Note[];
  notesReadSeq: number;
  error: string | null;
}

export function convOf(a: string, b: string): string {
  return a < b ? `dm:${a}:${b}` : `dm:${b}:${a}`;
}

export function peerOf(conv: string, me: string): string {
  const [, a, b] = conv.split(":");
  return a === me ? b : a;
}

const TYPING_SENT_EVERY_MS = 2_000;
const TYPING_SHOWN_MS = 4_000;

export class Social {
  readonly client: PeerNetClient;
  private state: State;
  private readonly subs = new Set<() => void>();
  private readonly unsubscribe: Array<() => void> = [];
  private typingSentAt: Record<string, number> = {};
  private typingTimer?: number;

  constructor(baseUrl: string, me: string) {
    this.client = new PeerNetClient({ baseUrl, user: me });
    this.state = {
      me, conn: "connecting", retryAt: 0, posts: [], presence: {}, convs: {}, typing: {}, notes: [],
      liked: this.load("liked", {}), following: this.load("following", {}),
      people: this.load("people", []), notesReadSeq: this.load("notesReadSeq", 0), error: null,
    };
    const c = this.client;
    this.unsubscribe.push(
      // Presence seen through a dead connection is stale: unknown until the next watch answers.
      c.on("state", (conn) => this.set(conn === "online" ? { conn, retryAt: c.retryAt }
        : { conn, retryAt: c.retryAt, presence: {} })),
      c.on("ready", () => this.onReady()),
      c.on("item", ({ item, live }) => this.onItem(item, live)),
      c.on("push", (frame) => this.onPush(frame)),
      c.on("error", (frame) => this.set({ error: String(frame.message ?? frame.code) })),
    );
    c.start();
  }

  // --- React ------------------------------------------------------------------------------

  subscribe = (fn: () => void) => {
    this.subs.add(fn);
    return () => this.subs.delete(fn);
  };

  snapshot = () => this.state;

  stop(): void {
    this.unsubscribe.forEach((u) => u());
    clearTimeout(this.typingTimer);
    this.client.stop();
  }

  private set(patch: Partial<State>): void {
    this.state = { ...this.state, ...patch };
    this.subs.forEach((fn) => fn());
  }

  private key(name: string): string {
    return `peernet:${this.state?.me ?? this.client.user}:${name}`;
  }

  private load<T>(name: string, fallback: T): T {
    try {
      const raw = localStorage.getItem(`peernet:${this.client.user}:${name}`);
      return raw === null ? fallback : (JSON.parse(raw) as T);
    } catch {
      return fallback;
    }
  }

  private save(name: string, value: unknown): void {
    try {
      localStorage.setItem(this.key(name), JSON.stringify(value));
    } catch { /* private mode: kept in memory only */ }
  }

  // --- events -----------------------------------------------------------------------------

  private async onReady(): Promise<void> {
    const people = this.state.people;
    if (people.length) void this.watch(people);
    try {
      const page = await this.client.request({ t: "feed", limit: 50 });
      this.mergePosts(page.items as Post[], true);
    } catch { /* the next ready reloads it */ }
  }

  private onItem(item: InboxItem, live: boolean): void {
    if (item.t === "msg") return this.onMsg(item);
    const notes = [item, ...this.state.notes].sort((a, b) => b.seq - a.seq);
    this.set({ notes });
    this.know(item.from);
    if (live && item.kind === "like" && item.post) {
      this.set({ posts: this.state.posts.map((p) => (p.id === item.post ? { ...p, likes: p.likes + 1 } : p)) });
    }
  }

  private onMsg(m: Msg): void {
    const me = this.state.me;
    const lines = [...(this.state.convs[m.conv] ?? [])];
    const mine = lines.findIndex((l) => l.id === m.id);
    // The line keeps its key (the cid of my own send) so that it does not blink when delivered.
    const line: ChatLine = { key: mine >= 0 ? lines[mine].key : m.id, id: m.id, from: m.from, to: m.to,
      body: m.body, ts: m.ts, status: "delivered", seq: m.seq };
    if (mine >= 0) lines.splice(mine, 1);
    // Delivered lines in inbox order, then the ones still on their way.
    const firstUndelivered = lines.findIndex((l) => l.status !== "delivered");
    lines.splice(firstUndelivered < 0 ? lines.length : firstUndelivered, 0, line);
    const typing = { ...this.state.typing };
    if (m.from !== me) delete typing[m.from];
    this.set({ convs: { ...this.state.convs, [m.conv]: lines }, typing });
    this.know(m.from === me ? m.to : m.from);
  }

  private onPush(frame: Frame): void {
    switch (frame.t) {
      case "feed":
        this.mergePosts([frame.item as Post], false);
        return;
      case "typing": {
        const from = String(frame.from);
        this.set({ typing: { ...this.state.typing, [from]: Date.now() + TYPING_SHOWN_MS } });
        clearTimeout(this.typingTimer);
        this.typingTimer = window.setTimeout(() => this.expireTyping(), TYPING_SHOWN_MS + 50);
        return;
      }
      case "presence":
        this.set({ presence: { ...this.state.presence,
          [String(frame.user)]: { status: frame.status as Presence["status"], since: Number(frame.ts) } } });
        return;
    }
  }

  private expireTyping(): void {
    const now = Date.now();
    const typing = Object.fromEntries(Object.entries(this.state.typing).filter(([, until]) => until > now));
    this.set({ typing });
    if (Object.keys(typing).length) {
      this.typingTimer = window.setTimeout(() => this.expireTyping(), 500);
    }
  }

  private mergePosts(items: Post[], authoritative: boolean): void {
    const byId = new Map(this.state.posts.map((p) => [p.id, p]));
    for (const p of items) {
      const had = byId.get(p.id);
      // A feed push carries likes 0; a page carries the count.
      byId.set(p.id, had && !authoritative ? { ...p, likes: had.likes } : p);
      this.know(p.author);
    }
    const posts = [...byId.values()].sort((a, b) => b.ts - a.ts || (a.id < b.id ? 1 : -1));
    this.set({ posts });
  }

  /** Remember a user id seen anywhere, and watch its presence. */
  private know(user: string): void {
    if (user === this.state.me || this.state.people.includes(user)) return;
    const people = [...this.state.people, user];
    this.set({ people });
    this.save("people", people);
    void this.watch([user]);
  }

  private async watch(users: string[]): Promise<void> {
    try {
      const reply = await this.client.request({ t: "watch", users: users.slice(0, 1000) });
      const states = reply.users as Record<string, Presence>;
      this.set({ presence: { ...this.state.presence, ...states } });
    } catch { /* watched again on the next connection */ }
  }

  // --- actions ----------------------------------------------------------------------------

  async follow(user: string, on = true): Promise<void> {
    this.know(user);
    const following = { ...this.state.following };
    if (on) following[user] = true;
    else delete following[user];
    this.set({ following });
    this.save("following", following);
    try {
      await this.client.request({ t: on ? "follow" : "unfollow", user });
      if (on) void this.onReady(); // the follow backfills their posts into my feed
    } catch (err) {
      this.set({ error: String((err as Error).message) });
    }
  }

  async post(body: string): Promise<void> {
    // Not idempotent in the protocol (no cid): never retried, the caller keeps the draft.
    const ok = await this.client.request({ t: "post", body }, { retry: false });
    const post: Post = { id: String(ok.id), author: this.state.me, body, ts: Number(ok.ts), likes: 0 };
    this.mergePosts([post], false);
  }

  async like(post: Post): Promise<void> {
    const on = !this.state.liked[post.id];
    const liked = { ...this.state.liked };
    if (on) liked[post.id] = true;
    else delete liked[post.id];
    const delta = on ? 1 : -1;
    this.set({ liked, posts: this.state.posts.map((p) =>
      (p.id === post.id ? { ...p, likes: Math.max(0, p.likes + delta) } : p)) });
    this.save("liked", liked);
    try {
      await this.client.request({ t: on ? "like" : "unlike", post: post.id });
    } catch (err) {
      this.set({ error: String((err as Error).message) });
    }
  }

  async sendDm(to: string, body: string): Promise<void> {
    const me = this.state.me;
    const conv = convOf(me, to);
    const cid = `${me}-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`;
    const line: ChatLine = { key: cid, from: me, to, body, ts: Date.now(), status: "pending" };
    this.patchConv(conv, (lines) => [...lines, line]);
    this.know(to);
    delete this.typingSentAt[to];
    try {
      // Retried with the same cid after a drop: the server stores and delivers it once.
      const ok = await this.client.request({ t: "dm", to, body, cid });
      const id = String(ok.id);
      this.patchConv(conv, (lines) => (lines.some((l) => l.id === id)
        ? lines.filter((l) => l.key !== cid) // its inbox copy came first: already delivered
        : lines.map((l) => (l.key === cid ? { ...l, id, ts: Number(ok.ts), status: "sent" } : l))));
    } catch (err) {
      this.patchConv(conv, (lines) => lines.map((l) => (l.key === cid ? { ...l, status: "failed" } : l)));
      this.set({ error: String((err as Error).message) });
    }
  }

  typing(to: string): void {
    const now = Date.now();
    if (now - (this.typingSentAt[to] ?? 0) < TYPING_SENT_EVERY_MS) return;
    this.typingSentAt[to] = now;
    this.client.send({ t: "typing", to });
  }

  markNotesRead(): void {
    const top = this.state.notes[0]?.seq ?? 0;
    if (top <= this.state.notesReadSeq) return;
    this.set({ notesReadSeq: top });
    this.save("notesReadSeq", top);
  }

  clearError(): void {
    this.set({ error: null });
  }

  private patchConv(conv: string, fn: (lines: ChatLine[]) => ChatLine[]): void {
    this.set({ convs: { ...this.state.convs, [conv]: fn(this.state.convs[conv] ?? []) } });
  }
}

export function useSocial(social: Social): State {
  return useSyncExternalStore(social.subscribe, social.snapshot);
}

// What the screens show, kept from the client's events and the server's reads: feed, the social
// graph, presence, conversations, notes, drafts. Immutable snapshots for React's
// useSyncExternalStore. Server truth (follows, likes, membership, read markers) is always read
// from the server, so every device of a user shows the same; the browser keeps drafts only.
import { useSyncExternalStore } from "react";
import {
  type ConnectionState, type ConversationSummary, type Frame, type InboxItem, type Msg, type Note, type Page,
  type Post, type ReadReceipt, type StoredMsg, PeerNetClient, RequestError, dmConv, dmPeer, isGroupConv,
} from "./peernet";
import {
  type Conversation, type MsgLine, emptyConversation, groupChangeText, hasMessage, lastMessage,
  withGroupNote, withLine, withMessage, withReadMarker, withSummary,
} from "./conversations";
import { UserStorage } from "./storage";

export interface Presence { status: "online" | "offline"; since: number }

/** A note as the Notes tab shows it: a group note with its change in words, and `quiet` when
 * it did not add or remove me (the chat shows it; the Notes tab does not count it as unread). */
export interface NoteView extends Note { text?: string; quiet?: boolean }

export interface State {
  me: string;
  conn: ConnectionState;
  retryAt: number;
  posts: Post[];
  liked: Record<string, boolean>;
  following: Record<string, true>;
  followers: Record<string, true>;
  presence: Record<string, Presence>;
  convs: Record<string, Conversation>;
  /** conv -> user -> until when "typing…" shows. */
  typing: Record<string, Record<string, number>>;
  notes: NoteView[];
  notesReadSeq: number;
  /** Half-written texts: "post", or a conversation's id. */
  drafts: Record<string, string>;
  error: string | null;
}

/** What I know of someone's presence: unknown while my own connection is down. */
export function presenceOf(s: State, user: string): "online" | "offline" | "unknown" {
  if (s.conn !== "online") return "unknown";
  return s.presence[user]?.status ?? "unknown";
}

/** Everyone the screens know of: whom I follow, my followers, the people I talk with. */
export function peopleOf(s: State): string[] {
  const all = new Set([...Object.keys(s.following), ...Object.keys(s.followers)]);
  for (const c of Object.values(s.convs)) {
    if (!c.group && c.lines.length) all.add(c.title);
  }
  for (const n of s.notes) if (n.kind !== "group") all.add(n.from);
  all.delete(s.me);
  return [...all].sort();
}

const TYPING_SENT_EVERY_MS = 2_000;
const TYPING_SHOWN_MS = 4_000;
const FEED_PAGE = 50;
const MAX_WATCH = 1_000;

function cid(me: string): string {
  return `${me}-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`;
}

export class Social {
  readonly client: PeerNetClient;
  private state: State;
  private readonly storage: UserStorage;
  private readonly subs = new Set<() => void>();
  private readonly unsubscribe: Array<() => void> = [];
  private readonly watched = new Set<string>();
  private typingSentAt: Record<string, number> = {};
  private timers: { typing?: number; feed?: number; drafts?: number } = {};
  private viewing: string | null = null;
  /** False once the server answers `read` with unknown_type (read markers not built there). */
  private readSupported = true;
  /** False once `GET /v1/conversations` is a 404 (a server without the conversation list). */
  private listSupported = true;
  private stopped = false;
  private notifying = false;

  constructor(baseUrl: string, me: string) {
    this.client = new PeerNetClient({ baseUrl, user: me });
    this.storage = new UserStorage(me);
    this.state = {
      me, conn: "connecting", retryAt: 0, posts: [], liked: {}, following: {}, followers: {}, presence: {},
      convs: {}, typing: {}, notes: [], error: null,
      notesReadSeq: this.storage.load("notesReadSeq", 0), drafts: this.storage.load("drafts", {}),
    };
    const c = this.client;
    this.unsubscribe.push(
      // Presence seen through a dead connection is stale: unknown until the next watch answers.
      c.on("state", (conn) => this.set(conn === "online" ? { conn, retryAt: c.retryAt }
        : { conn, retryAt: c.retryAt, presence: {} })),
      c.on("ready", () => void this.onReady()),
      c.on("item", ({ item, live }) => this.onItem(item, live)),
      c.on("push", (frame) => this.onPush(frame)),
      c.on("error", (frame) => this.set({ error: String(frame.message ?? frame.code) })),
    );
    // What arrived in the open conversation while the page was hidden is read when it shows.
    const onVisible = () => { if (this.viewing) this.markRead(this.viewing); };
    document.addEventListener("visibilitychange", onVisible);
    this.unsubscribe.push(() => document.removeEventListener("visibilitychange", onVisible));
    c.start();
  }

  // --- React ------------------------------------------------------------------------------

  subscribe = (fn: () => void) => {
    this.subs.add(fn);
    return () => this.subs.delete(fn);
  };

  snapshot = () => this.state;

  stop(): void {
    if (this.stopped) return;
    this.stopped = true;
    this.unsubscribe.forEach((u) => u());
    Object.values(this.timers).forEach((t) => clearTimeout(t));
    this.saveDrafts();
    this.client.stop();
  }

  /** Stop, and leave nothing of this user in the browser. */
  signOut(): void {
    this.stop();
    this.storage.clear();
  }

  /** The state changes at once; the screens hear of it once a frame, so that a resume of
   * thousands of inbox items is one render per frame, not one per item. */
  private set(patch: Partial<State>): void {
    this.state = { ...this.state, ...patch };
    if (this.notifying) return;
    this.notifying = true;
    const notify = () => {
      if (!this.notifying) return;
      this.notifying = false;
      this.subs.forEach((fn) => fn());
    };
    // A hidden page gets no animation frames: the timer covers it.
    requestAnimationFrame(notify);
    window.setTimeout(notify, 100);
  }

  private fail(err: unknown): void {
    this.set({ error: err instanceof Error ? err.message : String(err) });
  }

  // --- loading from the server ------------------------------------------------------------

  private async onReady(): Promise<void> {
    this.watched.clear();
    void this.watch(this.knownUsers());
    await Promise.all([this.refreshFeed(), this.loadGraph(), this.loadConversations()]);
    if (this.viewing) void this.loadHistory(this.viewing, { force: true });
  }

  private async loadGraph(): Promise<void> {
    try {
      const [following, followers] = await Promise.all([
        this.client.getAll<string>("/v1/following"), this.client.getAll<string>("/v1/followers")]);
      const asSet = (users: string[]) => Object.fromEntries(users.map((u) => [u, true as const]));
      this.set({ following: asSet(following), followers: asSet(followers) });
      void this.watch([...following, ...followers]);
    } catch (err) {
      this.fail(err);
    }
  }

  /** The conversation list with unread counts and read markers, where the server keeps them;
   * without it, conversations come from the inbox alone and unread counts are derived. */
  private async loadConversations(): Promise<void> {
    if (!this.listSupported) return;
    try {
      const items = await this.client.getAll<ConversationSummary>("/v1/conversations", 500);
      const convs = { ...this.state.convs };
      for (const item of items) {
        convs[item.conv] = withSummary(convs[item.conv] ?? emptyConversation(item.conv, this.state.me), item);
      }
      this.set({ convs });
      void this.watch(items.flatMap((i) => i.members));
    } catch (err) {
      if (err instanceof RequestError && err.code === "not_found") this.listSupported = false;
      else this.fail(err);
    }
  }

  /** The first feed page, the server's truth of counts and of what I like. */
  async refreshFeed(): Promise<void> {
    try {
      const page = await this.client.request({ t: "feed", limit: FEED_PAGE });
      this.takeFeedPage(page.items as Post[]);
    } catch { /* the next ready reloads it */ }
  }

  /** Debounced: a like note means the count changed; the next page says what it is now. */
  private refreshFeedSoon(): void {
    clearTimeout(this.timers.feed);
    this.timers.feed = window.setTimeout(() => void this.refreshFeed(), 300);
  }

  private takeFeedPage(items: Post[]): void {
    const newest = items[0]?.ts ?? 0;
    const liked = { ...this.state.liked };
    for (const p of items) liked[p.id] = !!p.liked;
    // Posts newer than the page (pushed a moment before the read caught up) stay; the rest of
    // the page's range is the server's, so an unfollowed author's posts are gone.
    const fresh = this.state.posts.filter((p) => p.ts > newest && !items.some((q) => q.id === p.id));
    const older = items.length < FEED_PAGE ? [] : this.state.posts.filter((p) => p.ts < items[items.length - 1].ts);
    this.set({ posts: sortPosts([...fresh, ...items, ...older]), liked });
    void this.watch(items.map((p) => p.author));
  }

  /** The newest page of a conversation's history (once, or again with `force`), or with
   * `earlier` the page before the oldest loaded. */
  async loadHistory(conv: string, { force = false, earlier = false } = {}): Promise<void> {
    const known = this.state.convs[conv];
    if (earlier ? !known?.historyNext : known?.historyLoaded && !force) return;
    const before = earlier ? `&before=${encodeURIComponent(known!.historyNext!)}` : "";
    try {
      const page = await this.client.get<Page<StoredMsg>>(
        `/v1/conversations/${encodeURIComponent(conv)}/messages?limit=50${before}`);
      let c = this.state.convs[conv] ?? emptyConversation(conv, this.state.me);
      for (const m of page.items) c = withMessage(c, m);
      // A reload of the newest page keeps the cursor of the earliest one loaded.
      const next = earlier || !c.historyLoaded ? page.next : c.historyNext;
      this.putConv({ ...c, historyLoaded: true, historyNext: next });
      if (conv === this.viewing) this.markRead(conv);
    } catch (err) {
      if (err instanceof RequestError && err.code === "forbidden") return; // no longer a member
      this.fail(err);
    }
  }

  /** Users whose presence the screens show. */
  private knownUsers(): string[] {
    const s = this.state;
    const users = new Set(peopleOf(s));
    for (const c of Object.values(s.convs)) c.members.forEach((u) => users.add(u));
    s.posts.forEach((p) => users.add(p.author));
    users.delete(s.me);
    return [...users];
  }

  private async watch(users: string[]): Promise<void> {
    const fresh = [...new Set(users)].filter((u) => u !== this.state.me && !this.watched.has(u))
      .slice(0, MAX_WATCH - this.watched.size);
    if (!fresh.length || this.state.conn !== "online") return;
    fresh.forEach((u) => this.watched.add(u));
    try {
      const reply = await this.client.request({ t: "watch", users: fresh });
      this.set({ presence: { ...this.state.presence, ...(reply.users as Record<string, Presence>) } });
    } catch {
      fresh.forEach((u) => this.watched.delete(u)); // watched again on the next connection
    }
  }

  // --- events -----------------------------------------------------------------------------

  private onItem(item: InboxItem, live: boolean): void {
    if (item.t === "msg") return this.onMsg(item);
    const view: NoteView = item.kind === "group" && item.conv ? { ...item, ...this.onGroupNote(item) } : item;
    if (item.kind === "follow") this.set({ followers: { ...this.state.followers, [item.from]: true } });
    if (item.kind === "like" && live) this.refreshFeedSoon();
    // A like after an unlike, or a follow after an unfollow, notes again: shown once.
    const same = (n: Note) => n.kind === item.kind && n.from === item.from && n.post === item.post;
    if (item.kind !== "group" && this.state.notes.some(same)) return;
    this.set({ notes: [view, ...this.state.notes.filter((n) => n.id !== item.id)].sort((a, b) => b.seq - a.seq) });
    void this.watch([item.from]);
  }

  private onMsg(m: Msg): void {
    const c = withMessage(this.state.convs[m.conv] ?? emptyConversation(m.conv, this.state.me), m);
    const typing = { ...this.state.typing };
    if (typing[m.conv]?.[m.from]) {
      const { [m.from]: _gone, ...rest } = typing[m.conv];
      typing[m.conv] = rest;
    }
    this.set({ typing });
    this.putConv(c);
    if (m.conv === this.viewing) this.markRead(m.conv);
    void this.watch(c.group ? [m.from] : [c.title]);
  }

  /** The group's conversation after the note; the change in words, for the Notes tab. */
  private onGroupNote(note: Note): { text: string; quiet: boolean } {
    const me = this.state.me;
    const conv = note.conv!;
    const before = this.state.convs[conv];
    const was = before ?? emptyConversation(conv, me);
    const c = withGroupNote(was, note, me);
    this.putConv(c);
    void this.watch(c.members);
    const text = groupChangeText(was, note, me);
    const aboutMe = note.from !== me && (c.member !== (before?.member ?? false) || !before);
    return { text: note.change === "create" ? text : `${text} · “${note.title}”`, quiet: !aboutMe };
  }

  private onPush(frame: Frame): void {
    switch (frame.t) {
      case "feed":
        this.takePush(frame.item as Post);
        return;
      case "typing": {
        const from = String(frame.from);
        const conv = typeof frame.conv === "string" ? frame.conv : dmConv(this.state.me, from);
        const inConv = { ...this.state.typing[conv], [from]: Date.now() + TYPING_SHOWN_MS };
        this.set({ typing: { ...this.state.typing, [conv]: inConv } });
        clearTimeout(this.timers.typing);
        this.timers.typing = window.setTimeout(() => this.expireTyping(), TYPING_SHOWN_MS + 50);
        return;
      }
      case "presence":
        this.set({ presence: { ...this.state.presence,
          [String(frame.user)]: { status: frame.status as Presence["status"], since: Number(frame.ts) } } });
        return;
      case "read":
        this.onReadReceipt(frame as unknown as ReadReceipt);
        return;
    }
  }

  /** The hook for read receipts (protocol 1.1, "Read state"): my other devices' markers and
   * the other members'; the chat shows "seen" from them. */
  private onReadReceipt(r: ReadReceipt): void {
    const c = this.state.convs[r.conv];
    if (c) this.putConv(withReadMarker(c, r.user, r.id));
  }

  private takePush(post: Post): void {
    const had = this.state.posts.find((p) => p.id === post.id);
    // A push carries likes 0 and no `liked`; a page carries both.
    const merged = had ? { ...post, likes: had.likes } : post;
    this.set({ posts: sortPosts([merged, ...this.state.posts.filter((p) => p.id !== post.id)]) });
    void this.watch([post.author]);
  }

  private expireTyping(): void {
    const now = Date.now();
    const typing: State["typing"] = {};
    let any = false;
    for (const [conv, users] of Object.entries(this.state.typing)) {
      typing[conv] = Object.fromEntries(Object.entries(users).filter(([, until]) => until > now));
      any ||= Object.keys(typing[conv]).length > 0;
    }
    this.set({ typing });
    if (any) this.timers.typing = window.setTimeout(() => this.expireTyping(), 500);
  }

  private putConv(c: Conversation): void {
    this.set({ convs: { ...this.state.convs, [c.conv]: c } });
  }

  private patchConv(conv: string, fn: (c: Conversation) => Conversation): void {
    this.putConv(fn(this.state.convs[conv] ?? emptyConversation(conv, this.state.me)));
  }

  // --- actions: the social graph and the feed ---------------------------------------------

  async follow(user: string, on = true): Promise<void> {
    const before = this.state.following;
    const following = { ...before };
    if (on) following[user] = true;
    else delete following[user];
    // An unfollow hides their posts from the next page at once: from this screen too.
    this.set({ following, posts: on ? this.state.posts : this.state.posts.filter((p) => p.author !== user) });
    void this.watch([user]);
    try {
      await this.client.request({ t: on ? "follow" : "unfollow", user });
      // The follow backfills their posts into my feed once the feed shard has it: a moment
      // later, and nothing says when, so the page is read a few times.
      if (on) for (const ms of [300, 1_500, 4_000]) window.setTimeout(() => void this.refreshFeed(), ms);
    } catch (err) {
      this.set({ following: before });
      this.fail(err);
    }
  }

  /** Whether anyone by this name has been seen online: presence keeps `since` for 30 days, and
   * 0 is a user never seen (or not for 30 days). Null when it cannot be told (no answer). */
  async seenRecently(user: string): Promise<boolean | null> {
    try {
      const reply = await this.client.get<{ users: Record<string, Presence> }>(
        `/v1/presence?users=${encodeURIComponent(user)}`);
      const p = reply.users[user];
      return p ? p.status === "online" || p.since > 0 : null;
    } catch {
      return null;
    }
  }

  async post(body: string): Promise<void> {
    // Not idempotent in the protocol (no cid): never retried, the caller keeps the draft.
    const ok = await this.client.request({ t: "post", body }, { retry: false });
    this.takePush({ id: String(ok.id), author: this.state.me, body, ts: Number(ok.ts), likes: 0 });
  }

  async like(post: Post): Promise<void> {
    const on = !this.state.liked[post.id];
    const bump = (delta: number) => this.state.posts.map((p) =>
      (p.id === post.id ? { ...p, likes: Math.max(0, p.likes + delta) } : p));
    this.set({ liked: { ...this.state.liked, [post.id]: on }, posts: bump(on ? 1 : -1) });
    try {
      await this.client.request({ t: on ? "like" : "unlike", post: post.id });
    } catch (err) {
      this.set({ liked: { ...this.state.liked, [post.id]: !on }, posts: bump(on ? -1 : 1) });
      this.fail(err);
    }
  }

  // --- actions: conversations -------------------------------------------------------------

  /** The conversation on screen (null: none): what arrives in it is read. */
  view(conv: string | null): void {
    this.viewing = conv;
    if (!conv) return;
    if (!this.state.convs[conv]) this.putConv(emptyConversation(conv, this.state.me));
    this.markRead(conv);
    void this.loadHistory(conv);
  }

  /** Move my read marker to the newest message, here and (where the server has read markers)
   * on the server, which tells my other devices and the other members. */
  markRead(conv: string): void {
    const c = this.state.convs[conv];
    const last = c && lastMessage(c);
    if (!c || !last?.id || document.visibilityState === "hidden" || c.read[this.state.me] === last.id) return;
    this.putConv(withReadMarker(c, this.state.me, last.id));
    if (!this.readSupported) return;
    this.client.request({ t: "read", conv, id: last.id }).catch((err) => {
      if (err instanceof RequestError && err.code === "unknown_type") this.readSupported = false;
    });
  }

  async send(conv: string, body: string): Promise<void> {
    const me = this.state.me;
    const key = cid(me);
    const line: MsgLine = { kind: "msg", key, from: me, body, ts: Date.now(), status: "pending" };
    this.patchConv(conv, (c) => ({ ...c, lines: [...c.lines, line], activity: line.ts }));
    delete this.typingSentAt[conv];
    const to = isGroupConv(conv) ? { conv } : { to: dmPeer(conv, me) };
    try {
      // Retried with the same cid after a drop: the server stores and delivers it once.
      const ok = await this.client.request({ t: "dm", ...to, body, cid: key });
      const id = String(ok.id);
      this.patchConv(conv, (c) => withLine(c, key, (l) => (hasMessage(c, id) ? null // its inbox copy came first
        : { ...l, id, ts: Number(ok.ts), status: "sent" })));
    } catch (err) {
      this.patchConv(conv, (c) => withLine(c, key, (l) => ({ ...l, status: "failed" })));
      this.fail(err);
    }
  }

  typing(conv: string): void {
    const now = Date.now();
    if (now - (this.typingSentAt[conv] ?? 0) < TYPING_SENT_EVERY_MS) return;
    this.typingSentAt[conv] = now;
    this.client.send(isGroupConv(conv) ? { t: "typing", conv } : { t: "typing", to: dmPeer(conv, this.state.me) });
  }

  /** A new group; its conversation appears with the `group` note the server sends. */
  async createGroup(title: string, members: string[]): Promise<string | null> {
    try {
      const ok = await this.client.request({ t: "group_create", title, members, cid: cid(this.state.me) });
      const conv = String(ok.conv);
      this.patchConv(conv, (c) => ({ ...c, title, activity: Math.max(c.activity, Number(ok.ts)) }));
      return conv;
    } catch (err) {
      this.fail(err);
      return null;
    }
  }

  async changeMembers(conv: string, change: "add" | "remove", users: string[]): Promise<void> {
    try {
      await this.client.request({ t: change === "add" ? "group_add" : "group_remove", conv, users });
    } catch (err) {
      this.fail(err);
    }
  }

  async leave(conv: string): Promise<void> {
    try {
      await this.client.request({ t: "group_leave", conv });
    } catch (err) {
      this.fail(err);
    }
  }

  // --- this browser's own: drafts and notes looked at -------------------------------------

  setDraft(key: string, text: string): void {
    const drafts = { ...this.state.drafts };
    if (text) drafts[key] = text;
    else delete drafts[key];
    this.set({ drafts });
    clearTimeout(this.timers.drafts);
    this.timers.drafts = window.setTimeout(() => this.saveDrafts(), 300);
  }

  private saveDrafts(): void {
    this.storage.save("drafts", this.state.drafts);
  }

  markNotesRead(): void {
    const top = this.state.notes[0]?.seq ?? 0;
    if (top <= this.state.notesReadSeq) return;
    this.set({ notesReadSeq: top });
    this.storage.save("notesReadSeq", top);
  }

  clearError(): void {
    this.set({ error: null });
  }
}

function sortPosts(posts: Post[]): Post[] {
  return posts.sort((a, b) => b.ts - a.ts || (a.id < b.id ? 1 : -1));
}

export function useSocial(social: Social): State {
  return useSyncExternalStore(social.subscribe, social.snapshot);
}

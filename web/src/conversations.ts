// Conversations as the screens show them, built from what the server says: messages from the
// inbox and from history, a group's membership from its `group` notes, read markers from `read`
// receipts. Plain functions over immutable values; the store (store.ts) calls them.
import { type ConversationSummary, type Note, type StoredMsg, dmPeer, isGroupConv } from "./peernet";

/** pending: on its way; sent: the server has it (`ok`, or its copy in my inbox); failed. "Seen"
 * is not stored on a line: it is read from the other members' read markers (seenBy). */
export type Tick = "pending" | "sent" | "failed";

export interface MsgLine {
  kind: "msg"; key: string; id?: string; from: string; body: string; ts: number; seq?: number; status: Tick;
}

/** A membership change shown in the chat: "alice added carol". */
export interface EventLine { kind: "event"; key: string; id: string; text: string; ts: number; seq: number }

export type ChatLine = MsgLine | EventLine;

export interface Conversation {
  conv: string;
  group: boolean;
  /** A group's title; for a pair, the other participant. */
  title: string;
  owner: string | null;
  /** A group's members after its newest note (for a pair, both). */
  members: string[];
  /** False once I left or was removed from the group. */
  member: boolean;
  lines: ChatLine[];
  /** Read markers: the id of the newest message each user has read. */
  read: Record<string, string>;
  /** When something last happened in it: the list's order. */
  activity: number;
  historyLoaded: boolean;
  /** The cursor of the history page before the oldest loaded (null: none, or not loaded). */
  historyNext: string | null;
  /** The server's unread count, as of its newest message then (GET /v1/conversations). */
  server?: { unread: number; lastId: string | null };
}

export function emptyConversation(conv: string, me: string): Conversation {
  const group = isGroupConv(conv);
  const peer = group ? "" : dmPeer(conv, me);
  return { conv, group, title: group ? "Group" : peer, owner: null, members: group ? [] : [me, peer].sort(),
    member: true, lines: [], read: {}, activity: 0, historyLoaded: false,
    historyNext: null };
}

function waiting(l: ChatLine): boolean {
  return l.kind === "msg" && l.status !== "sent";
}

/** The order of lines the server has: by time, then seq, then id (the same on every device). */
function compare(a: ChatLine, b: ChatLine): number {
  return a.ts - b.ts || ((a.seq ?? 0) - (b.seq ?? 0)) || (a.key < b.key ? -1 : a.key > b.key ? 1 : 0);
}

/** Ordered `lines` with `line` in its place: the lines the server has in their order, then the
 * ones still on their way in the order they were written. Scanned from the end, where new
 * lines go, so that a replay of thousands of messages stays linear. */
function inserted(lines: ChatLine[], line: ChatLine): ChatLine[] {
  if (waiting(line)) return [...lines, line];
  let i = lines.length;
  while (i > 0 && (waiting(lines[i - 1]) || compare(lines[i - 1], line) > 0)) i--;
  return [...lines.slice(0, i), line, ...lines.slice(i)];
}

/** A message from the inbox (with seq) or from history (without). */
export function withMessage(c: Conversation, m: StoredMsg & { seq?: number }): Conversation {
  const at = c.lines.findIndex((l) => l.kind === "msg" && l.id === m.id);
  const had = at >= 0 ? (c.lines[at] as MsgLine) : undefined;
  // A line of mine keeps its key (the cid of the send) so that it does not blink.
  const line: MsgLine = { kind: "msg", key: had?.key ?? m.id, id: m.id, from: m.from, body: m.body, ts: m.ts,
    seq: m.seq ?? had?.seq, status: "sent" };
  const rest = at >= 0 ? c.lines.filter((_, i) => i !== at) : c.lines;
  return { ...c, lines: inserted(rest, line), activity: Math.max(c.activity, m.ts) };
}

/** The conversation with my line `key` changed by `fn` (null: taken out). */
export function withLine(c: Conversation, key: string, fn: (l: MsgLine) => MsgLine | null): Conversation {
  const line = c.lines.find((l): l is MsgLine => l.kind === "msg" && l.key === key);
  if (!line) return c;
  const rest = c.lines.filter((l) => l !== line);
  const next = fn(line);
  return { ...c, lines: next ? inserted(rest, next) : rest };
}

export function hasMessage(c: Conversation, id: string): boolean {
  return c.lines.some((l) => l.kind === "msg" && l.id === id);
}

const who = (user: string, me: string) => (user === me ? "you" : user);
const list = (users: string[], me: string) => users.map((u) => who(u, me)).join(", ");

/** What a `group` note changed, in words; the membership before it is the conversation's. */
export function groupChangeText(c: Conversation, note: Note, me: string): string {
  const known = knownGroup(c);
  const after = note.members ?? [];
  const by = who(note.from, me);
  const added = after.filter((u) => !c.members.includes(u));
  const removed = c.members.filter((u) => !after.includes(u));
  const change = note.change ?? (!known ? "create" : added.length ? "add" : "remove");
  if (after.length === 0) {
    return note.from === me ? "you left" : `${by} removed you`;
  }
  if (change === "create") return `${by} created “${note.title}”`;
  if (!known) return change === "add" && after.includes(me) ? `${by} added you` : `${by} changed the members`;
  if (change === "leave") return `${by} left`;
  if (change === "add") return `${by} added ${list(added, me)}`;
  return `${by} removed ${list(removed, me)}`;
}

/** Whether a note of this group was seen before (else its first is the change that made me a
 * member, or the oldest retained). */
function knownGroup(c: Conversation): boolean {
  return c.lines.some((l) => l.kind === "event") || c.members.length > 0;
}

/** A conversation after one of its `group` notes (in seq order, as the inbox gives them). */
export function withGroupNote(c: Conversation, note: Note, me: string): Conversation {
  const known = knownGroup(c);
  let text = groupChangeText(c, note, me);
  const after = note.members ?? [];
  if (known && c.owner && note.owner && note.owner !== c.owner && after.length) {
    text += ` · ${who(note.owner, me)} ${note.owner === me ? "are" : "is"} now the owner`;
  }
  const event: EventLine = { kind: "event", key: note.id, id: note.id, text, ts: note.ts, seq: note.seq };
  return { ...c, title: note.title ?? c.title, owner: note.owner ?? c.owner,
    members: after.length ? after : c.members.filter((u) => u !== me), member: after.includes(me),
    lines: inserted(c.lines.filter((l) => l.key !== note.id), event), activity: Math.max(c.activity, note.ts) };
}

function indexOfMsg(c: Conversation, id: string | undefined): number {
  return id === undefined ? -1 : c.lines.findIndex((l) => l.kind === "msg" && l.id === id);
}

/** A read marker moves forward only: a marker at a message older than the one held changes nothing. */
export function withReadMarker(c: Conversation, user: string, id: string): Conversation {
  const held = indexOfMsg(c, c.read[user]);
  const next = indexOfMsg(c, id);
  if (c.read[user] === id || (held >= 0 && next >= 0 && next <= held)) return c;
  return { ...c, read: { ...c.read, [user]: id } };
}

export function lastMessage(c: Conversation): MsgLine | undefined {
  for (let i = c.lines.length - 1; i >= 0; i--) {
    const l = c.lines[i];
    if (l.kind === "msg") return l;
  }
  return undefined;
}

/** A conversation as the server lists it: title, members, newest message, markers, unread. */
export function withSummary(c: Conversation, s: ConversationSummary): Conversation {
  let next: Conversation = { ...c, members: s.members, owner: s.owner ?? c.owner,
    title: s.kind === "group" ? s.title ?? c.title : c.title, member: true };
  if (s.last) next = withMessage(next, s.last);
  for (const [user, id] of Object.entries(s.read)) next = withReadMarker(next, user, id);
  return { ...next, server: { unread: s.unread, lastId: s.last?.id ?? null } };
}

const othersAfter = (c: Conversation, me: string, from: number, inboxOnly: boolean) =>
  c.lines.filter((l, i) => i > from && l.kind === "msg" && l.from !== me && (!inboxOnly || l.seq !== undefined)).length;

/** Messages from others after both my read marker and my own newest message (writing in a
 * conversation means having read it). The server's count where it gave one, plus what came
 * after it; else counted from the inbox items (lines with a seq). */
export function unreadCount(c: Conversation, me: string): number {
  let from = indexOfMsg(c, c.read[me]);
  c.lines.forEach((l, i) => { if (l.kind === "msg" && l.from === me && i > from) from = i; });
  const counted = indexOfMsg(c, c.server?.lastId ?? undefined);
  if (c.server && counted >= 0 && from < counted) return c.server.unread + othersAfter(c, me, counted, false);
  return othersAfter(c, me, from, true);
}

/** Who (other than me) has read up to each line: keyed by the line at each reader's marker. */
export function seenBy(c: Conversation, me: string): Record<string, string[]> {
  const out: Record<string, string[]> = {};
  for (const [user, id] of Object.entries(c.read)) {
    if (user === me) continue;
    const at = indexOfMsg(c, id);
    if (at < 0) continue;
    (out[c.lines[at].key] ??= []).push(user);
  }
  return out;
}

/** Whether someone else has read up to this line of mine (it is at or before their marker). */
export function isSeen(c: Conversation, me: string, line: MsgLine): boolean {
  const at = c.lines.indexOf(line);
  return line.status === "sent" && Object.entries(c.read)
    .some(([user, id]) => user !== me && indexOfMsg(c, id) >= at);
}

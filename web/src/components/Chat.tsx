// One conversation: its header (the other person's presence, or a group's members with add,
// remove and leave), the lines with ticks, senders' names and membership changes, who is
// typing, and the message box (its draft kept per conversation).
import { AnimatePresence, motion } from "motion/react";
import { type FormEvent, useEffect, useRef, useState } from "react";
import { type Conversation, type MsgLine, emptyConversation, isSeen, seenBy } from "../conversations";
import { names } from "../names";
import { type State, Social, presenceOf } from "../store";
import { Avatar, Counter, ago, sendable, spring } from "./ui";

// Pending is a small spinning ring (CSS); emoji clocks are missing from many systems' fonts.
const TICKS = { pending: "", sent: "✓", seen: "✓✓", failed: "!" } as const;
/** Lines drawn at first, and more each time earlier ones are asked for. */
const SHOWN = 200;

export function Chat({ s, social, conv, onBack }: { s: State; social: Social; conv: string; onBack: () => void }) {
  const c = s.convs[conv] ?? emptyConversation(conv, s.me);
  const typing = Object.keys(s.typing[conv] ?? {});
  useEffect(() => {
    social.view(conv);
    return () => social.view(null);
  }, [conv, social]);
  return (
    <div className="chat" data-testid="chat" data-conv={conv} data-peer={c.group ? undefined : c.title}>
      <button data-testid="chat-back" className="ghost small back" onClick={onBack}>← Conversations</button>
      {c.group ? <GroupHead c={c} s={s} social={social} /> : <PeerHead peer={c.title} s={s} />}
      <Lines c={c} s={s} typing={typing} onEarlier={() => void social.loadHistory(conv, { earlier: true })} />
      {c.member ? <MessageBox c={c} s={s} social={social} />
        : <p data-testid="not-member" className="muted small gone">You are no longer in this group.</p>}
    </div>
  );
}

function PeerHead({ peer, s }: { peer: string; s: State }) {
  const status = presenceOf(s, peer);
  const since = s.presence[peer]?.since ?? 0;
  const label = status === "online" ? "online" : status === "offline" ? (since ? `last seen ${ago(since)}` : "offline")
    : s.conn !== "online" ? "status unknown while you are offline" : "";
  return (
    <div className="chat-head">
      <Avatar user={peer} status={status} />
      <b>{peer}</b>
      <span data-testid="peer-status" data-status={status} className="muted small">{label}</span>
    </div>
  );
}

function GroupHead({ c, s, social }: { c: Conversation; s: State; social: Social }) {
  const [open, setOpen] = useState(false);
  return (
    <div className="chat-head group-head">
      <div className="row-tight">
        <Avatar user={c.title} />
        <div className="grow">
          <b data-testid="group-title-shown">{c.title}</b>
          <div className="muted small clip" data-testid="group-members-shown">
            {c.members.map((u) => (u === s.me ? "you" : u)).join(", ")}
          </div>
        </div>
        {c.member && <button data-testid="group-manage" className="ghost" onClick={() => setOpen(!open)}>
          {open ? "Done" : "Members"}</button>}
      </div>
      {open && c.member && <GroupMembers c={c} s={s} social={social} />}
    </div>
  );
}

function GroupMembers({ c, s, social }: { c: Conversation; s: State; social: Social }) {
  const [add, setAdd] = useState("");
  const owner = c.owner === s.me;
  const adding = names(add, s.me);
  const submit = (e: FormEvent) => {
    e.preventDefault();
    if (!adding.users.length || adding.problem) return;
    void social.changeMembers(c.conv, "add", adding.users);
    setAdd("");
  };
  return (
    <div className="members">
      <ul>
        {c.members.map((u) => (
          <li key={u} className="member" data-testid="member" data-user={u}>
            <Avatar user={u} status={u === s.me ? undefined : presenceOf(s, u)} />
            <span className="grow">{u === s.me ? "you" : u}{u === c.owner && <span className="muted small"> · owner</span>}</span>
            {owner && u !== s.me && (
              <button data-testid="member-remove" className="ghost small"
                onClick={() => void social.changeMembers(c.conv, "remove", [u])}>Remove</button>
            )}
          </li>
        ))}
      </ul>
      {owner && (
        <form className="row" onSubmit={submit}>
          <input data-testid="member-add" placeholder="add people by user name" value={add}
            onChange={(e) => setAdd(e.target.value)} />
          <button data-testid="member-add-go" disabled={!adding.users.length || !!adding.problem}>Add</button>
        </form>
      )}
      {adding.problem && <p className="hint">{adding.problem}</p>}
      <button data-testid="group-leave" className="ghost danger" onClick={() => void social.leave(c.conv)}>
        Leave the group</button>
    </div>
  );
}

function Lines({ c, s, typing, onEarlier }:
  { c: Conversation; s: State; typing: string[]; onEarlier: () => void }) {
  const seen = seenBy(c, s.me);
  const [shown, setShown] = useState(SHOWN);
  const from = Math.max(0, c.lines.length - shown);
  const end = useRef<HTMLDivElement>(null);
  // A block body: scrollIntoView returns a promise in newer browsers, not an effect cleanup.
  useEffect(() => { end.current?.scrollIntoView({ block: "end" }); }, [c.lines.length, typing.length]);
  return (
    <div className="lines">
      {(from > 0 || c.historyNext) && <button data-testid="earlier" className="ghost small earlier"
        onClick={() => { if (from === 0) onEarlier(); setShown(shown + SHOWN); }}>Show earlier messages</button>}
      <AnimatePresence initial={false}>
        {c.lines.slice(from).map((l, j) => {
          const i = from + j;
          if (l.kind === "event") {
            return <motion.div key={l.key} layout data-testid="event" className="event muted small"
              initial={{ opacity: 0 }} animate={{ opacity: 1 }}>{l.text}</motion.div>;
          }
          const prev = c.lines[i - 1];
          const showName = c.group && l.from !== s.me && !(prev?.kind === "msg" && prev.from === l.from);
          return <Line key={l.key} l={l} c={c} s={s} showName={showName} seenBy={seen[l.key]} />;
        })}
      </AnimatePresence>
      <AnimatePresence>
        {typing.length > 0 && (
          <motion.div data-testid="typing" className="line typing" initial={{ opacity: 0, y: 8 }}
            animate={{ opacity: 1, y: 0 }} exit={{ opacity: 0 }}>
            {[0, 1, 2].map((i) => (
              <motion.span key={i} className="tdot" animate={{ y: [0, -4, 0] }}
                transition={{ repeat: Infinity, duration: 0.9, delay: i * 0.15 }} />
            ))}
            <span className="muted small">{typing.join(", ")} {typing.length > 1 ? "are" : "is"} typing</span>
          </motion.div>
        )}
      </AnimatePresence>
      <div ref={end} />
    </div>
  );
}

function Line({ l, c, s, showName, seenBy: readers }:
  { l: MsgLine; c: Conversation; s: State; showName: boolean; seenBy?: string[] }) {
  const mine = l.from === s.me;
  const status = mine && isSeen(c, s.me, l) ? "seen" : l.status;
  return (
    <motion.div layout className={mine ? "line-wrap mine" : "line-wrap"} initial={{ opacity: 0, y: 12, scale: 0.95 }}
      animate={{ opacity: 1, y: 0, scale: 1 }} transition={spring}>
      {showName && <span data-testid="line-from" className="line-from small">{l.from}</span>}
      <div data-testid="line" data-mine={mine} data-from={l.from} data-status={status}
        className={mine ? "line mine" : "line"}>
        <span data-testid="line-body">{l.body}</span>
        {mine && (
          <motion.span key={status} data-testid="tick" className={`tick ${status}`}
            initial={{ scale: 0.4 }} animate={{ scale: 1 }} title={status}>{TICKS[status]}</motion.span>
        )}
      </div>
      {readers && (
        <span data-testid="seen-by" className="seen-by muted small">
          Seen{c.group ? ` by ${readers.join(", ")}` : ""}
        </span>
      )}
    </motion.div>
  );
}

function MessageBox({ c, s, social }: { c: Conversation; s: State; social: Social }) {
  const draft = s.drafts[c.conv] ?? "";
  const send = (e: FormEvent) => {
    e.preventDefault();
    if (!sendable(draft)) return;
    void social.send(c.conv, draft.trim());
    social.setDraft(c.conv, "");
  };
  return (
    <form className="compose-dm" onSubmit={send}>
      <div className="row">
        <input data-testid="dm-input" placeholder={`Message ${c.title}`} value={draft}
          onChange={(e) => { social.setDraft(c.conv, e.target.value); if (e.target.value) social.typing(c.conv); }} />
        <motion.button data-testid="dm-send" whileTap={{ scale: 0.93 }} disabled={!sendable(draft)}>Send</motion.button>
      </div>
      <Counter text={draft} />
    </form>
  );
}

// Messages: the conversation list (most recent first, unread counts, typing), and the open
// conversation, or the forms that start one (a message to someone, a new group).
import { type FormEvent, useState } from "react";
import { type Conversation, lastMessage, unreadCount } from "../conversations";
import { nameProblem, names } from "../names";
import { MAX_TITLE_CHARS, dmConv } from "../peernet";
import { type State, Social, presenceOf } from "../store";
import { Chat } from "./Chat";
import { Avatar, Empty } from "./ui";

export function Messages({ s, social, conv, onConv }:
  { s: State; social: Social; conv: string | null; onConv: (c: string | null) => void }) {
  const convs = Object.values(s.convs)
    .filter((c) => c.lines.length || c.group || c.conv === conv)
    .sort((a, b) => b.activity - a.activity || (a.conv < b.conv ? -1 : 1));
  return (
    // On a phone the open conversation takes the screen; its back button shows the list.
    <section className={conv ? "messages has-chat" : "messages"}>
      <div className="convs-col">
        <button data-testid="new-conv" className={conv ? "ghost" : ""} onClick={() => onConv(null)}>
          New message or group
        </button>
        <ul className="convs">
          {convs.length === 0 && <Empty>No conversations yet.</Empty>}
          {convs.map((c) => <ConvRow key={c.conv} c={c} s={s} active={c.conv === conv} onOpen={() => onConv(c.conv)} />)}
        </ul>
      </div>
      {conv ? <Chat key={conv} s={s} social={social} conv={conv} onBack={() => onConv(null)} />
        : <NewConversation s={s} social={social} onConv={onConv} />}
    </section>
  );
}

function ConvRow({ c, s, active, onOpen }: { c: Conversation; s: State; active: boolean; onOpen: () => void }) {
  const unread = unreadCount(c, s.me);
  const typing = Object.keys(s.typing[c.conv] ?? {});
  const last = lastMessage(c);
  const preview = typing.length ? <i>{typing.join(", ")} typing…</i>
    : last ? `${c.group ? `${last.from === s.me ? "you" : last.from}: ` : ""}${last.body}` : "";
  return (
    <li data-testid="conv" data-conv={c.conv} data-user={c.group ? undefined : c.title}
      data-title={c.title} data-unread={unread} className={active ? "conv active" : "conv"} onClick={onOpen}>
      <Avatar user={c.title} status={c.group ? undefined : presenceOf(s, c.title)} />
      <div className="grow clip">
        <b>{c.title}</b>{c.group && <span className="muted small"> · {c.members.length}</span>}
        <div className="muted small clip">{preview}</div>
      </div>
      {unread > 0 && <span data-testid="conv-unread" className="badge">{unread}</span>}
    </li>
  );
}

function NewConversation({ s, social, onConv }: { s: State; social: Social; onConv: (c: string) => void }) {
  const [to, setTo] = useState("");
  const [title, setTitle] = useState("");
  const [members, setMembers] = useState("");
  const [busy, setBusy] = useState(false);
  const toProblem = nameProblem(to, s.me);
  const group = names(members, s.me);
  const titleOk = title.trim().length > 0 && [...title.trim()].length <= MAX_TITLE_CHARS;
  const groupProblem = group.problem ?? (group.users.length > 499 ? "at most 499 others" : null);
  const message = (e: FormEvent) => {
    e.preventDefault();
    if (to && !toProblem) onConv(dmConv(s.me, to));
  };
  const create = async (e: FormEvent) => {
    e.preventDefault();
    if (!titleOk || groupProblem || !group.users.length || busy) return;
    setBusy(true);
    const conv = await social.createGroup(title.trim(), group.users);
    setBusy(false);
    if (conv) onConv(conv);
  };
  return (
    <div className="chat new-conv">
      <form className="card-section" onSubmit={message}>
        <b>Message someone</b>
        <div className="row">
          <input data-testid="dm-to" placeholder="user name" value={to}
            onChange={(e) => setTo(e.target.value.toLowerCase().trim())} />
          <button data-testid="dm-open" disabled={!to || !!toProblem}>Open</button>
        </div>
        {toProblem && <p className="hint">{toProblem}</p>}
      </form>
      <form className="card-section" onSubmit={create}>
        <b>New group</b>
        <input data-testid="group-title" placeholder="title" value={title} maxLength={MAX_TITLE_CHARS}
          onChange={(e) => setTitle(e.target.value)} />
        <input data-testid="group-members" placeholder="members: user names, separated by commas" value={members}
          onChange={(e) => setMembers(e.target.value)} />
        {groupProblem && <p data-testid="group-hint" className="hint">{groupProblem}</p>}
        <button data-testid="group-create" disabled={!titleOk || !!groupProblem || !group.users.length || busy}>
          Create group
        </button>
      </form>
    </div>
  );
}

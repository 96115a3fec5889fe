import { AnimatePresence, motion } from "motion/react";
import { type FormEvent, type ReactNode, useEffect, useRef, useState } from "react";
import type { Post } from "./peernet";
import { type ChatLine, type State, Social, convOf, peerOf, useSocial } from "./store";

const USER_ID = /^[a-z0-9_]{1,32}$/;
const SERVER = new URLSearchParams(location.search).get("server") ?? location.origin;
const spring = { type: "spring", stiffness: 500, damping: 34 } as const;

type Tab = "home" | "people" | "messages" | "notes";

export function App() {
  const [me, setMe] = useState<string | null>(() => localStorage.getItem("peernet:user"));
  const [social, setSocial] = useState<Social | null>(null);
  useEffect(() => {
    if (!me) return;
    const s = new Social(SERVER, me);
    setSocial(s);
    return () => { s.stop(); setSocial(null); };
  }, [me]);
  const signOut = () => {
    localStorage.removeItem("peernet:user");
    setMe(null);
  };
  return (
    <AnimatePresence mode="wait">
      {me && social ? (
        <Shell key={social.client.user} social={social} onSignOut={signOut} />
      ) : me ? null : (
        <SignIn key="signin" onSignIn={(u) => { localStorage.setItem("peernet:user", u); setMe(u); }} />
      )}
    </AnimatePresence>
  );
}

function SignIn({ onSignIn }: { onSignIn: (user: string) => void }) {
  const [user, setUser] = useState("");
  const valid = USER_ID.test(user);
  const submit = (e: FormEvent) => {
    e.preventDefault();
    if (valid) onSignIn(user);
  };
  return (
    <motion.main className="signin" initial={{ opacity: 0, y: 16 }} animate={{ opacity: 1, y: 0 }}
      exit={{ opacity: 0, scale: 0.97 }}>
      <form onSubmit={submit} className="card signin-card">
        <Logo />
        <p className="muted">Sign in with a user name (a development token).</p>
        <input data-testid="signin-user" autoFocus placeholder="user name" value={user}
          onChange={(e) => setUser(e.target.value.toLowerCase())} />
        <p className="hint">{user && !valid ? "a to z, 0 to 9 and _, at most 32" : "\u00a0"}</p>
        <motion.button data-testid="signin-go" disabled={!valid} whileTap={{ scale: 0.96 }}>Sign in</motion.button>
      </form>
    </motion.main>
  );
}

function Logo() {
  return <h1 className="logo"><span className="logo-dot" />PeerNet</h1>;
}

function Shell({ social, onSignOut }: { social: Social; onSignOut: () => void }) {
  const s = useSocial(social);
  const [tab, setTab] = useState<Tab>("home");
  const [chatWith, setChatWith] = useState<string | null>(null);
  const unread = s.notes.filter((n) => n.seq > s.notesReadSeq).length;
  useEffect(() => { if (tab === "notes") social.markNotesRead(); }, [tab, s.notes, social]);
  const openChat = (user: string) => { setChatWith(user); setTab("messages"); };
  const tabs: Array<[Tab, string, number]> = [["home", "Home", 0], ["people", "People", 0],
    ["messages", "Messages", 0], ["notes", "Notes", unread]];
  return (
    <motion.div className="shell" initial={{ opacity: 0 }} animate={{ opacity: 1 }} exit={{ opacity: 0 }}>
      <header className="top">
        <Logo />
        <ConnectionPill state={s} />
        <div className="me">
          <Avatar user={s.me} status={s.conn === "online" ? "online" : "offline"} />
          <span data-testid="me">{s.me}</span>
          <button className="ghost" onClick={onSignOut}>Sign out</button>
        </div>
      </header>
      <nav className="tabs">
        {tabs.map(([id, label, badge]) => (
          <button key={id} data-testid={`tab-${id}`} className={tab === id ? "tab active" : "tab"}
            onClick={() => setTab(id)}>
            {tab === id && <motion.span layoutId="tab-bg" className="tab-bg" transition={spring} />}
            <span className="tab-label">{label}</span>
            <AnimatePresence>
              {badge > 0 && (
                <motion.span key={badge} data-testid="unread" className="badge" initial={{ scale: 0 }}
                  animate={{ scale: 1 }} exit={{ scale: 0 }} transition={spring}>{badge}</motion.span>
              )}
            </AnimatePresence>
          </button>
        ))}
      </nav>
      <AnimatePresence>
        {s.error && (
          <motion.div className="toast" initial={{ y: -12, opacity: 0 }} animate={{ y: 0, opacity: 1 }}
            exit={{ opacity: 0 }} onClick={() => social.clearError()}>{s.error} ✕</motion.div>
        )}
      </AnimatePresence>
      <AnimatePresence mode="wait">
        <motion.main key={tab} className="content" initial={{ opacity: 0, y: 8 }}
          animate={{ opacity: 1, y: 0 }} exit={{ opacity: 0, y: -8 }} transition={{ duration: 0.16 }}>
          {tab === "home" && <Home s={s} social={social} />}
          {tab === "people" && <People s={s} social={social} onMessage={openChat} />}
          {tab === "messages" && <Messages s={s} social={social} peer={chatWith} onPeer={setChatWith} />}
          {tab === "notes" && <Notes s={s} social={social} />}
        </motion.main>
      </AnimatePresence>
    </motion.div>
  );
}

function ConnectionPill({ state }: { state: State }) {
  const [, tick] = useState(0);
  useEffect(() => {
    if (state.conn !== "reconnecting") return;
    const t = setInterval(() => tick((n) => n + 1), 500);
    return () => clearInterval(t);
  }, [state.conn]);
  const wait = Math.max(0, Math.ceil((state.retryAt - Date.now()) / 1000));
  const label = {
    online: "Live",
    connecting: "Connecting…",
    reconnecting: wait > 0 ? `Reconnecting in ${wait}s…` : "Reconnecting…",
    offline: "Offline: waiting for the network",
    stopped: "Signed out",
  }[state.conn];
  return (
    <motion.div layout data-testid="conn" data-state={state.conn} className={`pill ${state.conn}`}
      transition={spring}>
      <motion.span className="pill-dot" animate={state.conn === "online" ? { scale: 1 } : { scale: [1, 1.5, 1] }}
        transition={state.conn === "online" ? {} : { repeat: Infinity, duration: 1.2 }} />
      {label}
    </motion.div>
  );
}

function hue(user: string): number {
  let h = 0;
  for (const ch of user) h = (h * 31 + ch.charCodeAt(0)) % 360;
  return h;
}

function Avatar({ user, status }: { user: string; status?: string }) {
  return (
    <span className="avatar" style={{ background: `hsl(${hue(user)} 65% 55%)` }}>
      {user.slice(0, 1).toUpperCase()}
      {status && (
        <motion.span data-testid="dot" data-status={status} className={`dot ${status}`}
          animate={{ scale: status === "online" ? [1.5, 1] : 1 }} key={status} />
      )}
    </span>
  );
}

function ago(ts: number): string {
  const s = Math.max(0, Math.round((Date.now() - ts) / 1000));
  if (s < 45) return "now";
  if (s < 3600) return `${Math.round(s / 60)}m`;
  if (s < 86400) return `${Math.round(s / 3600)}h`;
  return new Date(ts).toLocaleDateString();
}

// --- Home -------------------------------------------------------------------------------------

function Home({ s, social }: { s: State; social: Social }) {
  const [draft, setDraft] = useState("");
  const [busy, setBusy] = useState(false);
  const submit = async (e: FormEvent) => {
    e.preventDefault();
    const body = draft.trim();
    if (!body) return;
    setBusy(true);
    try {
      await social.post(body);
      setDraft("");
    } catch { /* shown as the error toast; the draft stays */ } finally {
      setBusy(false);
    }
  };
  return (
    <section className="column">
      <form className="card compose" onSubmit={submit}>
        <textarea data-testid="compose" placeholder="What's happening?" maxLength={4000} rows={2}
          value={draft} onChange={(e) => setDraft(e.target.value)} />
        <motion.button data-testid="post-btn" whileTap={{ scale: 0.95 }}
          disabled={busy || !draft.trim() || s.conn !== "online"}>Post</motion.button>
      </form>
      {s.posts.length === 0 && <Empty>Your home feed is empty: follow people, or post something.</Empty>}
      <ul className="feed">
        <AnimatePresence initial={false}>
          {s.posts.map((p) => <PostCard key={p.id} post={p} s={s} social={social} />)}
        </AnimatePresence>
      </ul>
    </section>
  );
}

function PostCard({ post, s, social }: { post: Post; s: State; social: Social }) {
  const liked = !!s.liked[post.id];
  return (
    <motion.li layout data-testid="post" data-author={post.author} className="card post"
      initial={{ opacity: 0, y: -16, scale: 0.98 }} animate={{ opacity: 1, y: 0, scale: 1 }}
      exit={{ opacity: 0 }} transition={spring}>
      <Avatar user={post.author} status={post.author === s.me ? undefined : s.presence[post.author]?.status} />
      <div className="post-main">
        <div className="post-head"><b>{post.author}</b><span className="muted">{ago(post.ts)}</span></div>
        <p data-testid="post-body" className="body">{post.body}</p>
        <LikeButton liked={liked} count={post.likes} onClick={() => void social.like(post)} />
      </div>
    </motion.li>
  );
}

function LikeButton({ liked, count, onClick }: { liked: boolean; count: number; onClick: () => void }) {
  // Animate changes only: a feed that loads does not make every heart jump.
  const mounted = useRef(false);
  useEffect(() => { mounted.current = true; }, []);
  const changed = mounted.current;
  return (
    <motion.button data-testid="like" data-liked={liked} className={liked ? "like on" : "like"}
      onClick={onClick} whileTap={{ scale: 0.8 }}>
      <motion.span key={count} className="heart-wrap" initial={changed ? undefined : false}
        animate={{ scale: [1, 1.2, 1] }} transition={{ duration: 0.3 }}>
        <motion.span key={String(liked)} className="heart" initial={changed ? { scale: liked ? 0.2 : 1 } : false}
          animate={{ scale: liked ? [0.2, 1.5, 1] : 1 }} transition={{ duration: 0.45 }}>
          {liked ? "♥" : "♡"}
        </motion.span>
        <AnimatePresence>
          {liked && changed && (
            <motion.span key="burst" className="burst" initial={{ scale: 0.3, opacity: 0.9 }}
              animate={{ scale: 2.4, opacity: 0 }} exit={{ opacity: 0 }} transition={{ duration: 0.55 }} />
          )}
        </AnimatePresence>
      </motion.span>
      <span className="count" data-testid="likes" data-count={count}>
        <AnimatePresence mode="popLayout" initial={false}>
          <motion.span key={count} initial={{ y: 10, opacity: 0 }}
            animate={{ y: 0, opacity: 1 }} exit={{ y: -10, opacity: 0 }}>{count}</motion.span>
        </AnimatePresence>
      </span>
    </motion.button>
  );
}

// --- People -----------------------------------------------------------------------------------

function People({ s, social, onMessage }: { s: State; social: Social; onMessage: (u: string) => void }) {
  const [user, setUser] = useState("");
  const valid = USER_ID.test(user) && user !== s.me;
  const follow = (e: FormEvent) => {
    e.preventDefault();
    if (!valid) return;
    void social.follow(user);
    setUser("");
  };
  const followers = new Set(s.notes.filter((n) => n.kind === "follow").map((n) => n.from));
  return (
    <section className="column">
      <form className="card row" onSubmit={follow}>
        <input data-testid="follow-user" placeholder="follow someone by user name" value={user}
          onChange={(e) => setUser(e.target.value.toLowerCase())} />
        <motion.button data-testid="follow-go" disabled={!valid} whileTap={{ scale: 0.95 }}>Follow</motion.button>
      </form>
      {s.people.length === 0 && <Empty>Nobody here yet. Follow someone by name to begin.</Empty>}
      <ul className="people">
        <AnimatePresence initial={false}>
          {s.people.map((u) => {
            const on = !!s.following[u];
            return (
              <motion.li layout key={u} data-testid="person" data-user={u} className="card person"
                initial={{ opacity: 0, x: -12 }} animate={{ opacity: 1, x: 0 }} transition={spring}>
                <Avatar user={u} status={s.presence[u]?.status ?? "offline"} />
                <div className="grow">
                  <b>{u}</b>
                  <div className="muted small">
                    {followers.has(u) ? "follows you" : ""}
                    {s.presence[u]?.status === "online" ? " · online" : ""}
                  </div>
                </div>
                <motion.button data-testid="follow-toggle" className={on ? "ghost" : ""} whileTap={{ scale: 0.93 }}
                  onClick={() => void social.follow(u, !on)}>{on ? "Following" : "Follow"}</motion.button>
                <button data-testid="message" className="ghost" onClick={() => onMessage(u)}>Message</button>
              </motion.li>
            );
          })}
        </AnimatePresence>
      </ul>
    </section>
  );
}

// --- Messages ---------------------------------------------------------------------------------

function Messages({ s, social, peer, onPeer }:
  { s: State; social: Social; peer: string | null; onPeer: (u: string) => void }) {
  const convs: Array<{ conv: string; peer: string; last?: ChatLine }> = Object.entries(s.convs)
    .map(([conv, lines]) => ({ conv, peer: peerOf(conv, s.me), last: lines[lines.length - 1] }))
    .sort((a, b) => (b.last?.ts ?? 0) - (a.last?.ts ?? 0));
  if (peer && !convs.some((c) => c.peer === peer)) convs.unshift({ conv: convOf(s.me, peer), peer });
  return (
    <section className="messages">
      <ul className="convs">
        {convs.length === 0 && <Empty>No conversations yet: open People and press Message.</Empty>}
        {convs.map((c) => (
          <li key={c.conv} data-testid="conv" data-user={c.peer}
            className={c.peer === peer ? "conv active" : "conv"} onClick={() => onPeer(c.peer)}>
            <Avatar user={c.peer} status={s.presence[c.peer]?.status ?? "offline"} />
            <div className="grow clip">
              <b>{c.peer}</b>
              <div className="muted small clip">
                {s.typing[c.peer] ? <i>typing…</i> : c.last?.body ?? ""}
              </div>
            </div>
          </li>
        ))}
      </ul>
      {peer ? <Chat key={peer} s={s} social={social} peer={peer} /> : <div className="chat empty" />}
    </section>
  );
}

// Pending is a small spinning ring (CSS); emoji clocks are missing from many systems' fonts.
const TICKS: Record<ChatLine["status"], string> = { pending: "", sent: "✓", delivered: "✓✓", failed: "!" };

function Chat({ s, social, peer }: { s: State; social: Social; peer: string }) {
  const lines = s.convs[convOf(s.me, peer)] ?? [];
  const [draft, setDraft] = useState("");
  const end = useRef<HTMLDivElement>(null);
  const typing = !!s.typing[peer];
  // A block body: scrollIntoView returns a promise in newer browsers, not an effect cleanup.
  useEffect(() => { end.current?.scrollIntoView({ block: "end" }); }, [lines.length, typing]);
  const send = (e: FormEvent) => {
    e.preventDefault();
    const body = draft.trim();
    if (!body) return;
    void social.sendDm(peer, body);
    setDraft("");
  };
  return (
    <div className="chat" data-testid="chat" data-peer={peer}>
      <div className="chat-head">
        <Avatar user={peer} status={s.presence[peer]?.status ?? "offline"} />
        <b>{peer}</b>
        <span className="muted small">{s.presence[peer]?.status === "online" ? "online" : "offline"}</span>
      </div>
      <div className="lines">
        <AnimatePresence initial={false}>
          {lines.map((l) => {
            const mine = l.from === s.me;
            return (
              <motion.div key={l.key} layout data-testid="line" data-mine={mine} data-status={l.status}
                className={mine ? "line mine" : "line"} initial={{ opacity: 0, y: 12, scale: 0.95 }}
                animate={{ opacity: 1, y: 0, scale: 1 }} transition={spring}>
                <span data-testid="line-body">{l.body}</span>
                {mine && (
                  <motion.span key={l.status} data-testid="tick" className={`tick ${l.status}`}
                    initial={{ scale: 0.4 }} animate={{ scale: 1 }} title={l.status}>{TICKS[l.status]}</motion.span>
                )}
              </motion.div>
            );
          })}
        </AnimatePresence>
        <AnimatePresence>
          {typing && (
            <motion.div data-testid="typing" className="line typing" initial={{ opacity: 0, y: 8 }}
              animate={{ opacity: 1, y: 0 }} exit={{ opacity: 0 }}>
              {[0, 1, 2].map((i) => (
                <motion.span key={i} className="tdot" animate={{ y: [0, -4, 0] }}
                  transition={{ repeat: Infinity, duration: 0.9, delay: i * 0.15 }} />
              ))}
              <span className="muted small">{peer} is typing</span>
            </motion.div>
          )}
        </AnimatePresence>
        <div ref={end} />
      </div>
      <form className="row compose-dm" onSubmit={send}>
        <input data-testid="dm-input" placeholder={`Message ${peer}`} maxLength={4000} value={draft}
          onChange={(e) => { setDraft(e.target.value); if (e.target.value) social.typing(peer); }} />
        <motion.button data-testid="dm-send" whileTap={{ scale: 0.93 }} disabled={!draft.trim()}>Send</motion.button>
      </form>
    </div>
  );
}

// --- Notes ------------------------------------------------------------------------------------

function Notes({ s, social }: { s: State; social: Social }) {
  if (s.notes.length === 0) return <Empty>No notes yet: follows and likes of your posts show up here.</Empty>;
  return (
    <ul className="column notes">
      <AnimatePresence initial={false}>
        {s.notes.map((n) => (
          <motion.li layout key={n.id} data-testid="note" data-kind={n.kind} className="card note"
            initial={{ opacity: 0, y: -10 }} animate={{ opacity: 1, y: 0 }} transition={spring}>
            <Avatar user={n.from} status={s.presence[n.from]?.status ?? "offline"} />
            <div className="grow">
              <b>{n.from}</b> {n.kind === "follow" ? "followed you" : n.kind === "like" ? "liked your post" : n.kind}
              {n.post && <div className="muted small clip">{s.posts.find((p) => p.id === n.post)?.body ?? ""}</div>}
            </div>
            <span className="muted small">{ago(n.ts)}</span>
            {n.kind === "follow" && !s.following[n.from] && (
              <button data-testid="follow-back" onClick={() => void social.follow(n.from)}>Follow back</button>
            )}
          </motion.li>
        ))}
      </AnimatePresence>
    </ul>
  );
}

function Empty({ children }: { children: ReactNode }) {
  return <motion.p className="empty muted" initial={{ opacity: 0 }} animate={{ opacity: 1 }}>{children}</motion.p>;
}

// The signed-in screen: header, tabs with unread counts, the error toast and the open tab.
import { AnimatePresence, motion } from "motion/react";
import { useEffect, useState } from "react";
import { unreadCount } from "../conversations";
import { type State, Social, useSocial } from "../store";
import { Home } from "./Home";
import { Messages } from "./Messages";
import { Notes } from "./Notes";
import { People } from "./People";
import { Avatar, ConnectionPill, Logo, spring } from "./ui";

type Tab = "home" | "people" | "messages" | "notes";

function unreadMessages(s: State): number {
  return Object.values(s.convs).reduce((sum, c) => sum + unreadCount(c, s.me), 0);
}

function unreadNotes(s: State): number {
  return s.notes.filter((n) => n.seq > s.notesReadSeq && n.from !== s.me && !n.quiet).length;
}

export function Shell({ social, onSignOut }: { social: Social; onSignOut: () => void }) {
  const s = useSocial(social);
  const [tab, setTab] = useState<Tab>("home");
  const [conv, setConv] = useState<string | null>(null);
  useEffect(() => { if (tab === "notes") social.markNotesRead(); }, [tab, s.notes, social]);
  const openChat = (c: string) => { setConv(c); setTab("messages"); };
  const tabs: Array<[Tab, string, number]> = [["home", "Home", 0], ["people", "People", 0],
    ["messages", "Messages", unreadMessages(s)], ["notes", "Notes", unreadNotes(s)]];
  return (
    <motion.div className="shell" initial={{ opacity: 0 }} animate={{ opacity: 1 }} exit={{ opacity: 0 }}>
      <header className="top">
        <Logo />
        <ConnectionPill state={s} />
        <div className="me">
          <Avatar user={s.me} status={s.conn === "online" ? "online" : "offline"} />
          <span data-testid="me">{s.me}</span>
          <button data-testid="sign-out" className="ghost" onClick={onSignOut}>Sign out</button>
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
                <motion.span key="badge" data-testid="unread" className="badge" initial={{ scale: 0 }}
                  animate={{ scale: 1 }} exit={{ scale: 0 }} transition={spring}>{badge}</motion.span>
              )}
            </AnimatePresence>
          </button>
        ))}
      </nav>
      <AnimatePresence>
        {s.error && (
          <motion.div data-testid="toast" className="toast" initial={{ y: -12, opacity: 0 }}
            animate={{ y: 0, opacity: 1 }} exit={{ opacity: 0 }} onClick={() => social.clearError()}>
            {s.error} ✕
          </motion.div>
        )}
      </AnimatePresence>
      <AnimatePresence mode="wait">
        <motion.main key={tab} className="content" initial={{ opacity: 0, y: 8 }}
          animate={{ opacity: 1, y: 0 }} exit={{ opacity: 0, y: -8 }} transition={{ duration: 0.16 }}>
          {tab === "home" && <Home s={s} social={social} />}
          {tab === "people" && <People s={s} social={social} onMessage={openChat} />}
          {tab === "messages" && <Messages s={s} social={social} conv={conv} onConv={setConv} />}
          {tab === "notes" && <Notes s={s} social={social} />}
        </motion.main>
      </AnimatePresence>
    </motion.div>
  );
}

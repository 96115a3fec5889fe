// Notes: follows, likes of my posts and changes of my groups, newest first.
import { AnimatePresence, motion } from "motion/react";
import { type NoteView, type State, Social, presenceOf } from "../store";
import { Avatar, Empty, ago, spring } from "./ui";

function says(n: NoteView): string {
  if (n.kind === "follow") return "followed you";
  if (n.kind === "like") return "liked your post";
  return n.text ?? n.kind;
}

export function Notes({ s, social }: { s: State; social: Social }) {
  if (s.notes.length === 0) return <Empty>No notes yet: follows, likes of your posts and your groups show up here.</Empty>;
  return (
    <ul className="column notes">
      <AnimatePresence initial={false}>
        {s.notes.map((n) => (
          <motion.li layout key={n.id} data-testid="note" data-kind={n.kind} className="card note"
            initial={{ opacity: 0, y: -10 }} animate={{ opacity: 1, y: 0 }} transition={spring}>
            <Avatar user={n.from} status={n.from === s.me ? undefined : presenceOf(s, n.from)} />
            <div className="grow">
              {n.kind === "group" ? <span>{says(n)}</span> : <span><b>{n.from}</b> {says(n)}</span>}
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

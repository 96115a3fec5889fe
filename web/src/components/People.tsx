// People: follow someone by name (the name checked as typed, and against presence before a
// follow), and everyone I follow, who follows me or whom I talk with.
import { AnimatePresence, motion } from "motion/react";
import { type FormEvent, useState } from "react";
import { nameProblem } from "../names";
import { dmConv } from "../peernet";
import { type State, Social, peopleOf, presenceOf } from "../store";
import { Avatar, Empty, spring } from "./ui";

export function People({ s, social, onMessage }: { s: State; social: Social; onMessage: (conv: string) => void }) {
  const people = peopleOf(s);
  return (
    <section className="column">
      <FollowBox s={s} social={social} />
      {people.length === 0 && <Empty>Nobody here yet. Follow someone by name to begin.</Empty>}
      <ul className="people">
        <AnimatePresence initial={false}>
          {people.map((u) => <Person key={u} user={u} s={s} social={social} onMessage={onMessage} />)}
        </AnimatePresence>
      </ul>
    </section>
  );
}

function FollowBox({ s, social }: { s: State; social: Social }) {
  const [user, setUser] = useState("");
  const [checking, setChecking] = useState(false);
  const [unseen, setUnseen] = useState<string | null>(null);
  const problem = nameProblem(user, s.me) ?? (s.following[user] ? `you already follow ${user}` : null);
  const follow = async (name: string, checked: boolean) => {
    if (!checked) {
      setChecking(true);
      const seen = await social.seenRecently(name);
      setChecking(false);
      // Presence is all the API tells of a name: never seen (or not for 30 days) is said so.
      if (seen === false) return setUnseen(name);
    }
    setUnseen(null);
    setUser("");
    void social.follow(name);
  };
  const submit = (e: FormEvent) => {
    e.preventDefault();
    if (user && !problem && !checking) void follow(user, false);
  };
  return (
    <form className="card follow-box" onSubmit={submit}>
      <div className="row">
        <input data-testid="follow-user" placeholder="follow someone by user name" value={user}
          onChange={(e) => { setUser(e.target.value.toLowerCase().trim()); setUnseen(null); }} />
        <motion.button data-testid="follow-go" disabled={!user || !!problem || checking}
          whileTap={{ scale: 0.95 }}>Follow</motion.button>
      </div>
      {problem && <p data-testid="follow-hint" className="hint">{problem}</p>}
      {unseen && (
        <p data-testid="follow-unseen" className="hint warn">
          No one called {unseen} has been on PeerNet in the last 30 days.{" "}
          <button type="button" data-testid="follow-anyway" className="link"
            onClick={() => void follow(unseen, true)}>Follow anyway</button>
        </p>
      )}
    </form>
  );
}

function Person({ user, s, social, onMessage }:
  { user: string; s: State; social: Social; onMessage: (conv: string) => void }) {
  const on = !!s.following[user];
  const status = presenceOf(s, user);
  return (
    <motion.li layout data-testid="person" data-user={user} className="card person"
      initial={{ opacity: 0, x: -12 }} animate={{ opacity: 1, x: 0 }} transition={spring}>
      <Avatar user={user} status={status} />
      <div className="grow">
        <b>{user}</b>
        <div className="muted small">
          {[s.followers[user] ? "follows you" : "", status === "online" ? "online" : ""].filter(Boolean).join(" · ")}
        </div>
      </div>
      <motion.button data-testid="follow-toggle" className={on ? "ghost" : ""} whileTap={{ scale: 0.93 }}
        onClick={() => void social.follow(user, !on)}>{on ? "Following" : "Follow"}</motion.button>
      <button data-testid="message" className="ghost" onClick={() => onMessage(dmConv(s.me, user))}>Message</button>
    </motion.li>
  );
}

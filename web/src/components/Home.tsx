// The home feed: the post box (its draft kept, Ctrl/Cmd+Enter posts) and the posts with likes.
import { AnimatePresence, motion } from "motion/react";
import { type FormEvent, type KeyboardEvent, useEffect, useRef, useState } from "react";
import type { Post } from "../peernet";
import { type State, Social, presenceOf } from "../store";
import { Avatar, Counter, Empty, ago, sendable, spring } from "./ui";

const DRAFT = "post";

export function Home({ s, social }: { s: State; social: Social }) {
  return (
    <section className="column">
      <Compose s={s} social={social} />
      {s.posts.length === 0 && <Empty>Your home feed is empty: follow people, or post something.</Empty>}
      <ul className="feed">
        <AnimatePresence initial={false}>
          {s.posts.map((p) => <PostCard key={p.id} post={p} s={s} social={social} />)}
        </AnimatePresence>
      </ul>
    </section>
  );
}

function Compose({ s, social }: { s: State; social: Social }) {
  const draft = s.drafts[DRAFT] ?? "";
  const [busy, setBusy] = useState(false);
  const ready = sendable(draft) && !busy && s.conn === "online";
  const submit = async (e?: FormEvent) => {
    e?.preventDefault();
    if (!ready) return;
    setBusy(true);
    try {
      await social.post(draft.trim());
      social.setDraft(DRAFT, "");
    } catch { /* shown as the error toast; the draft stays */ } finally {
      setBusy(false);
    }
  };
  const onKey = (e: KeyboardEvent) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) void submit(e);
  };
  return (
    <form className="card compose" onSubmit={submit}>
      <div className="grow">
        <textarea data-testid="compose" placeholder="What's happening?" rows={2} value={draft}
          onChange={(e) => social.setDraft(DRAFT, e.target.value)} onKeyDown={onKey} />
        <div className="compose-foot muted small">
          <span>Ctrl+Enter to post</span>
          <Counter text={draft} />
        </div>
      </div>
      <motion.button data-testid="post-btn" whileTap={{ scale: 0.95 }} disabled={!ready}>Post</motion.button>
    </form>
  );
}

function PostCard({ post, s, social }: { post: Post; s: State; social: Social }) {
  return (
    <motion.li layout data-testid="post" data-author={post.author} className="card post"
      initial={{ opacity: 0, y: -16, scale: 0.98 }} animate={{ opacity: 1, y: 0, scale: 1 }}
      exit={{ opacity: 0 }} transition={spring}>
      <Avatar user={post.author} status={post.author === s.me ? undefined : presenceOf(s, post.author)} />
      <div className="post-main">
        <div className="post-head"><b>{post.author}</b><span className="muted">{ago(post.ts)}</span></div>
        <p data-testid="post-body" className="body">{post.body}</p>
        <LikeButton liked={!!s.liked[post.id]} count={post.likes} onClick={() => void social.like(post)} />
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

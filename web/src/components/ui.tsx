// Small pieces every screen uses: the logo, avatars with a presence dot, the connection pill,
// empty states, the length counter of a text and relative times.
import { motion } from "motion/react";
import { type ReactNode, useEffect, useState } from "react";
import { MAX_BODY_CHARS, bodyLength } from "../peernet";
import type { State } from "../store";

export const spring = { type: "spring", stiffness: 500, damping: 34 } as const;

export function Logo() {
  return <h1 className="logo"><span className="logo-dot" />PeerNet</h1>;
}

function hue(user: string): number {
  let h = 0;
  for (const ch of user) h = (h * 31 + ch.charCodeAt(0)) % 360;
  return h;
}

/** `status` "unknown" (my own connection is down) draws a hollow dot: not a claim of offline. */
export function Avatar({ user, status }: { user: string; status?: string }) {
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

export function Empty({ children }: { children: ReactNode }) {
  return <motion.p className="empty muted" initial={{ opacity: 0 }} animate={{ opacity: 1 }}>{children}</motion.p>;
}

export function ago(ts: number): string {
  const s = Math.max(0, Math.round((Date.now() - ts) / 1000));
  if (s < 45) return "now";
  if (s < 3600) return `${Math.round(s / 60)}m`;
  if (s < 86400) return `${Math.round(s / 3600)}h`;
  return new Date(ts).toLocaleDateString();
}

/** Whether a text can be sent: not empty, not over the server's limit. */
export function sendable(text: string): boolean {
  const n = bodyLength(text.trim());
  return n > 0 && n <= MAX_BODY_CHARS;
}

/** The length of a text near or over the limit; over it, says that it will not be sent. */
export function Counter({ text }: { text: string }) {
  const n = bodyLength(text.trim());
  if (n < MAX_BODY_CHARS * 0.9) return null;
  const over = n > MAX_BODY_CHARS;
  return (
    <span data-testid="counter" data-over={over} className={over ? "counter over" : "counter"}>
      {n.toLocaleString("en")} / {MAX_BODY_CHARS.toLocaleString("en")}
      {over && ` · ${(n - MAX_BODY_CHARS).toLocaleString("en")} too many to send`}
    </span>
  );
}

export function ConnectionPill({ state }: { state: State }) {
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

import { motion } from "motion/react";
import { type FormEvent, useState } from "react";
import { USER_ID } from "../peernet";
import { Logo } from "./ui";

export function SignIn({ onSignIn }: { onSignIn: (user: string) => void }) {
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

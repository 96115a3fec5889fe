// The app: the sign-in screen, or the signed-in user's shell over one Social store.
import { AnimatePresence } from "motion/react";
import { useEffect, useState } from "react";
import { Shell } from "./components/Shell";
import { SignIn } from "./components/SignIn";
import { signedIn } from "./storage";
import { Social } from "./store";

const SERVER = new URLSearchParams(location.search).get("server") ?? location.origin;

export function App() {
  const [me, setMe] = useState<string | null>(() => signedIn.get());
  const [social, setSocial] = useState<Social | null>(null);
  useEffect(() => {
    if (!me) return;
    const s = new Social(SERVER, me);
    setSocial(s);
    return () => { s.stop(); setSocial(null); };
  }, [me]);
  const signOut = () => {
    social?.signOut();
    signedIn.clear();
    setMe(null);
  };
  const signIn = (user: string) => {
    signedIn.set(user);
    setMe(user);
  };
  return (
    <AnimatePresence mode="wait">
      {me && social ? (
        <Shell key={social.client.user} social={social} onSignOut={signOut} />
      ) : me ? null : (
        <SignIn key="signin" onSignIn={signIn} />
      )}
    </AnimatePresence>
  );
}

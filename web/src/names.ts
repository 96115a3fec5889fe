// User names typed into the app's boxes, checked as the protocol defines user ids.
import { USER_ID } from "./peernet";

/** What is wrong with a name typed into a user box, or null. */
export function nameProblem(user: string, me: string): string | null {
  if (!user) return null;
  if (!USER_ID.test(user)) return "a user name is 1 to 32 of a to z, 0 to 9 and _";
  if (user === me) return "that is you";
  return null;
}

/** Names typed into one box, split at commas and spaces, each checked. */
export function names(text: string, me: string): { users: string[]; problem: string | null } {
  const users = [...new Set(text.toLowerCase().split(/[\s,]+/).filter(Boolean))];
  const bad = users.map((u) => [u, nameProblem(u, me)] as const).find(([, p]) => p);
  return { users, problem: bad ? `${bad[0]}: ${bad[1]}` : null };
}

// What this browser keeps for a signed-in user, none of it server truth: drafts and which notes
// were looked at. Every key is under `peernet:USER:`, so that signing out removes all of it.
const PREFIX = "peernet:";
/** Keys of earlier versions that copied server truth (now read from the server): dropped. */
const RETIRED = ["liked", "following", "people"];

export class UserStorage {
  private readonly prefix: string;

  constructor(user: string) {
    this.prefix = `${PREFIX}${user}:`;
    for (const name of RETIRED) this.remove(name);
  }

  load<T>(name: string, fallback: T): T {
    try {
      const raw = localStorage.getItem(this.prefix + name);
      return raw === null ? fallback : (JSON.parse(raw) as T);
    } catch {
      return fallback;
    }
  }

  save(name: string, value: unknown): void {
    try {
      localStorage.setItem(this.prefix + name, JSON.stringify(value));
    } catch { /* private mode or full: kept in memory only */ }
  }

  remove(name: string): void {
    try { localStorage.removeItem(this.prefix + name); } catch { /* nothing stored */ }
  }

  /** Everything this user left in the browser (on sign-out). */
  clear(): void {
    try {
      const keys = Array.from({ length: localStorage.length }, (_, i) => localStorage.key(i) ?? "");
      keys.filter((k) => k.startsWith(this.prefix)).forEach((k) => localStorage.removeItem(k));
      sessionStorage.clear();
    } catch { /* nothing stored */ }
  }
}

/** The user signed in on this browser, remembered across reloads. */
export const signedIn = {
  get: (): string | null => { try { return localStorage.getItem(`${PREFIX}user`); } catch { return null; } },
  set: (user: string) => { try { localStorage.setItem(`${PREFIX}user`, user); } catch { /* memory only */ } },
  clear: () => { try { localStorage.removeItem(`${PREFIX}user`); } catch { /* nothing stored */ } },
};

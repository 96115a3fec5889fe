// End-to-end test of the web client in headless Chromium (Debian's /usr/bin/chromium, driven by
// playwright-core; nothing downloads a browser). Usage: node web/e2e/run.mjs http://127.0.0.1:8000
// Two users in two browser contexts follow each other, see each other online, post and like,
// chat with typing and delivery ticks; one loses the network, messages are sent both ways
// meanwhile, and after it comes back each side has every message exactly once, in one order.
// Exit 0 when all passed. Environment: CHROMIUM (default /usr/bin/chromium);
// PEERNET_E2E_ARTIFACTS, the screenshots' folder, emptied first (default test-artifacts/web);
// PEERNET_E2E_STEP_MS, one step's timeout (30 s); PEERNET_E2E_TOTAL_MS, the whole run's (170 s).
import { mkdirSync, rmSync } from "node:fs";
import { join } from "node:path";
import { chromium } from "playwright-core";

const url = process.argv[2];
if (!url) {
  console.error("usage: node web/e2e/run.mjs <server url>");
  process.exit(2);
}
const artifacts = process.env.PEERNET_E2E_ARTIFACTS ?? "test-artifacts/web";
const STEP_MS = Number(process.env.PEERNET_E2E_STEP_MS ?? 30_000);
const TOTAL_MS = Number(process.env.PEERNET_E2E_TOTAL_MS ?? 170_000);
rmSync(artifacts, { recursive: true, force: true });
mkdirSync(artifacts, { recursive: true });

const t0 = Date.now();
const log = (msg) => console.log(`e2e ${((Date.now() - t0) / 1000).toFixed(1).padStart(6)}s  ${msg}`);
const guard = setTimeout(() => {
  console.error(`e2e: the whole run took more than ${TOTAL_MS / 1000}s`);
  process.exit(1);
}, TOTAL_MS);

const run = Date.now().toString(36);
const alice = `alice_${run}`;
const bob = `bob_${run}`;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  headless: true,
  // This machine's network is closed: no background fetches, no component updates, no QUIC.
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const pageErrors = [];
log("chromium started");

async function open(user) {
  const context = await browser.newContext({ viewport: { width: 1000, height: 640 }, deviceScaleFactor: 1 });
  context.setDefaultTimeout(STEP_MS);
  const page = await context.newPage();
  page.on("pageerror", (err) => pageErrors.push(`${user}: ${err.stack ?? err.message}`));
  page.on("console", (msg) => { if (msg.type() === "error") console.log(`  [${user} console] ${msg.text()}`); });
  await page.goto(url);
  await page.getByTestId("signin-user").fill(user);
  await page.getByTestId("signin-go").click();
  await page.locator('[data-testid="conn"][data-state="online"]').waitFor();
  return { user, context, page };
}

async function shot(who, name) {
  await who.page.screenshot({ path: join(artifacts, `${name}.png`) });
}

/** Poll fn until it returns a truthy value; fail with what it last saw. */
async function until(what, fn, timeout = STEP_MS) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    last = await fn();
    if (last && (last === true || last.ok !== false)) return last;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}; last saw ${JSON.stringify(last)}`);
    await new Promise((r) => setTimeout(r, 150));
  }
}

const tab = (who, name) => who.page.getByTestId(`tab-${name}`).click();
const person = (who, user) => who.page.locator(`[data-testid="person"][data-user="${user}"]`);
const connState = (who) => who.page.getByTestId("conn").getAttribute("data-state");
const chatLines = (who) => who.page.locator('[data-testid="line"]').evaluateAll((els) =>
  els.map((el) => ({ body: el.querySelector('[data-testid="line-body"]').textContent,
    mine: el.dataset.mine === "true", status: el.dataset.status })));

async function follow(who, user) {
  await tab(who, "people");
  await who.page.getByTestId("follow-user").fill(user);
  await who.page.getByTestId("follow-go").click();
  await person(who, user).getByTestId("follow-toggle").filter({ hasText: "Following" }).waitFor();
}

async function openChat(who, user) {
  await tab(who, "people");
  await person(who, user).getByTestId("message").click();
  await who.page.locator(`[data-testid="chat"][data-peer="${user}"]`).waitFor();
}

async function say(who, body) {
  await who.page.getByTestId("dm-input").fill(body);
  await who.page.getByTestId("dm-send").click();
}

let A;
let B;
try {
  A = await open(alice);
  B = await open(bob);
  log(`signed in as ${alice} and ${bob}`);

  // Follow each other; each sees the other online and a follow note with an unread count.
  await follow(A, bob);
  await follow(B, alice);
  await person(A, bob).locator('[data-testid="dot"][data-status="online"]').waitFor();
  await person(B, alice).locator('[data-testid="dot"][data-status="online"]').waitFor();
  log("following each other, both online");
  await until("alice's unread note count", async () =>
    (await A.page.getByTestId("tab-notes").getByTestId("unread").textContent().catch(() => "")) === "1");
  await tab(A, "notes");
  await A.page.locator(`[data-testid="note"][data-kind="follow"]`).filter({ hasText: bob }).waitFor();
  await A.page.getByTestId("tab-notes").getByTestId("unread").waitFor({ state: "detached" });
  log("follow note seen, unread count cleared");

  // A post reaches the follower live; the follower likes it and the author sees the like.
  await tab(A, "home");
  await tab(B, "home");
  const postBody = `First light over the harbour (${run})`;
  await A.page.getByTestId("compose").fill(postBody);
  await A.page.getByTestId("post-btn").click();
  const bobsView = B.page.getByTestId("post").filter({ hasText: postBody });
  await bobsView.waitFor();
  log("the post arrived in bob's feed");
  await bobsView.getByTestId("like").click();
  await bobsView.locator('[data-testid="like"][data-liked="true"]').waitFor();
  const alicesView = A.page.getByTestId("post").filter({ hasText: postBody });
  await until("the like on alice's post", async () =>
    (await alicesView.getByTestId("likes").getAttribute("data-count")) === "1");
  await until("alice's like note", async () =>
    (await A.page.getByTestId("tab-notes").getByTestId("unread").textContent().catch(() => "")) === "1");
  log("liked; alice sees 1 like and a note");
  await A.page.waitForTimeout(600); // let the like animation settle for the picture
  await shot(A, "01-alice-home-feed");

  // Chat with typing and ticks.
  await openChat(A, bob);
  await openChat(B, alice);
  await A.page.getByTestId("dm-input").pressSequentially("hi bo", { delay: 40 });
  await B.page.getByTestId("typing").waitFor();
  log("bob sees alice typing");
  await shot(B, "02-bob-sees-typing");
  await A.page.getByTestId("dm-input").pressSequentially("b!", { delay: 40 });
  await A.page.getByTestId("dm-send").click();
  await until("alice's first message delivered", async () => {
    const lines = await chatLines(A);
    return lines.length === 1 && lines[0].status === "delivered" ? true : { ok: false, lines };
  });
  await B.page.locator('[data-testid="line"]').filter({ hasText: "hi bob!" }).waitFor();
  await B.page.getByTestId("typing").waitFor({ state: "detached" });
  await say(B, "hey alice, how are you?");
  await A.page.locator('[data-testid="line"]').filter({ hasText: "hey alice" }).waitFor();
  log("messages both ways, delivered ticks on both");

  // Bob's network drops. Both keep writing; nothing may be lost.
  await B.context.setOffline(true);
  await until("bob's connection state leaving online", async () => (await connState(B)) !== "online");
  log(`bob is cut off (state ${await connState(B)})`);
  const whileAway = ["are you there?", "the ferry is late", "call me when you land"];
  for (const body of whileAway) await say(A, body);
  await say(B, "written in the tunnel");
  await until("alice's messages delivered while bob is away", async () => {
    const lines = await chatLines(A);
    return lines.filter((l) => l.mine && l.status === "delivered").length === 1 + whileAway.length
      ? true : { ok: false, lines };
  });
  await until("bob's offline message waiting", async () => {
    const lines = await chatLines(B);
    return lines.some((l) => l.body === "written in the tunnel" && l.status === "pending")
      ? true : { ok: false, lines };
  });
  await until("bob shown offline to alice", async () =>
    (await A.page.locator('[data-testid="chat"] [data-testid="dot"]').getAttribute("data-status")) === "offline",
  // Bob's client closes its socket when the browser goes offline; were the close lost, the
  // server would still drop the silent connection after 2 x heartbeat (30 s on the test server).
  40_000);
  log("alice sees bob offline");
  await shot(B, "03-bob-offline");

  await B.context.setOffline(false);
  await B.page.locator('[data-testid="conn"][data-state="online"]').waitFor();
  log("bob is back online");
  const expected = ["hi bob!", "hey alice, how are you?", ...whileAway, "written in the tunnel"];
  const settled = async (who) => until(`${who.user}'s conversation complete`, async () => {
    const lines = await chatLines(who);
    const bodies = lines.map((l) => l.body);
    const complete = expected.every((b) => bodies.filter((x) => x === b).length === 1)
      && lines.length === expected.length && lines.every((l) => !l.mine || l.status === "delivered");
    return complete ? lines : { ok: false, lines };
  });
  const [linesA, linesB] = await Promise.all([settled(A), settled(B)]);
  const orderA = linesA.map((l) => l.body).join(" | ");
  const orderB = linesB.map((l) => l.body).join(" | ");
  if (orderA !== orderB) throw new Error(`the two sides disagree on the order:\n  A: ${orderA}\n  B: ${orderB}`);
  await person(A, bob).count(); // still rendered
  await until("bob shown online again to alice", async () =>
    (await A.page.locator('[data-testid="chat"] [data-testid="dot"]').getAttribute("data-status")) === "online");
  log(`no message lost, one order on both sides: ${orderA}`);
  await shot(A, "04-alice-chat-after-reconnect");
  await shot(B, "05-bob-chat-after-reconnect");

  if (pageErrors.length) throw new Error(`uncaught errors in the pages:\n  ${pageErrors.join("\n  ")}`);
  log("passed");
} catch (err) {
  console.error(`e2e FAILED: ${err?.stack ?? err}`);
  if (pageErrors.length) console.error(`uncaught errors in the pages:\n  ${pageErrors.join("\n  ")}`);
  for (const who of [A, B].filter(Boolean)) {
    await who.page.screenshot({ path: join(artifacts, `failure-${who.user.split("_")[0]}.png`) }).catch(() => {});
  }
  process.exitCode = 1;
} finally {
  clearTimeout(guard);
  await browser.close();
}

// End-to-end test of the web client in headless Chromium (Debian's /usr/bin/chromium, driven by
// playwright-core; nothing downloads a browser). Usage: node web/e2e/run.mjs http://127.0.0.1:8000
// Three users: alice on a desktop window (and later on a second device, another browser
// context), bob, and carol on a phone-sized window (390 px). They follow each other (the Follow
// box's hints for a bad name and a name nobody uses), post (Ctrl+Enter) and like (like, unlike,
// like: the author sees 1 and one note), chat with typing and ticks (✓ sent, never ✓✓ for a
// user who does not exist), see unread counts on a new message (after a reload too), keep
// drafts across tabs and reloads, refuse texts over 4,000 characters, lose nothing while one is
// offline (who then sees the other's presence as unknown, not offline), unfollow (the posts
// go at once), and chat in a group (typing, senders' names, membership changes, leaving).
// alice's second device then shows the same conversations, unread counts, follows and likes,
// and signing out there leaves nothing in the browser. Exit 0 when all passed.
// Environment: CHROMIUM (default /usr/bin/chromium); PEERNET_E2E_ARTIFACTS, the screenshots'
// folder, emptied first (default test-artifacts/web); PEERNET_E2E_STEP_MS, one step's timeout
// (30 s); PEERNET_E2E_TOTAL_MS, the whole run's (240 s).
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
const TOTAL_MS = Number(process.env.PEERNET_E2E_TOTAL_MS ?? 240_000);
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
const carol = `carol_${run}`;
const ghost = `ghost_${run}`;
const DESKTOP = { width: 1000, height: 700 };
// A server with read state (protocol 1.1, "Read state") lists conversations (401 without a
// token); one without answers 404, and then nothing can be "seen" and unread counts are derived.
const readState = (await fetch(`${url}/v1/conversations`)).status !== 404;
/** The server has it: ✓ sent, or ✓✓ seen once read receipts say so. */
const landed = (status) => status === "sent" || (readState && status === "seen");
const PHONE = { width: 390, height: 844 };

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  headless: true,
  // This machine's network is closed: no background fetches, no component updates, no QUIC.
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const pageErrors = [];
const everyone = [];
log("chromium started");

/** A browser context (a device) signed in as `user`; `name` tells two devices apart. */
async function open(user, { viewport = DESKTOP, name = user.split("_")[0] } = {}) {
  const context = await browser.newContext({ viewport, deviceScaleFactor: 1 });
  context.setDefaultTimeout(STEP_MS);
  const page = await context.newPage();
  page.on("pageerror", (err) => pageErrors.push(`${name}: ${err.stack ?? err.message}`));
  page.on("console", (msg) => { if (msg.type() === "error") console.log(`  [${name} console] ${msg.text()}`); });
  await page.goto(url);
  await page.getByTestId("signin-user").fill(user);
  await page.getByTestId("signin-go").click();
  await online({ page });
  const who = { user, name, context, page };
  everyone.push(who);
  return who;
}

const online = (who) => who.page.locator('[data-testid="conn"][data-state="online"]').waitFor();

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

function check(what, ok, saw) {
  if (!ok) throw new Error(`${what}; saw ${JSON.stringify(saw)}`);
}

const tab = (who, name) => who.page.getByTestId(`tab-${name}`).click();
const badge = (who, name) => who.page.getByTestId(`tab-${name}`).getByTestId("unread").textContent({ timeout: 200 })
  .catch(() => "");
const person = (who, user) => who.page.locator(`[data-testid="person"][data-user="${user}"]`);
const connState = (who) => who.page.getByTestId("conn").getAttribute("data-state");
const convRow = (who, title) => who.page.locator(`[data-testid="conv"][data-title="${title}"]`);
const chatLines = (who) => who.page.locator('[data-testid="line"]').evaluateAll((els) =>
  els.map((el) => ({ body: el.querySelector('[data-testid="line-body"]').textContent,
    mine: el.dataset.mine === "true", from: el.dataset.from, status: el.dataset.status })));
const line = (who, body) => who.page.locator('[data-testid="line"]').filter({ hasText: body });
const event = (who, text) => who.page.getByTestId("event").filter({ hasText: text });
/** The conversation list as {conv: unread}. */
const convList = (who) => who.page.getByTestId("conv").evaluateAll((els) =>
  Object.fromEntries(els.map((el) => [el.dataset.title, Number(el.dataset.unread)])));

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

async function openConv(who, title) {
  await tab(who, "messages");
  await convRow(who, title).click();
  await who.page.locator(`[data-testid="chat"]`).waitFor();
}

async function say(who, body) {
  await who.page.getByTestId("dm-input").fill(body);
  await who.page.getByTestId("dm-send").click();
}

async function post(who, body) {
  await tab(who, "home");
  await who.page.getByTestId("compose").fill(body);
  await who.page.getByTestId("compose").press("Control+Enter");
  await who.page.getByTestId("post").filter({ hasText: body }).waitFor();
  await until(`${who.name}'s post box emptied`, async () => (await who.page.getByTestId("compose").inputValue()) === "");
}

async function steps() {
  const A = await open(alice);
  const B = await open(bob);
  const C = await open(carol, { viewport: PHONE });
  log(`signed in as ${alice}, ${bob} and ${carol} (a phone); read state ${readState ? "on" : "not on this server"}`);

  // The Follow box: a hint for a name that cannot be one, a warning for one nobody uses.
  await tab(A, "people");
  await A.page.getByTestId("follow-user").fill("Bad Name!");
  await A.page.getByTestId("follow-hint").waitFor();
  check("Follow is disabled for a bad name", await A.page.getByTestId("follow-go").isDisabled(), "enabled");
  await A.page.getByTestId("follow-user").fill(`nobody_${run}`);
  await A.page.getByTestId("follow-go").click();
  await A.page.getByTestId("follow-unseen").waitFor();
  await shot(A, "01-follow-box-unknown-user");
  check("nobody was followed", await person(A, `nobody_${run}`).count() === 0, "followed");
  await A.page.getByTestId("follow-user").fill("");
  log("the Follow box hints at a bad name and warns of a name nobody uses");

  // Following: each sees the others online and the follow notes with an unread count.
  await follow(A, bob);
  await follow(B, alice);
  await follow(C, alice);
  await person(A, bob).locator('[data-testid="dot"][data-status="online"]').waitFor();
  await person(B, alice).locator('[data-testid="dot"][data-status="online"]').waitFor();
  await until("alice's unread note count", async () => (await badge(A, "notes")) === "2");
  await tab(A, "notes");
  await A.page.locator(`[data-testid="note"][data-kind="follow"]`).filter({ hasText: carol }).waitFor();
  await A.page.getByTestId("tab-notes").getByTestId("unread").waitFor({ state: "detached" });
  log("following each other, online, follow notes seen and the count cleared");

  // A post by Ctrl+Enter; bob likes, unlikes and likes again: alice sees 1 like and one note.
  const postBody = `First light over the harbour (${run})`;
  await tab(B, "home");
  await post(A, postBody);
  const bobsView = B.page.getByTestId("post").filter({ hasText: postBody });
  await bobsView.waitFor();
  for (const liked of ["true", "false", "true"]) {
    await bobsView.getByTestId("like").click();
    await bobsView.locator(`[data-testid="like"][data-liked="${liked}"]`).waitFor();
    await B.page.waitForTimeout(400);
  }
  const alicesView = A.page.getByTestId("post").filter({ hasText: postBody });
  await until("one like on alice's post", async () =>
    (await alicesView.getByTestId("likes").getAttribute("data-count")) === "1");
  await A.page.waitForTimeout(1500); // a second note, or a count that climbs, would show by now
  const likes = await alicesView.getByTestId("likes").getAttribute("data-count");
  check("like, unlike, like counts once", likes === "1", likes);
  check("one like note", (await badge(A, "notes")) === "1", await badge(A, "notes"));
  await tab(A, "notes");
  await A.page.locator('[data-testid="note"][data-kind="like"]').first().waitFor();
  const likeNotes = await A.page.locator('[data-testid="note"][data-kind="like"]').count();
  check("like, unlike, like notes once", likeNotes === 1, likeNotes);
  await tab(A, "home");
  await shot(A, "02-alice-home-feed");
  log("like, unlike, like: 1 like and one note for alice");

  // Over 4,000 characters: a counter says so and nothing is sent. A draft survives a tab switch.
  await A.page.getByTestId("compose").fill("x".repeat(4001));
  await A.page.locator('[data-testid="counter"][data-over="true"]').waitFor();
  check("Post is disabled over 4,000 characters", await A.page.getByTestId("post-btn").isDisabled(), "enabled");
  await shot(A, "03-post-over-the-limit");
  const half = `half-written thought (${run})`;
  await A.page.getByTestId("compose").fill(half);
  await tab(A, "people");
  await tab(A, "home");
  check("the post draft kept across tabs", (await A.page.getByTestId("compose").inputValue()) === half,
    await A.page.getByTestId("compose").inputValue());
  log("a text over the limit is refused with a counter; the draft stays across tabs");

  // A new message is flagged on the Messages tab and its conversation, after a reload too.
  await B.page.getByTestId("post").first().waitFor();
  await openChat(B, alice);
  await say(B, "hi alice");
  await until("alice's Messages tab flags the new message", async () => (await badge(A, "messages")) === "1");
  await A.page.reload();
  await online(A);
  check("the post draft kept across a reload", (await A.page.getByTestId("compose").inputValue()) === half,
    await A.page.getByTestId("compose").inputValue());
  await until("the unread message still flagged after a reload", async () => (await badge(A, "messages")) === "1");
  await tab(A, "messages");
  await convRow(A, bob).getByTestId("conv-unread").filter({ hasText: "1" }).waitFor();
  await shot(A, "04-alice-unread-message");
  await convRow(A, bob).click();
  await A.page.getByTestId("tab-messages").getByTestId("unread").waitFor({ state: "detached" });
  log("the new message is flagged (tab and conversation), after a reload too; opening it clears it");

  // A message draft per conversation survives a tab switch.
  await A.page.getByTestId("dm-input").fill("a reply I am still thinking about");
  await tab(A, "home");
  await tab(A, "messages");
  check("the message draft kept", (await A.page.getByTestId("dm-input").inputValue()) === "a reply I am still thinking about",
    await A.page.getByTestId("dm-input").inputValue());
  await A.page.getByTestId("dm-input").fill("");

  // Typing and ticks: ✓ once the server has it.
  await A.page.getByTestId("dm-input").pressSequentially("hi bo", { delay: 40 });
  await B.page.getByTestId("typing").waitFor();
  await shot(B, "05-bob-sees-typing");
  await A.page.getByTestId("dm-input").pressSequentially("b!", { delay: 40 });
  await A.page.getByTestId("dm-send").click();
  await until("alice's message sent", async () => {
    const lines = await chatLines(A);
    return lines.some((l) => l.body === "hi bob!" && landed(l.status)) ? true : { ok: false, lines };
  });
  await line(B, "hi bob!").waitFor();
  if (readState) {
    // Bob has the conversation open: he read it, and alice sees so.
    await line(A, "hi bob!").and(A.page.locator('[data-status="seen"]')).waitFor();
    await A.page.getByTestId("seen-by").waitFor();
    log("bob read it: ✓✓ and Seen under it for alice");
  }
  await B.page.getByTestId("typing").waitFor({ state: "detached" });
  await say(B, "hey alice, how are you?");
  await line(A, "hey alice").waitFor();
  log("typing seen, messages both ways with ✓");

  // To a user who does not exist: ✓ sent, never more.
  await tab(A, "messages");
  await A.page.getByTestId("new-conv").click();
  await A.page.getByTestId("dm-to").fill(ghost);
  await A.page.getByTestId("dm-open").click();
  await A.page.locator(`[data-testid="chat"][data-peer="${ghost}"]`).waitFor();
  await say(A, "anyone there?");
  await line(A, "anyone there?").locator('[data-testid="tick"]').filter({ hasText: "✓" }).waitFor();
  await A.page.waitForTimeout(800);
  const ghostLines = await chatLines(A);
  check("a message to nobody is sent, not seen", ghostLines.length === 1 && ghostLines[0].status === "sent", ghostLines);
  await shot(A, "06-message-to-nobody-sent");
  await convRow(A, bob).click();
  log(`a message to ${ghost} shows ✓ sent only`);

  // Bob's network drops. Both keep writing; nothing may be lost; bob does not claim alice is offline.
  await B.context.setOffline(true);
  await until("bob's connection state leaving online", async () => (await connState(B)) !== "online");
  const whileAway = ["are you there?", "the ferry is late", "call me when you land"];
  for (const body of whileAway) await say(A, body);
  await say(B, "written in the tunnel");
  await until("alice's messages sent while bob is away", async () => {
    const lines = await chatLines(A);
    return whileAway.every((b) => lines.some((l) => l.body === b && l.status === "sent")) ? true : { ok: false, lines };
  });
  await until("bob's offline message waiting", async () => {
    const lines = await chatLines(B);
    return lines.some((l) => l.body === "written in the tunnel" && l.status === "pending") ? true : { ok: false, lines };
  });
  const alicesStatus = await B.page.getByTestId("peer-status").getAttribute("data-status");
  check("offline bob shows alice's presence as unknown, not offline", alicesStatus === "unknown", alicesStatus);
  await until("bob shown offline to alice", async () =>
    (await A.page.locator('[data-testid="chat"] [data-testid="dot"]').getAttribute("data-status")) === "offline",
  // Bob's client closes its socket when the browser goes offline; were the close lost, the
  // server would still drop the silent connection after 2 x heartbeat (30 s on the test server).
  40_000);
  await shot(B, "07-bob-offline");
  await B.context.setOffline(false);
  await online(B);
  await say(A, "glad you're back");
  const expected = ["hi alice", "hi bob!", "hey alice, how are you?", ...whileAway, "written in the tunnel",
    "glad you're back"];
  const settled = async (who) => until(`${who.name}'s conversation complete`, async () => {
    const lines = await chatLines(who);
    const bodies = lines.map((l) => l.body);
    const complete = expected.every((b) => bodies.filter((x) => x === b).length === 1)
      && lines.length === expected.length && lines.every((l) => !l.mine || landed(l.status));
    return complete ? lines : { ok: false, lines };
  });
  const [linesA, linesB] = await Promise.all([settled(A), settled(B)]);
  const orderA = linesA.map((l) => l.body).join(" | ");
  const orderB = linesB.map((l) => l.body).join(" | ");
  check("one order on both sides", orderA === orderB, { A: orderA, B: orderB });
  await until("bob shown online again to alice", async () =>
    (await A.page.locator('[data-testid="chat"] [data-testid="dot"]').getAttribute("data-status")) === "online");
  await shot(A, "08-alice-chat-after-reconnect");
  log(`no message lost, one order on both sides: ${orderA}`);

  // Carol posts from her phone; alice follows and likes it. Bob posts; alice unfollows him and
  // his posts leave her feed at once.
  const carolsPost = `Sunrise from the ferry (${run})`;
  const bobsPost = `Bob's harbour notes (${run})`;
  await post(C, carolsPost);
  await post(B, bobsPost);
  await tab(A, "home");
  await A.page.getByTestId("post").filter({ hasText: bobsPost }).waitFor();
  await follow(A, carol);
  await tab(A, "home");
  const carolsView = A.page.getByTestId("post").filter({ hasText: carolsPost });
  await carolsView.getByTestId("like").click();
  await carolsView.locator('[data-testid="like"][data-liked="true"]').waitFor();
  await tab(A, "people");
  await person(A, bob).getByTestId("follow-toggle").filter({ hasText: "Following" }).click();
  await person(A, bob).getByTestId("follow-toggle").filter({ hasText: "Follow" }).waitFor();
  await tab(A, "home");
  await carolsView.waitFor();
  await A.page.locator(`[data-testid="post"][data-author="${bob}"]`).first().waitFor({ state: "detached" });
  log("alice follows carol and likes her post; unfollowing bob takes his posts out of the feed at once");

  // A group: alice creates it with bob, adds carol; typing, senders' names, membership changes.
  const trip = `Trip ${run}`;
  await tab(A, "messages");
  await A.page.getByTestId("new-conv").click();
  await A.page.getByTestId("group-title").fill(trip);
  await A.page.getByTestId("group-members").fill(`${bob}, no-such-name!`);
  await A.page.getByTestId("group-hint").waitFor();
  await A.page.getByTestId("group-members").fill(bob);
  await A.page.getByTestId("group-create").click();
  await event(A, `you created “${trip}”`).waitFor();
  await openConv(B, trip);
  await event(B, `${alice} created “${trip}”`).waitFor();
  await A.page.getByTestId("group-manage").click();
  await A.page.getByTestId("member-add").fill(carol);
  await A.page.getByTestId("member-add-go").click();
  await event(A, `you added ${carol}`).waitFor();
  await event(B, `${alice} added ${carol}`).waitFor();
  await A.page.getByTestId("group-manage").click();
  await openConv(C, trip);
  await event(C, `${alice} added you`).waitFor();
  // On the phone the open conversation takes the screen, with a way back to the list.
  await C.page.getByTestId("conv").first().waitFor({ state: "hidden" });
  await C.page.getByTestId("chat-back").waitFor();
  log("a group of three, every member sees its membership changes");
  await C.page.getByTestId("dm-input").pressSequentially("hello gr", { delay: 40 });
  await A.page.getByTestId("typing").filter({ hasText: carol }).waitFor();
  await B.page.getByTestId("typing").filter({ hasText: carol }).waitFor();
  await shot(B, "09-group-typing");
  await C.page.getByTestId("dm-input").pressSequentially("oup", { delay: 40 });
  await C.page.getByTestId("dm-send").click();
  await line(A, "hello group").waitFor();
  await line(B, "hello group").waitFor();
  await say(B, "hi all");
  await say(A, "welcome, both");
  for (const who of [A, B, C]) {
    await until(`${who.name} has the group's three messages, with senders`, async () => {
      const lines = await chatLines(who);
      const got = lines.map((l) => `${l.from}: ${l.body}`).join(" | ");
      const want = [`${carol}: hello group`, `${bob}: hi all`, `${alice}: welcome, both`].join(" | ");
      return got === want ? true : { ok: false, got };
    });
  }
  if (readState) {
    // Bob and carol have the group open: alice's message is seen by both.
    await until("alice's group message seen by bob and carol", async () => {
      const seen = await A.page.getByTestId("seen-by").allTextContents();
      return seen.some((t) => t.includes(bob) && t.includes(carol)) ? true : { ok: false, seen };
    });
  }
  const names = await A.page.getByTestId("line-from").allTextContents();
  check("senders' names shown in the group", names.includes(carol) && names.includes(bob), names);
  await shot(A, "10-alice-group-chat");
  await shot(C, "11-carol-group-chat-phone");
  log("group chat: typing, one order for all, senders' names");

  // Carol writes once more while alice looks elsewhere, then leaves.
  await A.page.getByTestId("new-conv").click();
  await tab(A, "home");
  await say(C, "one more thing before I go");
  await until("alice's Messages tab flags the group message", async () => (await badge(A, "messages")) === "1");
  await C.page.getByTestId("group-manage").click();
  await C.page.getByTestId("group-leave").click();
  await C.page.getByTestId("not-member").waitFor();
  await event(B, `${carol} left`).waitFor();
  log("carol left; alice has one unread group message");

  // The phone: every tab on the screen; the Notes tab opens.
  await tab(C, "notes");
  const box = await C.page.getByTestId("tab-notes").boundingBox();
  const width = await C.page.evaluate(() => document.documentElement.scrollWidth);
  check("the Notes tab within a 390 px screen", box && box.x + box.width <= PHONE.width && width <= PHONE.width,
    { box, width });
  await C.page.getByTestId("note").first().waitFor();
  await shot(C, "12-carol-notes-phone");
  log("at 390 px every tab fits and Notes opens");

  // alice's second device: the same conversations, unread counts, follows and likes.
  const A2 = await open(alice, { name: "alice-2" });
  await tab(A, "messages");
  const firstDevice = await until("alice's first device lists her three conversations", async () => {
    const list = await convList(A);
    return list[bob] === 0 && list[ghost] === 0 && list[trip] === 1 ? list : { ok: false, list };
  });
  await tab(A2, "messages");
  await until("the second device's conversations and unread counts", async () => {
    const second = await convList(A2);
    return JSON.stringify(Object.entries(second).sort()) === JSON.stringify(Object.entries(firstDevice).sort())
      ? true : { ok: false, second, firstDevice };
  });
  check("the second device's Messages count", (await badge(A2, "messages")) === "1", await badge(A2, "messages"));
  await shot(A2, "13-alice-second-device-messages");
  await tab(A2, "people");
  await person(A2, carol).getByTestId("follow-toggle").filter({ hasText: "Following" }).waitFor();
  await person(A2, bob).getByTestId("follow-toggle").filter({ hasText: /^Follow$/ }).waitFor();
  await tab(A2, "home");
  await A2.page.getByTestId("post").filter({ hasText: carolsPost })
    .locator('[data-testid="like"][data-liked="true"]').waitFor();
  check("bob's posts not in the second device's feed either",
    await A2.page.locator(`[data-testid="post"][data-author="${bob}"]`).count() === 0, "there");
  await openConv(A2, trip);
  await event(A2, `${carol} left`).waitFor();
  const members = await A2.page.getByTestId("group-members-shown").textContent();
  check("the group's members on the second device", members === `you, ${bob}`, members);
  await line(A2, "one more thing before I go").waitFor();
  await shot(A2, "14-alice-second-device-group");
  if (readState) {
    // Reading on the second device clears the count on the first.
    await tab(A, "messages");
    await until("the first device's group count cleared by the second's read", async () =>
      (await convList(A))[trip] === 0 && (await badge(A, "messages")) === "");
    log("a read on one device clears the unread count on the other");
  }
  log("the second device shows the same conversations, unread counts, follows and likes");

  // The owner adds and removes a member, then leaves: bob becomes the owner.
  await openConv(A, trip);
  await A.page.getByTestId("group-manage").click();
  await A.page.getByTestId("member-add").fill(carol);
  await A.page.getByTestId("member-add-go").click();
  await event(A, `you added ${carol}`).nth(1).waitFor();
  await A.page.locator(`[data-testid="member"][data-user="${carol}"]`).getByTestId("member-remove").click();
  await event(A, `you removed ${carol}`).waitFor();
  await event(B, `${alice} removed ${carol}`).waitFor();
  await A.page.getByTestId("group-leave").click();
  await A.page.getByTestId("not-member").waitFor();
  await event(B, `${alice} left · you are now the owner`).waitFor();
  await B.page.getByTestId("group-manage").click();
  await B.page.getByTestId("member-add").waitFor(); // the owner's controls
  await shot(B, "15-bob-owner-after-alice-left");
  log("added, removed, left: bob is the owner now");

  // Signing out leaves nothing of alice in that browser.
  await tab(A2, "home");
  await A2.page.getByTestId("compose").fill("a draft to forget");
  await A2.page.waitForTimeout(500);
  await A2.page.getByTestId("sign-out").click();
  await A2.page.getByTestId("signin-user").waitFor();
  const left = await A2.page.evaluate(() => Object.keys(localStorage).filter((k) => k.startsWith("peernet:")));
  check("nothing of alice left after sign-out", left.length === 0, left);
  log("signed out: the browser keeps nothing of alice");
}

try {
  await steps();
  if (pageErrors.length) throw new Error(`uncaught errors in the pages:\n  ${pageErrors.join("\n  ")}`);
  log("passed");
} catch (err) {
  console.error(`e2e FAILED: ${err?.stack ?? err}`);
  if (pageErrors.length) console.error(`uncaught errors in the pages:\n  ${pageErrors.join("\n  ")}`);
  for (const who of everyone) {
    await who.page.screenshot({ path: join(artifacts, `failure-${who.name}.png`) }).catch(() => {});
  }
  process.exitCode = 1;
} finally {
  clearTimeout(guard);
  await browser.close();
}

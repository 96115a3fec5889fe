"""The web client end to end: web/e2e/run.mjs drives three users in headless Chromium (Debian's
/usr/bin/chromium through playwright-core), one of them on two devices and one on a phone-sized
window, against a real `peernet serve` that serves the built bundle at /. Screenshots land in
test-artifacts/web/. ./dev test builds the bundle and installs Chromium first."""

from __future__ import annotations

import os
import shutil
import subprocess

import httpx
import pytest
from wsclient import Server

from peernet.config import PROJECT_ROOT

pytestmark = [pytest.mark.ray, pytest.mark.stack]

WEB = PROJECT_ROOT / "web"
ARTIFACTS = PROJECT_ROOT / "test-artifacts" / "web"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
RUN_TIMEOUT_S = 270  # run.mjs gives up by itself after 240 s


def _missing() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed (./dev test installs it)"
    if not (WEB / "node_modules" / "playwright-core").is_dir():
        return "web/node_modules is missing: run ./dev test, or (cd web && npm ci && npm run build)"
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is missing: ./dev test installs Debian's chromium"
    return None


def test_the_app_is_served_at_the_root_and_the_api_still_answers(peernet_server: Server) -> None:
    index = httpx.get(peernet_server.url + "/", timeout=10)
    assert index.status_code == 200, "web/dist was not built before the server started"
    assert '<div id="root">' in index.text
    asset = index.text.split('src="', 1)[1].split('"', 1)[0]
    script = httpx.get(peernet_server.url + asset, timeout=10)
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert httpx.get(peernet_server.url + "/healthz", timeout=10).json()["status"] == "ok"
    assert httpx.get(peernet_server.url + "/no/such/page", timeout=10).status_code == 404


def test_three_people_and_a_second_device_follow_like_chat_in_pairs_and_groups(
        peernet_server: Server) -> None:
    """Each problem a new user met is shown fixed in a browser (unread counts, ✓ sent only,
    like counts, the length limit, drafts, the Follow box, unfollowing, presence while offline,
    390 px, Ctrl+Enter, sign-out), then groups, and the second device shows what the first does."""
    missing = _missing()
    assert missing is None, missing
    env = {**os.environ, "CHROMIUM": CHROMIUM, "PEERNET_E2E_ARTIFACTS": str(ARTIFACTS)}
    try:
        run = subprocess.run(["node", str(WEB / "e2e" / "run.mjs"), peernet_server.url], cwd=PROJECT_ROOT,
                             env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the browser run took over {RUN_TIMEOUT_S}s:\n{exc.stdout}\n{exc.stderr}")
    output = f"{run.stdout}\n{run.stderr}"
    print(output)
    assert run.returncode == 0, (f"web e2e failed (screenshots in {ARTIFACTS}):\n{output}\n"
                                 f"--- server log ---\n{peernet_server.log_tail()}")

"""The Go feed-read probe (bench/go/feedprobe): built with the Go toolchain, then run against the
real PeerNet from the `peernet_url` fixture on readers that bench.feed_probe set up."""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def feedprobe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    go = shutil.which("go")
    assert go, "the Go toolchain (1.26 or newer) builds bench/go/feedprobe: see the README"
    binary = tmp_path_factory.mktemp("feedprobe") / "feedprobe"
    # -C: the probe is a module of its own, not of the repository's root.
    build = subprocess.run([go, "build", "-C", "bench/go/feedprobe", "-o", str(binary), "."], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, f"go build failed:\n{build.stdout}{build.stderr}"
    return binary


def set_up_readers(url: str, tag: str, readers: int, out: Path) -> None:
    """The Python probe's setup (users, follows, posts, settled feeds), with a one-second load."""
    setup = subprocess.run(
        [sys.executable, "-m", "bench.feed_probe", "--url", url, "--readers", str(readers),
         "--authors", "4", "--follows", "2", "--posts", "2", "--rate", "10", "--duration", "1",
         "--warmup", "0", "--via", "ws", "--run-tag", tag, "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert setup.returncode == 0, f"bench.feed_probe setup failed:\n{setup.stderr}"


@pytest.mark.ray
def test_the_go_probe_answers_every_read(feedprobe: Path, peernet_url: str, tmp_path: Path) -> None:
    tag = f"go{uuid.uuid4().hex[:8]}"
    set_up_readers(peernet_url, tag, 10, tmp_path)
    run = subprocess.run(
        [str(feedprobe), "--url", peernet_url, "--run-tag", tag, "--readers", "10", "--rate", "50",
         "--duration", "2", "--warmup", "0"],
        capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    (row,) = run.stdout.splitlines()
    cells = [c.strip() for c in row.strip().strip("|").split("|")]
    assert len(cells) == 13, row
    via, readers, rate, achieved, count, errors = cells[:6]
    assert (via, readers, rate) == ("ws-go", "10", "50")
    assert int(count) == 100 and int(errors) == 0
    assert abs(float(achieved) - 50) <= 0.2 * 50
    assert all(float(ms) >= 0 for ms in cells[6:])
    assert "| via | readers |" in run.stderr  # the Markdown header goes to stderr


def test_no_run_tag_exits_2(feedprobe: Path) -> None:
    run = subprocess.run([str(feedprobe), "--rate", "10"], capture_output=True, text=True, timeout=30)
    assert run.returncode == 2
    assert "--run-tag" in run.stderr

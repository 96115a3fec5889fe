"""`python -m bench.idle`: what a PeerNet server costs when nobody uses it, by kind of process,
from /proc (bench/probe.py's ServerProbe, scoped to the process tree serving `--port`, the
services found by their ports). Start the server, wait for it to settle (a minute), then:

    python -m bench.idle --port 8000 --seconds 30

The first two samples are dropped (the probe's own start)."""

from __future__ import annotations

import argparse
import asyncio

from bench.probe import PEERNET_CATEGORIES, ServerProbe


async def measure(port: int, seconds: float) -> list[tuple[str, int, float]]:
    """(category, processes, percent of one core), busiest first, then the total."""
    probe = ServerProbe(PEERNET_CATEGORIES, server_port=port)
    await probe.start()
    await asyncio.sleep(seconds)
    await probe.stop()
    samples = probe.samples[2:]
    if not samples:
        raise SystemExit("bench.idle: no samples: measure for longer (--seconds)")
    rows = []
    for category in sorted({c for s in samples for c in s.cpu}):
        mean = sum(s.cpu.get(category, 0.0) for s in samples) / len(samples)
        procs = max(s.procs.get(category, 0) for s in samples)
        rows.append((category, procs, mean))
    rows.sort(key=lambda r: -r[2])
    print(f"idle CPU over {seconds:.0f} s ({probe.scope_note})")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8000, help="the server's port (default 8000)")
    ap.add_argument("--seconds", type=float, default=30.0)
    args = ap.parse_args()
    rows = asyncio.run(measure(args.port, args.seconds))
    for category, procs, pct in rows:
        print(f"{category:34s} {procs:3d} procs {pct:6.1f}%")
    print(f"{'TOTAL':34s}           {sum(r[2] for r in rows):6.1f}%")


if __name__ == "__main__":
    main()

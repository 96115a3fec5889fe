"""The `peernet` command line: the local stack, the server, tokens, and the tools around them."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from peernet.config import PeerNetConfig, load_config


def _cmd_stack(args: argparse.Namespace) -> int:
    from stack import manager

    cfg = load_config()
    try:
        if args.service:
            return _stack_service(cfg, args)
        if args.action == "up":
            manager.up(cfg)
            return 0
        if args.action == "down":
            manager.down(cfg)
            return 0
        if args.json:
            from dataclasses import asdict

            rows = manager.status(cfg)
            print(json.dumps([asdict(row) for row in rows], indent=2))
            return 0 if all(row.healthy for row in rows) else 1
        return 0 if manager.print_status(cfg) else 1
    except manager.StackError as exc:
        print(f"peernet stack {args.action}: {exc}", file=sys.stderr)
        return 1


def _stack_service(cfg: PeerNetConfig, args: argparse.Namespace) -> int:
    """`peernet stack up|down SERVICE`: one service of the stack, as the chaos mode of
    `peernet bench` faults it (it drives the stack through this command, not stack/'s modules)."""
    from stack import manager

    name = args.service
    if args.action == "up":
        pid = manager.start_service(cfg, name, wait=True, timeout=args.timeout)
        print(f"{name} running, pid {pid}")
        return 0
    if args.action == "down":
        was = manager.pid_of(cfg, name)
        stopped = manager.stop_service(cfg, name, kill=args.kill)
        how = "SIGKILLed" if args.kill else "stopped (SIGTERM)"
        print(f"{name} pid {was} {how}" if stopped else f"{name} was not running")
        return 0
    print("peernet stack status: of the whole stack only", file=sys.stderr)
    return 2


def _cmd_token(args: argparse.Namespace) -> int:
    from peernet.tokens import issue_token

    cfg = load_config()
    print(issue_token(args.user, cfg.gateway))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from serve.deployment import run_forever

    return run_forever(load_config(), dev_tokens=args.dev_tokens)


def _cmd_upgrade(args: argparse.Namespace) -> int:
    from peernet.serve_process import state_file
    from serve.deployment import already_serving
    from serve.upgrade import request_upgrade

    cfg = load_config()
    running = already_serving(cfg)
    if running is None:
        print(f"peernet upgrade: no `peernet serve` running for {state_file(cfg)}", file=sys.stderr)
        return 1
    # With --json the steps go to stderr and the final record alone to stdout, for a program.
    say = (lambda line: print(line, file=sys.stderr)) if args.json else print
    try:
        record = request_upgrade(state_file(cfg), int(running["pid"]), timeout_s=args.timeout,
                                 say=say)
    except TimeoutError as exc:
        print(f"peernet upgrade: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(record, indent=2))
    if not record.get("ok"):
        print(f"peernet upgrade: failed: {record.get('error')}", file=sys.stderr)
        return 1
    if args.json:
        return 0
    print(f"peernet upgrade: {len(record.get('actors_restarted', []))} actors restarted and the "
          f"gateway rolled to {record.get('gateway_version')} in {record.get('took_s')} s")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    import os

    from peernet.status_report import Service, render_text
    from serve import status
    from stack import manager

    cfg = load_config()

    def services() -> list[Service]:
        return [Service(s.name, s.state, s.address, s.external, s.pid, s.detail)
                for s in manager.status(cfg)]

    report = status.collect(cfg, address=args.address or "", url=(args.url or "").rstrip("/"),
                            services=services, timeout_s=args.timeout)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        if not report.healthy:
            print(f"peernet status: {report.reason()}", file=sys.stderr)
    else:
        print(render_text(report))
    code = 0 if report.healthy else 1
    if status.stuck():
        # A read past its deadline (no timeout of its own) must not hold the answer back.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _cmd_config(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    cfg = load_config()
    for section, values in asdict(cfg).items():
        for name, value in values.items():
            shown = "***" if name == "token_secret" else value
            print(f"{section}.{name} = {shown}")
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    from actors.replay import run

    return run(load_config(), wipe=args.wipe)


def _cmd_bench(args: argparse.Namespace) -> int:
    from bench.__main__ import main as bench_main

    return bench_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peernet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stack", help="the local services: Kafka, Redis, MongoDB-wire server")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("service", nargs="?", help="one service only (kafka, redis, mongo): `up` "
                   "starts it and waits until it answers, `down` stops it")
    p.add_argument("--kill", action="store_true",
                   help="with `down SERVICE`: SIGKILL at once, as a crash would")
    p.add_argument("--timeout", type=float, default=None,
                   help="with `up SERVICE`: seconds it may take to answer")
    p.add_argument("--json", action="store_true", help="with `status`: print the states as JSON")
    p.set_defaults(func=_cmd_stack)

    p = sub.add_parser("serve", help="start Ray and serve the PeerNet app (runs until stopped)")
    p.add_argument("--dev-tokens", action="store_true",
                   help="enable POST /v1/dev/token (same as PEERNET_DEV_TOKENS=1)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("status", help="the running PeerNet: serve process, Ray nodes, shard actors, "
                       "gateway replicas, consumer lag, health; exit 1 unless all is healthy")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--address", help="the Ray cluster (GCS address, or auto) to look at instead "
                   "of the one in .peernet/run/serve.json (default: PEERNET_RAY_ADDRESS when "
                   "there is no state file)")
    p.add_argument("--url", help="the gateway's base URL for /healthz and /metrics "
                   "(default: the state file's, else http://PEERNET_HOST:PEERNET_PORT)")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds each part of the report may take (default 10)")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("upgrade", help="rolling restart of the running `peernet serve` onto the "
                       "code installed now: each shard actor in turn, then the gateway replicas "
                       "one at a time; clients resume and nothing acknowledged is lost")
    p.add_argument("--timeout", type=float, default=900.0,
                   help="seconds to wait for the upgrade to finish (default 900)")
    p.add_argument("--json", action="store_true",
                   help="print the steps to stderr and the final upgrade record as JSON")
    p.set_defaults(func=_cmd_upgrade)

    p = sub.add_parser("token", help="print a signed development token for USER")
    p.add_argument("user")
    p.set_defaults(func=_cmd_token)

    p = sub.add_parser("config", help="print the configuration in force")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("replay", help="rebuild the Redis feeds, graph and likes and the MongoDB "
                       "projections from the event log (offset 0); safe to run twice")
    p.add_argument("--wipe", action="store_true",
                   help="empty the feed keyspace and the projection collections first")
    p.set_defaults(func=_cmd_replay)

    p = sub.add_parser("bench", help="the load benchmark harness (see `peernet bench --help`)",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        # The harness parses its own options, --help included.
        from bench.__main__ import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

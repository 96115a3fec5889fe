"""`python -m bench` / `peernet bench`: drive a running PeerNet (or the Socket.IO baseline) with
open-loop WebSocket clients, account for every acknowledged message, and write the results.

Exit status: 0 when nothing was lost (with --find-max: when the ladder ran), 1 when an
acknowledged delivery was lost or a target could not be driven, 2 on bad parameters.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.chaos import parse_faults
from bench.params import (
    DEFAULT_MIX,
    DEFAULT_SERVICE_PORTS,
    DRIVERS,
    KEEPALIVES,
    PEER_SCENARIOS,
    SCENARIOS,
    STORMS,
    TARGETS,
    BenchParams,
    ParamError,
    check_open_files,
    default_procs,
    open_files_limit,
    parse_mix,
    parse_ports,
    scenarios_phrase,
)
from bench.progress import ProgressLine

DEFAULT_URL = os.environ.get("PEERNET_BENCH_URL", "http://127.0.0.1:8000")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"

EPILOG = """\
examples:
  python -m bench dm --clients 200 --rate 500 --duration 30
  python -m bench group --clients 500 --group-size 500 --rate 5 --duration 60   # one group of 500
  python -m bench group --clients 1000 --group-size 10 --rate 100               # 100 groups of 10
  python -m bench fanout --clients 200 --followers 50 --rate 20
  python -m bench presence --clients 200 --churners 100 --watch 20 --rate 40
  python -m bench mixed --clients 300 --rate 300 --mix dm=0.7,fanout=0.1,presence=0.2
  python -m bench dm --find-max --rate 100 --step-factor 1.5 --bound-ms 100
  python -m bench dm --driver go --clients 1000 --rate 2000   # the Go load driver (built on first use)
  python -m bench dm --vs socketio --find-max --rate 100     # PeerNet, then the baseline
  python -m bench dm --target socketio                       # the baseline alone
  python -m bench dm --vs centrifugo --find-max --rate 100   # PeerNet, then Centrifugo (built on first use)
  python -m bench fanout --target centrifugo --clients 200   # Centrifugo alone
  python -m bench dm --chaos all --clients 200 --rate 50 --duration 60   # faults, one per phase
  python -m bench connections --clients 5000 --connect-rate 500 --hold 300 --keepalive ws-ping
  python -m bench connections --clients 2000 --hold 30 --rate 100 --storm replica  # DMs, a replica killed
"""


def _target_arguments(ap: argparse.ArgumentParser, d: BenchParams) -> None:
    g = ap.add_argument_group("target")
    g.add_argument("--url", action="append", dest="urls", metavar="URL",
                   help=f"PeerNet HTTP address, repeatable (clients spread over them); default {DEFAULT_URL} "
                        "(or $PEERNET_BENCH_URL)")
    g.add_argument("--direct", action="store_true",
                   help="connect straight to the gateway replicas that GET /v1/endpoints at the "
                        "(first) --url lists, past HAProxy; clients spread over them")
    g.add_argument("--target", choices=TARGETS, default="peernet",
                   help="what to drive; socketio and centrifugo start their servers themselves "
                        "(centrifugo is built with `go install` into .peernet/ on first use)")
    g.add_argument("--vs", choices=tuple(PEER_SCENARIOS),
                   help="then run the same scenario against that peer (socketio: dm; centrifugo: dm, fanout)")
    g.add_argument("--baseline-ports", default="8101,8102",
                   help="ports of the baseline's server processes (default 8101,8102)")
    g.add_argument("--redis-url", default="redis://127.0.0.1:6379/0",
                   help="Redis of the Socket.IO baseline and of Centrifugo's engine (default %(default)s)")
    g.add_argument("--service-ports", default=",".join(f"{k}={v}" for k, v in DEFAULT_SERVICE_PORTS.items()),
                   help="count only the service instances listening on these ports (default %(default)s)")
    g.add_argument("--json-frames", action="store_true", help="speak JSON text frames instead of MessagePack")


def _load_arguments(ap: argparse.ArgumentParser, d: BenchParams) -> None:
    g = ap.add_argument_group("load")
    g.add_argument("--clients", type=int, default=d.clients, help=f"simulated users (default {d.clients})")
    g.add_argument("--rate", type=float, default=None,
                   help=f"actions per second in total: DMs, posts or presence changes (default {d.rate:g}); "
                        "with --find-max the first step; connections: DMs per second after the hold "
                        "(default none)")
    g.add_argument("--duration", type=float, default=d.duration,
                   help=f"measured seconds per rate, after the warm-up (default {d.duration:g})")
    g.add_argument("--warmup", type=float, default=d.warmup,
                   help=f"seconds of load before measuring; accounted, not timed (default {d.warmup:g})")
    g.add_argument("--drain", type=float, default=d.drain,
                   help=f"seconds to wait for in-flight deliveries after the last send (default {d.drain:g})")
    g.add_argument("--size", type=int, default=d.size, help=f"message body characters (default {d.size})")
    g.add_argument("--group-size", type=int, default=d.group_size,
                   help="dm: users per chat group, each writing one-to-one DMs to the others; "
                        "group: members per group conversation, 2 to 500, made with group_create "
                        f"(default {d.group_size})")
    g.add_argument("--authors", type=int, default=d.authors,
                   help="fanout: authors (default: a tenth of the clients)")
    g.add_argument("--followers", type=int, default=d.followers,
                   help=f"fanout: followers per author (default {d.followers})")
    g.add_argument("--churners", type=int, default=d.churners,
                   help="presence: users that connect and disconnect (default: half the clients)")
    g.add_argument("--watch", type=int, default=d.watch,
                   help=f"presence: churners each watcher watches (default {d.watch})")
    g.add_argument("--mix", default=",".join(f"{k}={v:g}" for k, v in DEFAULT_MIX.items()),
                   help="mixed: shares of rate and clients (default %(default)s)")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of the plan and schedule (default 1)")
    g.add_argument("--procs", type=int, default=None,
                   help="load processes (default 1; connections: one per "
                        "5,000 connections, more when the open-files limit holds fewer)")
    g.add_argument("--driver", choices=DRIVERS, default=d.driver,
                   help="the load processes: python (bench/worker.py) or go (bench/go/dmdriver: dm on "
                        "PeerNet, one process, built with the machine's Go on first use); default python")
    g.add_argument("--request-timeout", type=float, default=d.request_timeout,
                   help="seconds before an unacknowledged request counts as failed "
                        f"(default {d.request_timeout:g})")
    g.add_argument("--connect-concurrency", type=int, default=d.connect_concurrency,
                   help=f"handshakes in flight at once while connecting (default {d.connect_concurrency})")
    g.add_argument("--run-tag", default="", help="name this run's users b<TAG>_<n> (default: random)")


def _connections_arguments(ap: argparse.ArgumentParser, d: BenchParams) -> None:
    g = ap.add_argument_group("connections (many idle sockets; see docs/benchmarks.md)")
    g.add_argument("--connect-rate", type=float, default=d.connect_rate,
                   help=f"connections opened per second, open loop (default {d.connect_rate:g})")
    g.add_argument("--hold", type=float, default=d.hold,
                   help=f"seconds the connections are held idle (default {d.hold:g})")
    g.add_argument("--keepalive", choices=KEEPALIVES, default=d.keepalive,
                   help="how an idle connection keeps alive, after half a heartbeat without a send: "
                        "`ping` frames or WebSocket pings (default frame; every scenario)")
    g.add_argument("--idle-baseline", type=float, default=d.idle_baseline,
                   help=f"seconds the stack is sampled with no clients first (default {d.idle_baseline:g})")
    g.add_argument("--storm", choices=STORMS,
                   help="after the hold (and the DMs), kill one gateway replica --fault-at s into "
                        "DMs at --rate: every connection on it cut, all back with resume")


def _find_max_arguments(ap: argparse.ArgumentParser, d: BenchParams) -> None:
    g = ap.add_argument_group("find the maximum rate")
    g.add_argument("--find-max", action="store_true",
                   help="raise the rate by --step-factor until p99 > --bound-ms or anything is lost")
    g.add_argument("--bound-ms", type=float, default=d.bound_ms, help=f"p99 bound (default {d.bound_ms:g})")
    g.add_argument("--step-factor", type=float, default=d.step_factor, help=f"default {d.step_factor:g}")
    g.add_argument("--max-rate", type=float, default=d.max_rate, help="stop the ladder here")
    g.add_argument("--max-steps", type=int, default=d.max_steps, help=f"default {d.max_steps}")


def _chaos_arguments(ap: argparse.ArgumentParser, d: BenchParams) -> None:
    g = ap.add_argument_group("chaos (dm on PeerNet's local stack; see docs/reliability.md)")
    g.add_argument("--chaos", metavar="FAULTS",
                   help="one phase per fault, injected --fault-at s into it: all, or some of "
                        "kafka, redis, mongo, replica, session-shard, feed-shard, presence-shard, burst; "
                        "node (a second Ray node on this machine, not in all)")
    g.add_argument("--fault-at", type=float, default=d.fault_at,
                   help=f"seconds into each phase, warm-up included (default {d.fault_at:g})")
    g.add_argument("--mongo-down", type=float, default=d.mongo_down,
                   help=f"seconds the MongoDB-wire server stays stopped (default {d.mongo_down:g})")
    g.add_argument("--burst-factor", type=float, default=d.burst_factor,
                   help=f"burst: times the rate (default {d.burst_factor:g})")
    g.add_argument("--burst-s", type=float, default=d.burst_s,
                   help=f"burst: seconds (default {d.burst_s:g})")
    g.add_argument("--fault-gap", type=float, default=d.fault_gap,
                   help=f"seconds of quiet between faults, once /healthz is 200 (default {d.fault_gap:g})")
    g.add_argument("--ray-address", default="",
                   help="the target's GCS address (default: from `peernet serve`'s state file)")


def _output_arguments(ap: argparse.ArgumentParser, d: BenchParams) -> None:
    g = ap.add_argument_group("output")
    g.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="results go to OUT/<timestamp>/ (default bench/results)")
    g.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    g.add_argument("--quiet", action="store_true", help="no progress line")


def build_parser() -> argparse.ArgumentParser:
    d = BenchParams()
    ap = argparse.ArgumentParser(prog="peernet bench", description=__doc__, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenario", nargs="?", default="dm", choices=SCENARIOS,
                    help="dm: pairs/small groups chatting; fanout: authors posting to followers; "
                         "presence: connect/disconnect churn seen by watchers; mixed: all three; "
                         "group: group conversations (protocol 1.1) of --group-size members, "
                         "--rate messages a second over them, each owed to every member; "
                         "connections: many idle connections opened at a rate and held, then "
                         "optionally DMs and a reconnect storm")
    _target_arguments(ap, d)
    _load_arguments(ap, d)
    _connections_arguments(ap, d)
    _find_max_arguments(ap, d)
    _chaos_arguments(ap, d)
    _output_arguments(ap, d)
    return ap


def params_from_args(args: argparse.Namespace) -> BenchParams:
    d = BenchParams()
    connections = args.scenario == "connections"
    rate = args.rate if args.rate is not None else (0.0 if connections else d.rate)
    procs = args.procs or (default_procs(args.clients, open_files_limit()) if connections else d.procs)
    return BenchParams(
        scenario=args.scenario, target=args.target, urls=tuple(args.urls or [DEFAULT_URL]),
        clients=args.clients, rate=rate, duration=args.duration, warmup=args.warmup, drain=args.drain,
        size=args.size, group_size=args.group_size, authors=args.authors, followers=args.followers,
        churners=args.churners, watch=args.watch, mix=parse_mix(args.mix), seed=args.seed, procs=procs,
        driver=args.driver,
        request_timeout=args.request_timeout, connect_concurrency=args.connect_concurrency,
        binary=not args.json_frames, run_tag=args.run_tag, service_ports=parse_ports(args.service_ports),
        find_max=args.find_max, bound_ms=args.bound_ms,
        step_factor=args.step_factor, max_rate=args.max_rate, max_steps=args.max_steps,
        chaos=parse_faults(args.chaos) if args.chaos else (), fault_at=args.fault_at,
        mongo_down=args.mongo_down, burst_factor=args.burst_factor, burst_s=args.burst_s,
        fault_gap=args.fault_gap, ray_address=args.ray_address,
        connect_rate=args.connect_rate, hold=args.hold, keepalive=args.keepalive,
        idle_baseline=args.idle_baseline, storm=args.storm or "",
    ).validate()


def with_direct_urls(params: BenchParams) -> BenchParams:
    """`params` aimed at the replicas' own addresses (--direct)."""
    from bench.peernet_client import direct_urls

    if params.target != "peernet":
        raise ParamError("--direct drives PeerNet only")
    if params.chaos or params.storm:
        raise ParamError("--direct cannot go with --chaos or --storm: a client of a replica that "
                         "is killed must come back through the ingress")
    return params.with_(urls=tuple(direct_urls(params.urls[0]))).validate()


def _group_figures(ph: dict[str, Any], params: BenchParams) -> str:
    """`group`: the deliveries a second and the CPU per message beside a phase's verdict."""
    if params.scenario != "group":
        return ""
    lat = ph["accounting"]["latency_ms"]
    out = (f"; {ph['delivered_rate']:,.1f} deliveries/s; p99 to each member "
           f"{lat.get('group', {}).get('p99', 0):,.1f} ms, to the last member "
           f"{lat.get('group_last', {}).get('p99', 0):,.1f} ms")
    cost = ph.get("cpu_per_action") or {}
    if cost:
        out += (f"; CPU per group message: server {cost['server_ms']:.3f} ms, load generator "
                f"{cost['load_generator_ms']:.3f} ms, total {cost['total_ms']:.3f} ms")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        params = params_from_args(args)
        if args.vs and params.scenario not in PEER_SCENARIOS[args.vs]:
            raise ParamError(f"--vs {args.vs} compares {scenarios_phrase(PEER_SCENARIOS[args.vs])} only")
        ports = tuple(int(p) for p in args.baseline_ports.split(",") if p.strip())
        if params.scenario == "connections":
            check_open_files(params, open_files_limit())
        if args.direct:
            params = with_direct_urls(params)
    except (ParamError, ValueError, httpx.HTTPError) as exc:
        parser.print_usage(sys.stderr)
        print(f"peernet bench: error: {exc}", file=sys.stderr)
        return 2

    from bench.report import build_report, results_dir, write_results
    from bench.runner import run_bench
    from bench.worker import run_async

    progress = ProgressLine(enabled=not args.quiet)
    outdir = results_dir(args.out, time.time())
    run = run_async(run_bench(params, vs=args.vs, progress=progress, baseline_ports=ports,
                                redis_url=args.redis_url, log_dir=outdir))
    report = build_report(run, ["peernet", "bench", *argv])
    files = write_results(report, outdir, plots=not args.no_plots)
    losses = report["losses"]
    print(f"lost {losses['lost']} of {losses['acknowledged_deliveries']} acknowledged deliveries; "
          f"results in {outdir}/ ({', '.join(files)})")
    for t in report["targets"]:
        held = t["max_held_rate"]
        if t["error"]:
            print(f"  {t['name']}: FAILED: {t['error']}")
        elif params.find_max:
            print(f"  {t['name']}: largest rate held {held if held is not None else 'none'}/s")
        for ph in t["phases"]:
            print(f"  {t['name']} {ph['rate_target']:g}/s: {ph['verdict']}" + _group_figures(ph, params))
        conns = t.get("connections_scenario")
        if conns:
            print(f"  {t['name']} connections: {conns['verdict']}")
    if any(t["error"] for t in report["targets"]):
        return 1
    if any(not (t.get("connections_scenario") or {}).get("ok", True) for t in report["targets"]):
        return 1
    if losses["lost"] and not params.find_max:
        return 1
    if any(not f["ok"] for f in report.get("faults", [])):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The local Redis: Debian's redis-server, run by us with a generated configuration."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from peernet.config import PeerNetConfig
from stack.process import Identity, Launch, StackError, log_file, redact_url, run_step, say


def redis_dir(cfg: PeerNetConfig) -> Path:
    return cfg.stack.home / "redis"


def config_file(cfg: PeerNetConfig) -> Path:
    return redis_dir(cfg) / "redis.conf"


def redis_conf(cfg: PeerNetConfig) -> str:
    lines = [
        "# Written by `peernet stack up` on every start: edit stack/redis.py, not this file.",
        "bind 127.0.0.1",
        f"port {cfg.stack.redis_port}",
        "protected-mode yes",
        # We run it detached ourselves and keep its pid file.
        "daemonize no",
        "supervised no",
        f"dir {redis_dir(cfg)}",
        f"logfile {log_file(cfg.stack.home, 'redis')}",
        "loglevel notice",
        # The cache can be rebuilt from the event log; the append-only file keeps it across
        # restarts at a second's loss at most, without the fork of periodic snapshots.
        "appendonly yes",
        "appendfsync everysec",
        'save ""',
        # The config path in the process title tells our redis-server from any other one
        # (see stack.process.Identity).
        'proc-title-template "{title} {listen-addr} {server-mode} {config-file}"',
    ]
    return "\n".join(lines) + "\n"


class RedisServer:
    """Debian's redis-server on 127.0.0.1."""

    name = "redis"
    ready_timeout = 20.0

    def is_external(self, cfg: PeerNetConfig) -> bool:
        return cfg.services.redis_external

    def address(self, cfg: PeerNetConfig) -> str:
        if self.is_external(cfg):
            return redact_url(cfg.services.redis_url)
        return f"127.0.0.1:{cfg.stack.redis_port}"

    def ports(self, cfg: PeerNetConfig) -> tuple[int, ...]:
        return (cfg.stack.redis_port,)

    def logs(self, cfg: PeerNetConfig) -> list[Path]:
        return [log_file(cfg.stack.home, "redis")]

    def install(self, cfg: PeerNetConfig) -> None:
        if shutil.which("redis-server") is not None:
            return
        if os.geteuid() != 0:
            raise StackError("redis-server is not installed: run "
                             "`sudo apt-get update && sudo apt-get install -y redis-server`")
        say("redis: installing Debian's redis-server with apt-get")
        install_log = log_file(cfg.stack.home, "redis.install")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        run_step(["apt-get", "update"], log_path=install_log, what="apt-get update", env=env)
        run_step(["apt-get", "install", "-y", "--no-install-recommends", "redis-server"],
                 log_path=install_log, what="apt-get install redis-server", env=env)
        if shutil.which("redis-server") is None:
            raise StackError(f"apt-get installed redis-server but it is not on PATH; see {install_log}")

    def identity(self, cfg: PeerNetConfig) -> Identity:
        return Identity("redis-server", ("redis-server", str(config_file(cfg))))

    def launch(self, cfg: PeerNetConfig) -> Launch:
        conf = config_file(cfg)
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(redis_conf(cfg))
        server = shutil.which("redis-server") or "redis-server"
        return Launch(argv=[server, str(conf)], identity=self.identity(cfg), cwd=redis_dir(cfg),
                      console=log_file(cfg.stack.home, "redis"))

    def probe(self, cfg: PeerNetConfig, timeout: float) -> str:
        import redis

        from bus.redis import redis_target

        target = redis_target(cfg.services.redis_url) if self.is_external(cfg) else None
        if target is not None and target.cluster:
            return _probe_cluster(target.node_urls, timeout)
        if self.is_external(cfg):
            client = redis.Redis.from_url(cfg.services.redis_url, socket_timeout=timeout,
                                          socket_connect_timeout=timeout)
        else:
            client = redis.Redis(host="127.0.0.1", port=cfg.stack.redis_port,
                                 socket_timeout=timeout, socket_connect_timeout=timeout)
        try:
            if not client.ping():
                raise StackError(f"redis at {self.address(cfg)} did not answer PING")
            info = client.info("server")
        finally:
            client.close()
        return f"redis {info.get('redis_version', '?')}"


def _probe_cluster(node_urls: tuple[str, ...], timeout: float) -> str:
    """The first listed node that answers, and the cluster's state as that node sees it."""
    import redis

    from stack.redis_cluster import cluster_info

    errors = []
    for url in node_urls:
        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        try:
            info = client.info("server")
            fields = cluster_info(client)
        except (redis.RedisError, OSError) as exc:
            errors.append(f"{redact_url(url)}: {exc}")
            continue
        finally:
            client.close()
        if fields.get("cluster_state") != "ok":
            raise StackError(f"redis cluster at {redact_url(url)}: cluster_state is "
                             f"{fields.get('cluster_state', '?')}")
        return (f"redis {info.get('redis_version', '?')} cluster "
                f"({fields.get('cluster_known_nodes', '?')} nodes)")
    raise StackError("no redis cluster node answered: " + "; ".join(errors))


REDIS = RedisServer()

"""The local MongoDB-wire server: SecantusDB (GPL-2.0, run as a separate process, never imported),
installed with pip into its own virtual environment under the stack's home."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from peernet.config import PeerNetConfig
from stack.process import Identity, Launch, StackError, log_file, redact_url, run_step, say

# Written into the venv once SecantusDB is installed: the version that is there.
VENV_STAMP = ".peernet-secantus"


def mongo_dir(cfg: PeerNetConfig) -> Path:
    return cfg.stack.home / "mongo"


def data_dir(cfg: PeerNetConfig) -> Path:
    return mongo_dir(cfg) / "data"


def venv_dir(cfg: PeerNetConfig) -> Path:
    return cfg.stack.home / "venvs" / "secantus"


def server_bin(cfg: PeerNetConfig) -> Path:
    return venv_dir(cfg) / "bin" / "secantusd-py"


def local_url(cfg: PeerNetConfig) -> str:
    return f"mongodb://127.0.0.1:{cfg.stack.mongo_port}/?directConnection=true"


class SecantusServer:
    """SecantusDB speaking the MongoDB wire protocol on 127.0.0.1 (a one-member replica set, so
    change streams and transactions work)."""

    name = "mongo"
    ready_timeout = 120.0

    def is_external(self, cfg: PeerNetConfig) -> bool:
        return cfg.services.mongo_external

    def address(self, cfg: PeerNetConfig) -> str:
        if self.is_external(cfg):
            return redact_url(cfg.services.mongo_url)
        return f"127.0.0.1:{cfg.stack.mongo_port}"

    def ports(self, cfg: PeerNetConfig) -> tuple[int, ...]:
        return (cfg.stack.mongo_port,)

    def logs(self, cfg: PeerNetConfig) -> list[Path]:
        return [log_file(cfg.stack.home, "mongo")]

    def install(self, cfg: PeerNetConfig) -> None:
        venv = venv_dir(cfg)
        version = cfg.stack.secantus_version
        stamp = venv / VENV_STAMP
        if server_bin(cfg).exists() and stamp.exists() and stamp.read_text().strip() == version:
            return
        install_log = log_file(cfg.stack.home, "mongo.install")
        python = venv / "bin" / "python"
        if not python.exists():
            say(f"mongo: creating a virtual environment for SecantusDB in {venv}")
            run_step([sys.executable, "-m", "venv", str(venv)], log_path=install_log,
                     what="python -m venv", env=_clean_env())
        say(f"mongo: installing secantusdb=={version} with pip (first time only)")
        run_step([str(python), "-m", "pip", "install", "--disable-pip-version-check",
                  f"secantusdb=={version}"],
                 log_path=install_log, what=f"pip install secantusdb=={version}", env=_clean_env())
        if not server_bin(cfg).exists():
            raise StackError(f"secantusdb=={version} installed no {server_bin(cfg)}; see {install_log}")
        stamp.write_text(version + "\n")

    def identity(self, cfg: PeerNetConfig) -> Identity:
        return Identity("python", ("secantusd-py", str(data_dir(cfg))))

    def launch(self, cfg: PeerNetConfig) -> Launch:
        data = data_dir(cfg)
        data.mkdir(parents=True, exist_ok=True)
        # An explicit (empty) config file turns off SecantusDB's search of ./secantusd.toml,
        # ~/.secantus and /etc/secantus: only the flags below apply.
        config = mongo_dir(cfg) / "secantusd.toml"
        config.write_text("# Written by `peernet stack up`: settings are flags, see stack/mongo.py.\n")
        argv = [str(server_bin(cfg)), "--config", str(config),
                "--host", "127.0.0.1", "--port", str(cfg.stack.mongo_port),
                "--storage-path", str(data), "--cache-size", cfg.stack.mongo_cache,
                "--log-level", "INFO"]
        return Launch(argv=argv, identity=self.identity(cfg), cwd=mongo_dir(cfg),
                      console=log_file(cfg.stack.home, "mongo"), env=_clean_env())

    def probe(self, cfg: PeerNetConfig, timeout: float) -> str:
        from pymongo import MongoClient

        url = cfg.services.mongo_url if self.is_external(cfg) else local_url(cfg)
        ms = max(200, int(timeout * 1000))
        client: MongoClient = MongoClient(url, serverSelectionTimeoutMS=ms, connectTimeoutMS=ms,
                                          socketTimeoutMS=ms)
        try:
            client.admin.command("ping")
            info = client.admin.command("buildInfo")
        finally:
            client.close()
        return f"version {info.get('version', '?')}"


def _clean_env() -> dict[str, str]:
    # The server runs on its own venv's interpreter: nothing of ours may leak onto its path.
    drop = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"}
    return {k: v for k, v in os.environ.items() if k not in drop}


MONGO = SecantusServer()

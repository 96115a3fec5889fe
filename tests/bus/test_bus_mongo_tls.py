"""MongoDB over TLS (issue 8: "TLS where the URL says so"): with `PEERNET_MONGO_URL=mongodb://...
?tls=true&tlsCAFile=CA`, PeerNet's document store (motor) speaks TLS to a real server, and a client
that does not trust the server's certificate, or speaks plaintext to it, gets
PeerNetError(unavailable) within its server selection timeout.

The server is SecantusDB, the MongoDB-wire server the local stack runs (stack/mongo.py), started
from the stack's own install with TLS only on a free port of 127.0.0.1 and in-memory storage, its
certificate from a throwaway CA (bus_tls.py); the project's own server is not touched. Not real
mongod: what this shows is that PeerNet hands the URI's TLS options to motor intact."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
from bus_helpers import unique
from bus_tls import TlsFiles, make_tls_files
from ports import free_ports

from bus.mongo import MongoDocumentStore
from peernet.config import load_config
from peernet.errors import ErrorCode, PeerNetError
from stack import mongo as stack_mongo
from stack.process import tail

pytestmark = pytest.mark.stack

START_TIMEOUT_S = 30.0
SELECTION_TIMEOUT_MS = 2000


@dataclass(frozen=True)
class TlsMongo:
    port: int
    tls: TlsFiles
    log: Path

    def url(self, ca: Path | None = None, tls: bool = True) -> str:
        query = f"&tls=true&tlsCAFile={quote(str(ca or self.tls.ca))}" if tls else ""
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true{query}"


@pytest.fixture(scope="module")
def tls_mongo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsMongo]:
    server = stack_mongo.server_bin(load_config())
    if not server.exists():
        pytest.fail(f"SecantusDB is not installed at {server}: run `./dev test` or "
                    "`peernet stack up`, which install it")
    root = tmp_path_factory.mktemp("mongo-tls")
    tls = make_tls_files(root / "certs")
    (port,) = free_ports(1)
    log = root / "mongo.log"
    # An explicit config file: SecantusDB reads no other (as the stack runs it).
    config = root / "secantusd.toml"
    config.write_text("# flags only\n")
    argv = [str(server), "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
            "--storage-path", ":memory:", "--cache-size", "64M",
            "--tls-cert-file", str(tls.server_cert), "--tls-key-file", str(tls.server_key)]
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, cwd=root, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"SecantusDB exited ({proc.returncode}):\n{tail(log, 20)}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    pytest.fail(f"SecantusDB not listening within {START_TIMEOUT_S:.0f}s: "
                                f"{exc!r}\n{tail(log, 20)}")
                time.sleep(0.1)
        yield TlsMongo(port, tls, log)
    finally:
        proc.kill()
        proc.wait(timeout=10)


async def test_store_writes_and_reads_over_tls(tls_mongo: TlsMongo) -> None:
    """The store as bus/backends.py opens it, from PEERNET_MONGO_URL."""
    cfg = load_config({"PEERNET_MONGO_URL": tls_mongo.url(),
                       "PEERNET_MONGO_DB": unique("tls").replace("-", "_")})
    store = MongoDocumentStore(cfg.services.mongo_url, cfg.services.mongo_db)
    await store.start()
    try:
        await store.ping()
        await store.insert("posts", {"_id": "p1", "body": "over tls"})
        await store.upsert_many("posts", [{"_id": "p2", "body": "second"}])
        found = await store.documents("posts")
        assert [d["body"] for d in found] == ["over tls", "second"]
    finally:
        await store.drop_database()
        await store.stop()


@pytest.mark.parametrize("case", ["untrusted-ca", "plaintext"])
async def test_a_client_that_cannot_speak_tls_to_it_is_refused(tls_mongo: TlsMongo,
                                                              case: str) -> None:
    url = (tls_mongo.url(ca=tls_mongo.tls.other_ca) if case == "untrusted-ca"
           else tls_mongo.url(tls=False))
    store = MongoDocumentStore(url, "refused", server_selection_timeout_ms=SELECTION_TIMEOUT_MS)
    await store.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(PeerNetError) as refused:
            await store.ping()
    finally:
        await store.stop()
    waited = time.monotonic() - t0
    assert refused.value.code is ErrorCode.UNAVAILABLE and refused.value.retriable
    if case == "untrusted-ca":
        assert "CERTIFICATE_VERIFY_FAILED" in str(refused.value)
    assert waited < SELECTION_TIMEOUT_MS / 1000 + 3, f"refused only after {waited:.1f}s"
    print(f"\n{case}: refused after {waited:.2f}s: {str(refused.value)[:160]}")

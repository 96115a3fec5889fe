"""bench/kafka_clients.py on the local stack's Kafka: every client is measured in every case it
runs, the table reports each, and the run's topics are gone afterwards."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peernet.config import PeerNetConfig

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.stack


def test_each_client_is_measured_and_the_topics_are_deleted(local_stack: PeerNetConfig,
                                                           tmp_path: Path) -> None:
    bootstrap = local_stack.services.kafka_bootstrap
    figures = tmp_path / "figures.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.kafka_clients", "--bootstrap", bootstrap,
         "--cases", "produce-low,cycle", "--clients", "aiokafka,rdk", "--rounds", "1",
         "--seconds", "1", "--json", str(figures)],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=True)
    rows = json.loads(figures.read_text())
    assert {(r["case"], r["client"]) for r in rows} == {
        ("produce-low", "none"), ("produce-low", "aiokafka"), ("produce-low", "rdk"),
        ("cycle", "aiokafka"), ("cycle", "rdk")}, proc.stdout
    assert all(r["messages"] == 100 for r in rows), rows
    assert all(r["us_per_msg"] > 0 for r in rows if r["client"] != "none"), rows
    assert re.search(r"^\| cycle \| - \| \*\*\d+\*\*", proc.stdout, re.MULTILINE), proc.stdout

    from confluent_kafka.admin import AdminClient

    found = re.search(r"^deleted the topics (\S+)\.\*$", proc.stdout, re.MULTILINE)
    assert found, proc.stdout
    admin = AdminClient({"bootstrap.servers": bootstrap})
    deadline = time.monotonic() + 30
    while True:  # a deleted topic may stay in the metadata for a moment
        left = [t for t in admin.list_topics(timeout=10).topics if t.startswith(found[1] + ".")]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not left, left

"""The local development stack: Kafka, Redis and a MongoDB-wire server installed, started and
stopped by the project's own code (`peernet stack up|down|status`; see stack.manager)."""

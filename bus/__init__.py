"""The seams between PeerNet and its backing services, with their real implementations.

Kafka records, Redis replies and MongoDB documents never leave this package: callers see the
types defined in the seam modules (`eventlog`, `pubsub`, `cache`, `store`, `inbox`).
"""

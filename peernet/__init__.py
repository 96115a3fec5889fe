"""PeerNet core: the wire codec and wire names, the log's event envelope, config, errors, routing.

Nothing here imports Ray or opens a connection at import time.
"""

__version__ = "0.1.0"

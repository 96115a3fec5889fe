"""PeerNet core: the wire codec, the log's event envelope, config, errors, routing and the CLI.

Nothing here imports Ray or opens a connection at import time.
"""

__version__ = "0.1.0"

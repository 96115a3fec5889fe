"""The `peernet` command: the composition root, the one package that may import every layer (and
that none imports). It lives outside the core so that the core imports nothing of ours."""

"""The WebSocket and HTTP gateway: a Starlette app built from injected dependencies
(`serve.app.build_app`), and the one module that serves it on Ray Serve (`serve.deployment`)."""

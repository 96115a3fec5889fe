"""The WebSocket and HTTP gateway: a Starlette app built from injected dependencies
(`serve.app.build_app`), and the operator's side that serves it on Ray Serve
(`serve.deployment`, `serve.gateway`), calling Ray only through `serve.ray_cluster`."""

"""Stage 3 of serve/, the HTTP API (OpenAI-compatible), split the way vLLM splits ``entrypoints/openai``: the wire
models (protocol), error bodies (errors), tokenizers and chat templates (tokenize), the app that routes requests to
a Backend (app: ``create_app``), server-sent events (sse), and the direct front that serves it from the ingress's
own process (front). Knows nothing of Ray: the Backend it serves is the ingress (serve/app/ingress.py) or a test's.
May import serve.types, serve.trace and serve.engines.loader (tokenizers)."""

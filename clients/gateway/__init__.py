"""`clip-triton gateway`: OpenAI-compatible embeddings over HTTP in front of a clip-triton repository.

Built on the client library alone (never the exporter, never torch): `pip install 'clip-triton[gateway]'`
or the image from docker/gateway.Dockerfile. docs/gateway.md is the reference.

    requests.py  what a request may hold and the guards before parsing (-> OpenAI's error shape)
    app.py       the Starlette app: routes, auth, the in-flight limit, readiness, the client calls
    metrics.py   Prometheus metrics
    cli.py       the command (options once, as GatewayOptions) and the uvicorn server
"""

# The OpenAI-compatible gateway alone: the client library and the gateway's extra, no exporter, no torch.
#   docker build -f docker/gateway.Dockerfile -t clip-gateway:0.1 .
#   docker run --rm -p 127.0.0.1:8080:8080 clip-gateway:0.1 --url triton:8001 --host 0.0.0.0
# docs/gateway.md. `clip-triton deploy --gateway-image` runs it beside Triton in each pod.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY clip_triton ./clip_triton
COPY clients ./clients
COPY exporter ./exporter
COPY model_repository ./model_repository
# The package without extras is the client; the toolchain (torch, open_clip, onnx) is the `export` extra.
RUN pip install ".[gateway]" \
 && python -c "import sys; sys.modules['torch'] = None; import clip_triton.clients.gateway.app" \
 && clip-triton-gateway --help > /dev/null \
 && rm -rf /src

RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin gateway
USER 10001
EXPOSE 8080
ENTRYPOINT ["clip-triton-gateway"]
CMD ["--host", "0.0.0.0"]

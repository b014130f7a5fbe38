# syntax=docker/dockerfile:1
# latentsearch image: the `latentsearch` command (quickstart, train, index, serve, query, loadtest)
# plus deploy/healthcheck.py. CPU build by default:
#
#     docker build -t latentsearch:cpu .
#
# CUDA build (torch CUDA wheel + faiss-gpu in place of faiss-cpu; run with an NVIDIA runtime,
# see docker-compose.gpu.yml):
#
#     docker build -t latentsearch:cuda --build-arg VARIANT=cuda \
#         --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

# cpu | cuda
ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# The faiss GPU wheel installed for VARIANT=cuda (CUDA 12 build from PyPI).
ARG FAISS_GPU_PACKAGE=faiss-gpu-cu12

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# torch first, from the chosen index, so the project's `torch>=...` requirement is already met
# (a plain `pip install .` would pull the multi-GB default CUDA build).
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

COPY pyproject.toml README.md ./
COPY latentsearch ./latentsearch
COPY proto ./proto
COPY deploy ./deploy
RUN pip install . \
    && if [ "${VARIANT}" = "cuda" ]; then \
        pip uninstall -y faiss-cpu && pip install "${FAISS_GPU_PACKAGE}"; \
    elif [ "${VARIANT}" != "cpu" ]; then \
        echo "VARIANT must be cpu or cuda, got ${VARIANT}" >&2; exit 1; \
    fi

# Unprivileged user; /srv/latentsearch (model + versioned index root) is where the compose volume
# is mounted, created here so a fresh named volume inherits this ownership.
RUN useradd --create-home --uid 10001 latentsearch \
    && mkdir -p /srv/latentsearch \
    && chown latentsearch:latentsearch /srv/latentsearch
USER latentsearch
WORKDIR /home/latentsearch

# gRPC, Prometheus metrics.
EXPOSE 50051 20051
# The server's healthcheck (docker-compose.yml): python /app/deploy/healthcheck.py --target 127.0.0.1:50051
CMD ["latentsearch", "--help"]

# syntax=docker/dockerfile:1
# One image for every Fairway service; `fairway <service>` picks which one runs.
#
# TORCH_INDEX_URL picks the torch build: the CPU wheel index by default (a small image),
# PyPI's CUDA wheels for the GPU worker (docker-compose.yml sets it for gpu-worker).
FROM python:3.11-slim

ARG TORCH_VERSION=2.11.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /app
# Dependencies first, so a code change does not reinstall them.
COPY pyproject.toml README.md ./
RUN mkdir services && pip install . && pip uninstall --yes fairway
COPY services ./services
RUN pip install --no-deps .

RUN useradd --create-home --uid 10001 fairway \
    && mkdir -p /home/fairway/.cache/fairway \
    && chown -R fairway:fairway /home/fairway/.cache
USER fairway
ENV FAIRWAY_CACHE_DIR=/home/fairway/.cache/fairway \
    FAIRWAY_LOG_FORMAT=json

EXPOSE 8000
CMD ["fairway", "gateway"]

#!/usr/bin/env bash
# Install what Fairway needs on Debian/Ubuntu: Redis and RabbitMQ from the distribution,
# a CPU build of torch, and this package with its test extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if ! command -v redis-server >/dev/null || [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server rabbitmq-server >/dev/null
fi
# Headless Chromium and its driver for the dashboard's browser test (skipped without them).
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  { $SUDO apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; } ||
    echo "warning: could not install chromium and chromium-driver; the dashboard browser test will skip" >&2
fi

PY="${PYTHON:-python3}"
# torch first and pinned: an unpinned torch pulls gigabytes of CUDA packages.
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
"$PY" -m pip install -q -e ".[test]"

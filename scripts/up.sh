#!/usr/bin/env bash
# One command for a fresh machine: install everything, then run the whole system
# (Redis and RabbitMQ on loopback, scheduler, scorer, a CPU worker and the gateway).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
exec fairway up "$@"

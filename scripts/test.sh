#!/usr/bin/env bash
# One command for the tests: install everything, then run the suite against real
# Redis and RabbitMQ servers that the tests start on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
exec python3 -m pytest -q -p no:cacheprovider "$@"

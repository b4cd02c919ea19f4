#!/usr/bin/env bash
# Configures and builds meterd (Release) into build/. Extra arguments go to the build step,
# e.g. `deploy/build.sh --target meterd`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cmake -S "$root" -B "$root/build" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$root/build" -j"$(nproc)" "$@"

#!/usr/bin/env bash
# Installs meterd's build and test dependencies from Debian 12 packages.
# Idempotent: skips apt entirely when every package is already present.
# Extra Debian packages a caller needs may follow as arguments (bench/curve.sh: gnuplot-nox).
set -euo pipefail

packages=(
  build-essential cmake pkg-config git
  libboost1.74-dev libboost-system1.74-dev
  librdkafka-dev libpqxx-dev libpq-dev
  libabsl-dev libsimdjson-dev
  libbenchmark-dev libgtest-dev libgmock-dev
  libspdlog-dev libfmt-dev libssl-dev
  postgresql-15 postgresql-client-15
  python3
  python3-jsonschema python3-fastjsonschema python3-confluent-kafka nodejs node-ajv
  clang libclang-rt-14-dev
  "$@"
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]})); then
  echo "meterd: installing ${missing[*]}" >&2
  sudo_cmd=()
  [[ $(id -u) -ne 0 ]] && sudo_cmd=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  "${sudo_cmd[@]}" apt-get update -qq
  "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

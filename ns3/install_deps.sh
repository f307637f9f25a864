#!/usr/bin/env bash
# Install the Debian/Ubuntu packages that ns3/build.sh needs (ns-3 3.37 dev files, ZMQ,
# protobuf, a C++ compiler). Idempotent: does nothing when they are already installed, so it
# also works without root on a prepared machine. Non-interactive (CI has no stdin).
set -euo pipefail
pkgs=(libns3-dev libzmq3-dev cppzmq-dev libprotobuf-dev protobuf-compiler g++ pkg-config)

missing=()
for p in "${pkgs[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ "${#missing[@]}" -eq 0 ]; then
  echo "ns-3 build dependencies already installed"
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "error: no apt-get; install ns-3 (>= 3.37, with the lte module), libzmq + cppzmq," >&2
  echo "  protobuf (compiler + C++ library), g++ and pkg-config by hand" >&2
  exit 1
fi
as_root=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
  else
    echo "error: missing ${missing[*]} and not root; run as root:" >&2
    echo "  apt-get install -y --no-install-recommends ${missing[*]}" >&2
    exit 1
  fi
fi
echo "installing ${missing[*]}"
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
  --no-install-recommends "${missing[@]}"

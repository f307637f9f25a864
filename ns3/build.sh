#!/usr/bin/env bash
# Build the sfjax ns-3 scenario against the system ns-3 (Debian: libns3-dev 3.37).
# Output: ns3/build/ran_slicing (+ the protobuf C++ code generated from ns3/messages.proto).
# Needs: libns3-dev libzmq3-dev cppzmq-dev libprotobuf-dev protobuf-compiler g++ pkg-config
#   (make ns3-deps installs them on Debian/Ubuntu).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${NS3_BUILD_DIR:-$here/build}"
mkdir -p "$out"

missing=()
command -v g++ >/dev/null || missing+=("g++")
command -v pkg-config >/dev/null || missing+=("pkg-config")
command -v protoc >/dev/null || missing+=("protobuf-compiler")
if command -v pkg-config >/dev/null; then
  pkg-config --exists ns3-lte || missing+=("libns3-dev")
  pkg-config --exists libzmq || missing+=("libzmq3-dev")
  pkg-config --exists protobuf || missing+=("libprotobuf-dev")
fi
[ -f /usr/include/zmq.hpp ] || [ -f /usr/local/include/zmq.hpp ] || missing+=("cppzmq-dev")
if [ "${#missing[@]}" -gt 0 ]; then
  echo "error: missing ns-3 build dependencies: ${missing[*]}" >&2
  echo "  install them with: sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
  echo "  (or: make ns3-deps)" >&2
  exit 3
fi

protoc --cpp_out="$out" -I"$here" "$here/messages.proto"
# Debian's ns-3 .pc files carry a stray '-I/usr;' include flag; keep only sane flags.
cflags="$(pkg-config --cflags ns3-lte ns3-propagation ns3-antenna libzmq protobuf \
  | tr ' ' '\n' | grep -v ';' | tr '\n' ' ')"
libs="$(pkg-config --libs ns3-lte ns3-propagation ns3-antenna ns3-mobility ns3-applications \
  ns3-internet ns3-point-to-point ns3-network ns3-core libzmq protobuf)"
# The .pc files also name absolute dev symlinks (libgsl.so, libxml2.so...) that the ns-3
# shared libraries already depend on; drop those that are not installed.
libs="$(for f in $libs; do case "$f" in /*) [ -e "$f" ] && echo "$f";; *) echo "$f";; esac; done \
  | tr '\n' ' ')"
tmp="$out/ran_slicing.tmp.$$"
# shellcheck disable=SC2086
g++ -std=c++17 -O2 -DNS3_LOG_ENABLE -I"$out" $cflags \
  "$here/ran_slicing.cc" "$out/messages.pb.cc" -o "$tmp" $libs
mv -f "$tmp" "$out/ran_slicing"
echo "built $out/ran_slicing"

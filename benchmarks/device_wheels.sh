#!/usr/bin/env bash
# Wheels of what the paper path (experiments/sf_ranslicing.py, benchmarks/paper_rehearsal.py)
# imports and the lent GPU machine lacks (/work/shared/GPU.md: tyro, openai, gymnax,
# tensorboardX, with their own needs), for Python 3.12 on x86-64 Linux, at the versions this
# project's venv runs. Run it here, where pip reaches PyPI; the device cannot.
#
#   bash benchmarks/device_wheels.sh [DIR]        # DIR defaults to .whl (ignored by git)
#
# A device call then names DIR in `carry` and starts with (the device tool's README):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;
# About 5 MB. typing-extensions, anyio and h11 are on the device at versions not known here;
# they travel too (backward-compatible, and what pydantic / httpx2 need). Not needed there:
# rejax (RL baselines only), pyzmq / gymnasium's extras (ns-3), matplotlib / seaborn / six
# (gymnax imports them; the device has them).
set -euo pipefail

DIR=${1:-.whl}
PIP=${PIP:-python3 -m pip}
WHEELS=(
    # the CLI (experiments/cli_common.py)
    tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1
    # the api Reflector (sfjax/agents/reflectors/api.py, transport.py)
    openai==3.60.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 jiter==0.19.0
    sniffio==1.3.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
    typing-inspection==0.4.5 typing-extensions==4.16.0 anyio==4.16.0 h11==0.16.0
    # the env (sfjax/envs/ran.py) and the loop's TensorBoard writer
    gymnax==1.0.1 gymnasium==1.3.0 farama-notifications==0.0.6 tensorboardX==2.6.5
)
mkdir -p "$DIR"
# pip matches --platform exactly: the manylinux tags a cp312 x86-64 wheel of these may carry
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 \
    --platform manylinux1_x86_64 --platform any \
    -d "$DIR" "${WHEELS[@]}"
n=$(ls "$DIR"/*.whl | wc -l)
if [ "$n" -ne "${#WHEELS[@]}" ]; then
    echo "expected ${#WHEELS[@]} wheels in $DIR, found $n (one version of each, no others)"
    exit 1
fi
du -sh "$DIR"

#!/usr/bin/env bash
# The wheels docs/gpu-check.sh installs on the GPU host, made here (where pip reaches PyPI) into .whl/
# (git-ignored), for the host's Python 3.12: kvserve itself, and the serving dependencies the host's
# image lacks (fastapi, uvicorn, pydantic, llguidance and what they need). torch, transformers, triton,
# numpy, aiohttp, matplotlib, uvloop, httpx, prometheus-client and accelerate are in the image already
# (/work/.library/device/KINDS.md), so nothing here shadows them. Carry `.whl` with the device call.
set -euo pipefail
PY=${PY:-3.12}
rm -rf .whl
mkdir -p .whl
python3 -m pip wheel -q --no-deps . -w .whl
# with their needs, resolved for the host's Python; binary wheels only
python3 -m pip download -q --only-binary=:all: --python-version "$PY" --implementation cp \
    --platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 \
    -d .whl fastapi uvicorn httptools pydantic "llguidance>=1.9,<2" opentelemetry-api
# what the image has already: one version of each package (a second copy would shadow the image's)
for have in typing_extensions anyio idna sniffio click h11 zipp importlib_metadata annotated_doc; do
    rm -f .whl/"$have"-*.whl
done
ls .whl
du -sh .whl

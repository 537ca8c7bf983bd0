#!/usr/bin/env bash
# Build llama.cpp's own C++ `llama-server` for the serving benchmark's peer row.
#
#     benchmarks/build_llama_server.sh            # -> .llama-server/bin/llama-server
#     LLAMA_SERVER_DIR=somewhere benchmarks/build_llama_server.sh
#
# The source is the llama.cpp vendored in the llama-cpp-python sdist (the same pinned version the
# `llamacpp` extra installs), fetched with pip, so the peer and the Python binding run one llama.cpp.
# CPU build, Release, server only (no tests, examples or curl). The result goes into an ignored
# folder (.llama-server/ by default); bench_serve.py looks there, or takes --llama-server PATH.
# About 7 minutes on two busy cores. Set PYTHON to pick the interpreter whose pip downloads.
set -euo pipefail

VERSION=0.3.36
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${LLAMA_SERVER_DIR:-$ROOT/.llama-server}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
JOBS="${JOBS:-$(nproc)}"

if [ -x "$DEST/bin/llama-server" ]; then
    echo "already built: $DEST/bin/llama-server"
    exit 0
fi
mkdir -p "$DEST/src"
if [ ! -f "$DEST/src/llama_cpp_python-$VERSION.tar.gz" ]; then
    "$PYTHON" -m pip download --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$DEST/src"
fi
tar xzf "$DEST/src/llama_cpp_python-$VERSION.tar.gz" -C "$DEST/src"
SOURCE="$DEST/src/llama_cpp_python-$VERSION/vendor/llama.cpp"

cmake -S "$SOURCE" -B "$DEST/build" -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF
cmake --build "$DEST/build" --target llama-server -j "$JOBS"
mkdir -p "$DEST/bin"
cp "$DEST/build/bin/llama-server" "$DEST/bin/llama-server"
rm -rf "$DEST/build" "$DEST/src/llama_cpp_python-$VERSION"
echo "built: $DEST/bin/llama-server"

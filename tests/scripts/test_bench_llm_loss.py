"""scripts/bench_llm_loss.py at a tiny shape, each variant in its own process: the chunked loss and its gradient are
the naive one's, and the scaling table has a row per shape with the size of the logits it implies."""
import re

import pytest

import bench_llm_loss

SHAPE = ["--batch", "2", "--hidden", "8", "--chunk-size", "32", "--device", "cpu"]


def test_both_variants_compute_the_same_loss_and_gradient(capsys):
    bench_llm_loss.main([*SHAPE, "--length", "64", "--vocab", "8192", "--with-ce"])
    header, *rows = capsys.readouterr().out.splitlines()
    # B x L x V float32 values: 2 * 64 * 8192 * 4 bytes = 4 MiB, a chunk's 32 * 8192 * 4 = 1 MiB
    assert header == ("forward KL + CE, B=2 L=64 V=8192 H=8 chunk=32 on cpu: one model's float32 logits are 4 MB, "
                      "one chunk's 1 MB")
    parsed = {}
    for row in rows:
        variant, peak, seconds, loss, grad = re.fullmatch(
            r" *(\w+): peak \+ *(-?[\d.]+) MB +([\d.]+) s  loss ([\d.]+)  \|grad\| ([\d.]+)", row).groups()
        parsed[variant] = float(loss), float(grad)
    assert list(parsed) == ["naive", "chunked"]
    assert parsed["chunked"] == pytest.approx(parsed["naive"], rel=1e-5)


def test_scaling_table_has_a_row_per_shape(capsys):
    bench_llm_loss.main([*SHAPE, "--lengths", "128", "--vocabs", "32000", "--repeats", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "forward KL, B=2 H=8 chunk=32 on cpu, forward + backward, medians of 1:"
    assert lines[1] == ("| L | V | one model's fp32 logits MB | naive peak MB | chunked peak MB | memory ratio | naive s | "
                        "chunked s | time ratio |")
    assert len(lines) == 4
    row = lines[3].strip("| ").split(" | ")
    assert row[:3] == ["128", "32000", "31"]  # 2 x 128 x 32000 float32 values = 31.25 MiB
    assert len(row) == 9

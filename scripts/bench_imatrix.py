"""GGUF types with and without llama.cpp's importance matrix, side by side in one run: the export job twice on the
same model and texts, once with `calibration` (the first training texts of the corpus) and once without; per type,
test perplexity and its gap to F16, mean / 99th-percentile KL divergence from the transformers model and the same-top-1
share, and the ratios that say what the matrix changed.

    python scripts/bench_imatrix.py --config recipes/export_gguf.yaml model=offline:SmolLM2-135M-Instruct \\
        types=[f16,q4_k_m,q3_k_m,q2_k] output_dir=runs/bench-imatrix --examples 64 --json runs/bench-imatrix.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from distill.core.config import CalibrationConfig, parse_args
from quant.config import GgufConfig
from quant.export.gguf import CONVERTER_TYPES, export_gguf


def run_both(cfg: GgufConfig, examples: int) -> dict[str, dict]:
    """The export's metrics with the importance matrix and without, each in a folder of its own."""
    root = Path(cfg.output_dir)
    runs = {"imatrix": CalibrationConfig(examples=examples), "plain": None}
    return {name: export_gguf(dataclasses.replace(cfg, output_dir=str(root / name), calibration=calibration)).metrics
            for name, calibration in runs.items()}


def rows(metrics: dict[str, dict]) -> list[dict]:
    """One row per quantizer type: both runs' figures and the ratios, with and without."""
    out = []
    for name, plain in metrics["plain"]["types"].items():
        if name == "transformers_fp32" or name in CONVERTER_TYPES:
            continue
        weighed = metrics["imatrix"]["types"][name]
        f16 = metrics["plain"]["types"]["f16"]["test_perplexity"]
        gap = {run: row["test_perplexity"] / f16 - 1 for run, row in (("imatrix", weighed), ("plain", plain))}
        out.append({"type": name, "disk_mb": weighed["disk_mb"],
                    "perplexity": {"imatrix": weighed["test_perplexity"], "plain": plain["test_perplexity"]},
                    "gap_to_f16": gap, "gap_ratio": gap["imatrix"] / gap["plain"] if gap["plain"] else None,
                    "kld_mean": {"imatrix": weighed["kld_mean"], "plain": plain["kld_mean"]},
                    "kld_ratio": weighed["kld_mean"] / plain["kld_mean"],
                    "kld_p99": {"imatrix": weighed["kld_p99"], "plain": plain["kld_p99"]},
                    "same_top1": {"imatrix": weighed["same_top1"], "plain": plain["same_top1"]}})
    return out


def table(found: list[dict], f16: float) -> str:
    lines = [f"F16 test perplexity {f16:.3f}", "",
             "| type | disk MB | test ppl (imatrix / plain) | gap to F16 (imatrix / plain) | gap ratio | "
             "mean KLD (imatrix / plain) | KLD ratio | p99 KLD (imatrix / plain) | same top-1 (imatrix / plain) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in found:
        ratio = f"{r['gap_ratio']:.2f}x" if r["gap_ratio"] is not None else "-"
        lines.append(f"| {r['type']} | {r['disk_mb']:.1f} | {r['perplexity']['imatrix']:.3f} / "
                     f"{r['perplexity']['plain']:.3f} | {r['gap_to_f16']['imatrix']:+.2%} / "
                     f"{r['gap_to_f16']['plain']:+.2%} | {ratio} | {r['kld_mean']['imatrix']:.4f} / "
                     f"{r['kld_mean']['plain']:.4f} | {r['kld_ratio']:.2f}x | {r['kld_p99']['imatrix']:.3f} / "
                     f"{r['kld_p99']['plain']:.3f} | {r['same_top1']['imatrix']:.2%} / {r['same_top1']['plain']:.2%} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=64, help="calibration texts of the importance matrix")
    parser.add_argument("--json", help="also write every figure here")
    args, config_args = parser.parse_known_args(argv)
    cfg = parse_args(GgufConfig, config_args)
    if "f16" not in cfg.types:
        raise SystemExit("types must include f16: the gaps are measured against it")
    metrics = run_both(cfg, args.examples)
    found = rows(metrics)
    print(table(found, metrics["plain"]["types"]["f16"]["test_perplexity"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": found, "runs": metrics}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])

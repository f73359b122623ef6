"""Accuracy against encoder layers used, for a model saved with early-exit heads (recipes/distill_early_exit.yaml):
one row per confidence threshold on the test split, as a Markdown table (and JSON with --json). Each example
leaves at the first exit whose top softmax probability reaches the threshold; a threshold of 1 runs the full model.
The compute fraction is encoder layers used over all layers (embeddings and the small heads left out).

    python scripts/early_exit_eval.py runs/student-early-exit/model --thresholds 0.8 0.9 0.95 1.0
    python scripts/early_exit_eval.py MODEL_DIR --data reviews.csv text_column=review label_column=sentiment

The data settings default to those the run recorded (MODEL_DIR/../config.yaml), so the test split is the one the
run held out; --data replaces the source and `key=value` sets any other data key.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml
from torch.utils.data import DataLoader

from distill.core.config import DataConfig, apply_override, from_dict
from distill.core.data import collator, label_names, load_splits, tokenize
from distill.core.errors import ConfigError
from distill.core.models import load_tokenizer
from distill.encoder.early_exit import EarlyExitClassifier, evaluate_thresholds


def data_config(model_dir: Path, source: str | None, overrides: list[str]) -> DataConfig:
    recorded = model_dir.parent / "config.yaml"
    values = yaml.safe_load(recorded.read_text()).get("data", {}) if recorded.is_file() else {}
    if source:
        values["source"] = source
    for item in overrides:
        key, _, raw = item.partition("=")
        apply_override(values, key, raw)
    return from_dict(DataConfig, values, "data")


def held_out_loader(model_dir: Path, cfg: DataConfig, num_labels: int, batch_size: int) -> DataLoader:
    tokenizer = load_tokenizer(str(model_dir))
    splits = load_splits(cfg)
    if len(label_names(splits)) != num_labels:
        raise ConfigError(f"the model predicts {num_labels} classes, {cfg.source} has {len(label_names(splits))}")
    test = tokenize(splits, tokenizer, cfg.max_length)["test"]
    return DataLoader(test, batch_size, collate_fn=collator(tokenizer))


def markdown(rows: list[dict], num_layers: int) -> str:
    lines = [f"| threshold | test acc. | avg. layers (of {num_layers}) | compute | exits (layer: examples) |",
             "|---|---|---|---|---|"]
    for row in rows:
        exits = ", ".join(f"{layer}: {count}" for layer, count in row["exits"].items())
        lines.append(f"| {row['threshold']:g} | {100 * row['accuracy']:.2f} | {row['average_layers']:.2f} | "
                     f"{100 * row['compute_fraction']:.0f}% | {exits} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="model folder with early_exit.json and early_exit.safetensors")
    parser.add_argument("--thresholds", nargs="+", type=float, default=[0.8, 0.9, 0.95, 0.99, 1.0])
    parser.add_argument("--data", help="data source (default: the one the run recorded)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("overrides", nargs="*", help="data keys, e.g. text_column=review max_eval_examples=500")
    args = parser.parse_args(argv)
    try:
        classifier = EarlyExitClassifier.from_pretrained(args.model)
        cfg = data_config(args.model, args.data, args.overrides)
        loader = held_out_loader(args.model, cfg, classifier.heads.num_labels, args.batch_size)
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    rows = evaluate_thresholds(classifier, loader, args.thresholds)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    print(markdown(rows, classifier.num_layers))


if __name__ == "__main__":
    main()

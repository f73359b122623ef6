"""Model files cut short or garbled (an interrupted download or copy, a full disk) are refused in one line that names
the file, a ConfigError, rather than in the long traceback of the library that reads them, which names none.

`check_intact` is the one check every load goes through: `models.resolve_model` runs it on each local model folder
(so on teachers, students, pruned and quantized checkpoints alike) and the teacher cache on its shards, before they
load; it reads headers and JSON, never weights, and each version of a file once per process. A GGUF, whose metadata
costs seconds to parse, is checked only when its load fails (`damage_blamed`)."""
from __future__ import annotations

import functools
import importlib.util
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

from safetensors import safe_open

from distill.core.errors import ConfigError


def check_intact(path: str | Path) -> None:
    """Refuse `path` (a file, or a model folder's weights and JSON files) if a file is incomplete or corrupt."""
    for file in _files(Path(path)):
        stat = file.stat()
        damage = damage_of(str(file), stat.st_size, stat.st_mtime_ns)
        if damage is not None:
            reason = " ".join(str(damage).split()) or type(damage).__name__
            raise ConfigError(f"{file} is incomplete or corrupt ({reason})") from damage


def _files(path: Path) -> list[Path]:
    if not path.is_dir():
        return [path]
    return sorted(file for file in path.iterdir() if file.suffix in FOLDER_SUFFIXES and file.is_file())


@contextmanager
def damage_blamed(path: str | Path) -> Iterator[None]:
    """Inside, an error becomes `check_intact`'s one line when `path` is damaged; otherwise it passes unchanged."""
    try:
        yield
    except Exception:
        if Path(path).exists():  # a missing file is the load's own error to report
            check_intact(path)
        raise


@functools.lru_cache(maxsize=1024)
def damage_of(file: str, size: int, mtime_ns: int) -> Optional[Exception]:
    """The error reading the structure of `file` (of this size and time) raised, or None when it reads or is of a
    kind not checked."""
    read = READERS.get(Path(file).suffix)
    if read is None:
        return None
    try:
        read(Path(file))
    except OSError:  # unreadable (no permission) is not damage: the load itself says so
        raise
    except Exception as err:  # noqa: BLE001 (each reader reports damage in exception types of its own)
        return err
    return None


def _read_safetensors(file: Path) -> None:
    # the header is parsed and its offsets checked against the file's size; no tensor is read
    with safe_open(file, framework="pt"):
        pass


def _read_json(file: Path) -> None:
    json.loads(file.read_bytes())


def _read_gguf(file: Path) -> None:
    if importlib.util.find_spec("gguf") is None:
        return  # nothing to check it with; the load that needs gguf asks for it
    from gguf import GGUFReader

    GGUFReader(file)  # memory-mapped: metadata and tensor extents are checked, tensor data is not read


READERS: dict[str, Callable[[Path], None]] = {".safetensors": _read_safetensors, ".json": _read_json,
                                              ".gguf": _read_gguf}
FOLDER_SUFFIXES = (".safetensors", ".json")
"""What a model folder's load reads."""

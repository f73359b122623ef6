"""Name registries: losses, importance criteria, pipeline stage kinds, quantization variants and jobs each live in
one. They behave alike: registering a name twice is an error, and an unknown name is a `ConfigError` that names the
closest registered one."""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

from distill.core.errors import ConfigError, did_you_mean

T = TypeVar("T")


class Registry(dict[str, T], Generic[T]):
    """Names of one kind of thing (`what`: "loss", "stage kind", ...) -> the thing."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def add(self, name: str, value: T) -> T:
        if name in self:
            raise ValueError(f"{self.what} '{name}' is already registered")
        self[name] = value
        return value

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of `add`."""
        return lambda value: self.add(name, value)

    def require(self, name: str, where: str = "") -> T:
        """The thing registered as `name`, or a `ConfigError` (prefixed by `where`) naming the closest name."""
        if name not in self:
            raise ConfigError(f"{where}unknown {self.what} '{name}'; {did_you_mean(name, sorted(self))}")
        return self[name]

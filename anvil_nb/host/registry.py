"""The registry: which providers serve which names.

Names are regular expressions that must match the whole command (Anvil's rule; a plain name
such as ``"say_hello"`` matches itself). Registering is idempotent and a provider's names go
when it does. When several providers match a command, calls go to them in turn (round-robin;
Anvil picks one at random): load spreads evenly and each call goes to exactly one provider.

Lookups are cached per command, and the cache is cleared when registrations change, so the
hot path is one dict lookup.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["Registry"]

P = TypeVar("P", bound=Hashable)

_CACHE_LIMIT = 4096


class Registry(Generic[P]):
    """Names (full-match regexes) to the providers that registered them."""

    def __init__(self) -> None:
        self._names: dict[str, tuple[re.Pattern[str], list[P]]] = {}
        self._cache: dict[str, tuple[P, ...]] = {}
        self._turn: dict[str, int] = {}

    def add(self, name: str, provider: P) -> bool:
        """Register *name* for *provider*; True if it was not registered by it already.

        Raises
        ------
        ValueError
            *name* is not a valid regular expression.
        """
        entry = self._names.get(name)
        if entry is None:
            try:
                pattern = re.compile(name)
            except (re.error, TypeError, RecursionError, OverflowError) as exc:
                raise ValueError(f"invalid function name specification {name!r}: {exc}") from exc
            entry = self._names[name] = (pattern, [])
        if provider in entry[1]:
            return False
        entry[1].append(provider)
        self._cache.clear()
        return True

    def remove(self, name: str, provider: P) -> bool:
        """Withdraw *name* for *provider*; True if it was registered."""
        entry = self._names.get(name)
        if entry is None or provider not in entry[1]:
            return False
        entry[1].remove(provider)
        if not entry[1]:
            del self._names[name]
        self._cache.clear()
        return True

    def remove_provider(self, provider: P) -> list[str]:
        """Withdraw every name of *provider*; return them."""
        gone = [name for name, (_, providers) in self._names.items() if provider in providers]
        for name in gone:
            self.remove(name, provider)
        return gone

    def providers(self, command: str) -> tuple[P, ...]:
        """Every provider with a name that fully matches *command*, in registration order."""
        found = self._cache.get(command)
        if found is None:
            seen: dict[P, None] = {}
            for pattern, providers in self._names.values():
                if pattern.fullmatch(command):
                    for p in providers:
                        seen[p] = None
            found = tuple(seen)
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[command] = found
        return found

    def pick(self, command: str) -> P | None:
        """The provider to send the next call of *command* to (round-robin), or ``None``."""
        found = self.providers(command)
        if not found:
            return None
        if len(found) == 1:
            return found[0]
        turn = self._turn.get(command, 0)
        self._turn[command] = turn + 1
        return found[turn % len(found)]

    def names(self) -> dict[str, tuple[P, ...]]:
        """A snapshot: every registered name and its providers."""
        return {name: tuple(providers) for name, (_, providers) in self._names.items()}

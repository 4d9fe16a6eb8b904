"""One dataset row: an image (or none), the user's prompt text, an optional reference answer, and
where it came from (for error messages that name the file and row)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import VlmpruneError


@dataclass(frozen=True)
class Example:
    """``image``: a PIL image or None (text only); ``prompt``: the user's text, without any chat
    template (the checkpoint's template is applied when the example is encoded); ``answer``: the
    reference answer or None; ``origin``: e.g. ``"data.jsonl row 3"``."""

    image: Any
    prompt: str
    answer: str | None = None
    origin: str = ""


def row_error(origin: str, problem: str) -> VlmpruneError:
    """One line naming the file and row, then the problem and the fix."""
    return VlmpruneError(f"{origin}: {problem}")


def take(examples: Sequence[Example], n: int | None, what: str, source: str) -> list[Example]:
    """The first `n` examples (all when None); a clear error when the data has fewer."""
    examples = list(examples)
    if n is None:
        return examples
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise VlmpruneError(f"{what} must be a positive number of samples, got {n!r}")
    if n > len(examples):
        raise VlmpruneError(f"{what} {n} asks for more samples than {source} has ({len(examples)}); lower {what} or add rows")
    return examples[:n]

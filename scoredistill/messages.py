"""Values quoted in error messages, cut to a readable length."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

LIMIT = 200
"""Characters a quoted value may take in an error message."""


def brief(value: object, limit: int = LIMIT) -> str:
    """``repr(value)`` (``str`` for strings) of at most about ``limit`` characters.

    Long sequences show their first items and their length; tensors their shape and dtype.

    Example:
        >>> brief(list(range(2000)))
        '[0, 1, 2, 3, 4, 5, ... (2000 items)]'
    """
    if isinstance(value, Tensor) and value.numel() > 8:
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    if isinstance(value, Sequence) and not isinstance(value, str | bytes) and len(value) > 8:
        open_, close = ("[", "]") if isinstance(value, list) else ("(", ")")
        head = ", ".join(brief(v, limit // 8) for v in value[:6])
        text = f"{open_}{head}, ... ({len(value)} items){close}"
    else:
        text = value if isinstance(value, str) else repr(value)
    if len(text) > limit:
        text = f"{text[:limit - 30]}... ({len(text)} characters)"
    return text

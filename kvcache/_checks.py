"""Argument checks of the manager's ops: `ValueError` naming the value and what was expected."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ._rows import ragged

__all__ = [
    "as_counts",
    "as_forks",
    "as_token_array",
    "as_token_list",
    "check_count",
    "check_hashable",
    "check_position",
]


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_count(name: str, value: object, *, minimum: int = 1) -> None:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid; expected an integer >= {minimum}")


def as_counts(num_tokens: object, n: int) -> np.ndarray:
    """One token count >= 0 per sequence (int64), from one count or a sequence of `n`."""
    if _is_int(num_tokens):
        check_count("num_tokens", num_tokens, minimum=0)
        return np.full(n, int(num_tokens), np.int64)
    counts = np.asarray(num_tokens)
    if counts.shape != (n,) or counts.dtype.kind not in "iu" or (n and counts.min() < 0):
        raise ValueError(
            f"num_tokens must be one integer >= 0 or {n} of them (one per sequence); "
            f"got {num_tokens!r}"
        )
    return counts.astype(np.int64)


def as_forks(forks: object, n: int) -> list[list]:
    """One list of new sequence ids per sequence, no id twice."""
    if isinstance(forks, (str, bytes)) or not isinstance(forks, Sequence) or len(forks) != n:
        raise ValueError(f"forks must hold {n} lists of new ids (one per sequence); got {forks!r}")
    forks = [list(f) for f in forks]
    children = [c for f in forks for c in f]
    for child in children:
        check_hashable(child, "fork id")
    if len(set(children)) != len(children):
        raise ValueError(f"duplicate ids in forks {forks!r}")
    return forks


def as_sources(src_indices: object, n: int) -> np.ndarray:
    """Beam reorder sources: `n` integer indices in 0..n-1 (int64)."""
    src = np.asarray(src_indices)
    if (
        src.ndim != 1
        or src.shape[0] != n
        or src.dtype.kind not in "iu"
        or (src.size and (src.min() < 0 or src.max() >= n))
    ):
        raise ValueError(
            f"src_indices must hold {n} integer indices in 0..{n - 1}; got {list(src_indices)!r}"
        )
    return src.astype(np.int64)


def step_inputs(
    num_tokens: object,
    n: int,
    token_ids: object,
    valid: object,
    num_queries: object,
    keep: object,
) -> tuple:
    """A step's arguments for `n` sequences, checked: (new tokens per sequence, `ragged` of
    them (row_of, index), their ids or None, their validity or None, rows holding a pad (bool
    `[n]`) or None)."""
    new = as_counts(num_tokens, n)
    if num_queries is not None:
        check_count("num_queries", num_queries, minimum=max(int(new.max()), 1))
    if keep is not None:
        check_count("keep", keep, minimum=0)
    row_of, index = ragged(new)
    flags = padded = None
    if valid is not None:
        flags = as_token_array(valid, new, kind="b", name="valid")
        if not flags.all():  # rows with pads stored: their ids no longer name the slots
            padded = np.zeros(n, bool)
            padded[row_of[~flags]] = True
    ids = None if token_ids is None else as_token_array(token_ids, new)
    return new, (row_of, index), ids, flags, padded


def check_position(num_tokens: object, length: int, what: str) -> None:
    """`num_tokens` must be a token count within a sequence of `length` tokens."""
    if not _is_int(num_tokens) or not 0 <= num_tokens <= length:
        raise ValueError(f"{what} {num_tokens!r} tokens; expected an integer in 0..{length}")


def check_hashable(value: object, name: str) -> None:
    try:
        hash(value)
    except TypeError:
        raise ValueError(f"{name}={value!r} is not hashable") from None


def as_token_list(token_ids: object, name: str = "token_ids") -> list[int]:
    """A 1-D sequence (or tensor / array) of integer token ids, as a list of Python ints."""
    if isinstance(token_ids, (torch.Tensor, np.ndarray)):
        if token_ids.ndim != 1:
            raise ValueError(f"{name} must be 1-D; got shape {tuple(token_ids.shape)}")
        _check_dtype(token_ids, name)
        return token_ids.tolist()
    if isinstance(token_ids, (str, bytes)) or not isinstance(token_ids, Sequence):
        raise ValueError(f"{name} must be a sequence of ints; got {token_ids!r}")
    if set(map(type, token_ids)) <= {int}:  # plain ints (a prompt's .tolist()): one C pass
        return list(token_ids)
    bad = next((t for t in token_ids if not _is_int(t)), None)
    if bad is not None:
        raise ValueError(f"{name} must hold integers; got {bad!r} in {list(token_ids)!r}")
    return [int(t) for t in token_ids]


def as_token_array(
    values: object, counts: np.ndarray, *, kind: str = "i", name: str = "token_ids"
) -> np.ndarray:
    """One value per new token, packed row after row: from a 2-D tensor / array or one
    sequence per row; row i must hold `counts[i]` values. `kind` "i": integer ids (int64),
    "b": booleans."""
    if isinstance(values, (torch.Tensor, np.ndarray)) and values.ndim == 2:
        _check_dtype(values, name, kind)
        got = [values.shape[1]] * values.shape[0]
        flat = None
        if got == counts.tolist():
            data = values.detach().cpu() if isinstance(values, torch.Tensor) else values
            flat = np.asarray(data).reshape(-1)
    elif isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must hold one sequence per row; got {values!r}")
    else:
        rows = [_as_list(t, f"{name}[{i}]", kind) for i, t in enumerate(values)]
        got = [len(r) for r in rows]
        flat = np.fromiter((t for r in rows for t in r), np.int64, sum(got))
    if got != counts.tolist():
        raise ValueError(
            f"{name} has rows of lengths {got}; expected {counts.tolist()} (one per new token)"
        )
    if kind == "b":
        if flat.dtype != bool and flat.size and not np.isin(flat, (0, 1)).all():
            raise ValueError(f"{name} must hold bools (or 0 / 1); got values {np.unique(flat)}")
        return flat.astype(bool, copy=False)
    return flat.astype(np.int64, copy=False)


def _as_list(values: object, name: str, kind: str) -> list[int]:
    if kind == "i":
        return as_token_list(values, name)
    if isinstance(values, (torch.Tensor, np.ndarray)):
        if values.ndim != 1:
            raise ValueError(f"{name} must be 1-D; got shape {tuple(values.shape)}")
        _check_dtype(values, name, kind)
        return values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a sequence of bools; got {values!r}")
    bad = next((v for v in values if not (isinstance(v, (bool, np.bool_)) or v in (0, 1))), None)
    if bad is not None:
        raise ValueError(f"{name} must hold bools (or 0 / 1); got {bad!r} in {list(values)!r}")
    return [bool(v) for v in values]


def _check_dtype(t: torch.Tensor | np.ndarray, name: str, kind: str = "i") -> None:
    if isinstance(t, torch.Tensor):
        integer = not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)
        ok = integer or (kind == "b" and t.dtype == torch.bool)
    else:
        ok = t.dtype.kind in ("biu" if kind == "b" else "iu")
    if not ok:
        expected = "bools" if kind == "b" else "integers"
        raise ValueError(f"{name} must hold {expected}; got dtype {t.dtype}")

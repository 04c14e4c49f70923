"""`KVCacheStats`: a snapshot of what the manager holds and what happened so far."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["GroupStats", "KVCacheStats"]


@dataclass(frozen=True)
class GroupStats:
    """One KV cache group's pool (full attention, or one sliding window)."""

    window: int | None
    num_blocks: int
    num_used_blocks: int
    peak_used_blocks: int
    num_free_blocks: int
    num_cached_blocks: int
    evictions: int
    bytes_per_block: int  # of this group: its layers' K and V of block_size tokens

    @classmethod
    def of_pools(cls, config: Any, allocators: list) -> tuple[GroupStats, ...]:
        """Each group's stats, from the config's groups and their allocators."""
        return tuple(
            cls.of(group.window, allocator, config.group_bytes_per_block(g))
            for g, (group, allocator) in enumerate(zip(config.groups, allocators, strict=True))
        )

    @classmethod
    def of(cls, window: int | None, allocator: Any, bytes_per_block: int) -> GroupStats:
        return cls(
            window,
            allocator.num_blocks,
            allocator.num_used_blocks,
            allocator.peak_used_blocks,
            allocator.num_free_blocks,
            allocator.num_cached_blocks,
            allocator.num_evictions,
            bytes_per_block,
        )


@dataclass(frozen=True)
class KVCacheStats:
    """A snapshot of the manager's counters (`manager.stats`). Block counts add up every KV
    cache group; `groups` has each group's own."""

    num_blocks: int
    num_used_blocks: int
    peak_used_blocks: int  # each group's most blocks in use at once, added up
    num_free_blocks: int
    num_cached_blocks: int  # registered in the prefix cache, in use or free
    num_seqs: int
    num_swapped_seqs: int
    prefix_queries: int  # prompt tokens looked up in the prefix cache
    prefix_hits: int  # of those, tokens found cached
    evictions: int  # cached blocks reused for new data
    swapped_out_blocks: int
    swapped_in_blocks: int
    cow_copies: int  # blocks copied because a shared last block was written
    # the most KV bytes held at once, every group together, since creation or a reset
    peak_used_bytes: int = 0
    groups: tuple[GroupStats, ...] = field(default=(), repr=False)

    @classmethod
    def of(cls, groups: tuple[GroupStats, ...], **counters: int) -> KVCacheStats:
        def total(name: str) -> int:
            return sum(getattr(g, name) for g in groups)

        return cls(
            num_blocks=total("num_blocks"),
            num_used_blocks=total("num_used_blocks"),
            peak_used_blocks=total("peak_used_blocks"),
            num_free_blocks=total("num_free_blocks"),
            num_cached_blocks=total("num_cached_blocks"),
            evictions=total("evictions"),
            groups=groups,
            **counters,
        )

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def as_dict(self) -> dict:
        """The counters, plus `usage` and `prefix_hit_rate` rounded to 4 decimals (a printed
        dict shows 0.5, not 0.49999999999999994; the counters give the exact ratio)."""
        return {
            **{k: v for k, v in asdict(self).items() if k != "groups"},
            "groups": [asdict(g) for g in self.groups],
            "usage": round(self.usage, 4),
            "prefix_hit_rate": round(self.prefix_hit_rate, 4),
        }

    def __str__(self) -> str:
        """A readable summary (`repr` keeps every field, as a dataclass does)."""
        return (
            f"blocks {self.num_used_blocks}/{self.num_blocks} in use ({self.usage:.1%}), peak "
            f"{self.peak_used_blocks}, {self.num_cached_blocks} cached; {self.num_seqs} sequences "
            f"({self.num_swapped_seqs} swapped out); prefix cache: {self.prefix_hits} of "
            f"{self.prefix_queries} prompt tokens found ({self.prefix_hit_rate:.1%}), "
            f"{self.evictions} evictions; {self.cow_copies} copy-on-write copies; swapped "
            f"{self.swapped_out_blocks} blocks out, {self.swapped_in_blocks} in"
            + self._groups_text()
        )

    def _groups_text(self) -> str:
        if len(self.groups) < 2:
            return ""
        parts = [
            f"{'full attention' if g.window is None else f'window {g.window}'} "
            f"{g.num_used_blocks}/{g.num_blocks} (peak {g.peak_used_blocks})"
            for g in self.groups
        ]
        return f"; per group: {', '.join(parts)}"

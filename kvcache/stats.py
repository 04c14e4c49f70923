"""`KVCacheStats`: a snapshot of what the manager holds and what happened so far."""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["KVCacheStats"]


@dataclass(frozen=True)
class KVCacheStats:
    """A snapshot of the manager's counters (`manager.stats`)."""

    num_blocks: int
    num_used_blocks: int
    peak_used_blocks: int  # most blocks in use at once since creation or `reset_peak_usage()`
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
            **asdict(self),
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
        )

"""How a manager shows itself: a one-line summary, and the block map (a list, or HTML in Jupyter)."""

from __future__ import annotations

import html
from typing import Any

from ._memory import format_bytes

__all__ = ["block_map", "block_map_html", "summary"]

_PALETTE = [
    "#4e79a7",
    "#59a14f",
    "#9c755f",
    "#af7aa1",
    "#76b7b2",
    "#edc948",
    "#e15759",
    "#b07aa1",
    "#86bcb6",
    "#8cd17d",
]
_STATE_COLORS = {"free": "#eeeeee", "cached": "#cfe2f3", "shared": "#f28e2b"}


def summary(manager: Any) -> str:
    """`repr(manager)`: sequences, block usage, geometry, prefix hits."""
    s = manager.stats
    c = manager.config
    return (
        f"KVCacheManager(seqs={s.num_seqs}, swapped={s.num_swapped_seqs}, "
        f"blocks={s.num_used_blocks}/{s.num_blocks} used ({s.usage:.1%}), "
        f"cached={s.num_cached_blocks}, block_size={c.block_size}, layers={c.num_layers}, "
        f"kv_heads={c.num_kv_heads}, head_dim={c.head_dim}, dtype={c.dtype.value}, "
        f"device={manager.cache.pool.device}, pool={format_bytes(c.total_bytes)}, "
        f"prefix_hits={s.prefix_hits}/{s.prefix_queries} tokens)"
    )


def block_map(manager: Any) -> list[dict]:
    """Per block: state ('free', 'cached', 'used', 'shared'), ref count, owners, tokens."""
    owners: dict[int, list] = {}
    fill: dict[int, int] = {}
    bs = manager.block_size
    for seq_id in manager.seq_ids:
        blocks = manager.get_blocks(seq_id)
        for i, b in enumerate(blocks.block_ids):
            owners.setdefault(b, []).append(seq_id)
            fill[b] = min(bs, blocks.num_tokens - i * bs)
    out = []
    for block in manager.allocator.blocks:
        if block.ref_count == 0:
            state = "free" if block.block_hash is None else "cached"
        else:
            state = "shared" if block.ref_count > 1 else "used"
        out.append(
            {
                "block_id": block.block_id,
                "state": state,
                "ref_count": block.ref_count,
                "owners": owners.get(block.block_id, []),
                "num_tokens": fill.get(block.block_id, 0),
                "hashed": block.block_hash is not None,
            }
        )
    return out


def block_map_html(manager: Any, max_blocks: int = 1024) -> str:
    """The block map as HTML: one square per block, coloured by state or owning sequence."""
    bs = manager.block_size
    seq_ids = manager.seq_ids
    seq_color = {sid: _PALETTE[i % len(_PALETTE)] for i, sid in enumerate(seq_ids)}
    cells = []
    for info in block_map(manager)[:max_blocks]:
        state = info["state"]
        color = _STATE_COLORS.get(state) or seq_color[info["owners"][0]]
        title = (
            f"block {info['block_id']}: {state}, ref {info['ref_count']}, "
            f"{info['num_tokens']}/{bs} tokens"
            + (", hashed" if info["hashed"] else "")
            + (f", seqs {info['owners']}" if info["owners"] else "")
        )
        label = str(info["ref_count"]) if info["ref_count"] > 1 else ""
        opacity = 0.45 + 0.55 * info["num_tokens"] / bs if state in ("used", "shared") else 1
        cells.append(
            f'<div title="{html.escape(title)}" style="width:14px;height:14px;margin:1px;'
            f"background:{color};font:9px monospace;color:#fff;text-align:center;"
            f'line-height:14px;opacity:{opacity}">{label}</div>'
        )
    legend = " ".join(
        f'<span style="background:{seq_color[s]};color:#fff;padding:0 4px">'
        f"{html.escape(str(s))}</span>"
        for s in seq_ids[:20]
    )
    num_blocks = manager.config.num_blocks
    more = f"<div>… {num_blocks - max_blocks} more blocks</div>" if num_blocks > max_blocks else ""
    swatch = '<span style="background:{}">&nbsp;&nbsp;</span>'
    return (
        f"<div><pre>{html.escape(summary(manager))}</pre>"
        f'<div style="display:flex;flex-wrap:wrap;max-width:640px">{"".join(cells)}</div>{more}'
        f'<div style="font:11px sans-serif;margin-top:4px">'
        f"free {swatch.format(_STATE_COLORS['free'])} "
        f"cached {swatch.format(_STATE_COLORS['cached'])} "
        f"shared {swatch.format(_STATE_COLORS['shared'])} sequences: {legend}</div></div>"
    )

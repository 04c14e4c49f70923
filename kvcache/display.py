"""How a manager shows itself: a one-line summary, and the block map (a list, or HTML in Jupyter).

The HTML map draws one square per block, coloured by its owning sequence (free, cached and
shared blocks have their own looks). A pool larger than the drawing limit collapses long runs of
free blocks into one labelled gap, and anything still left undrawn is counted in a note, so the
map never hides blocks silently.
"""

from __future__ import annotations

import html
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

from ._memory import format_bytes

__all__ = ["batch_labels", "block_map", "block_map_html", "cached_blocks", "summary"]

# Distinct, colour-blind-friendly colours for the first sequences (Tableau 10, without its
# grey, which is close to a free block); later ones get hues spread by the golden angle.
_PALETTE = [
    "#4e79a7",
    "#59a14f",
    "#9c755f",
    "#af7aa1",
    "#76b7b2",
    "#edc948",
    "#e15759",
    "#f28e2b",
    "#ff9da7",
]
_FREE, _CACHED = "#eeeeee", "#cfe2f3"
# A run of at least this many free blocks is drawn as one gap when the pool is too big to draw.
_MIN_GAP = 8
_MAX_LEGEND = 40


def summary(manager: Any) -> str:
    """`repr(manager)`: sequences, block usage, geometry, prefix hits."""
    s = manager.stats
    c = manager.config
    return (
        f"KVCacheManager(seqs={s.num_seqs}, swapped={s.num_swapped_seqs}, "
        f"blocks={s.num_used_blocks}/{s.num_blocks} used ({s.usage:.1%}), "
        f"cached={s.num_cached_blocks}, block_size={c.block_size}, layers={c.num_layers}, "
        f"kv_heads={c.num_kv_heads}, head_dim={c.head_dim}, dtype={c.dtype.value}, "
        f"device={manager.cache.device}, pool={format_bytes(c.total_bytes)}, "
        f"prefix_hits={s.prefix_hits}/{s.prefix_queries} tokens)"
    )


def block_map(manager: Any, group: int = 0) -> list[dict]:
    """Per block of a KV cache group's pool: state ('free', 'cached', 'used', 'shared'), ref
    count, owners, tokens."""
    owners: dict[int, list] = {}
    fill: dict[int, int] = {}
    bs = manager.block_size
    for seq_id in manager.seq_ids:
        blocks = manager.get_blocks(seq_id, group)
        for i, b in enumerate(blocks.block_ids):
            if b < 0:
                continue  # released out of a sliding window
            owners.setdefault(b, []).append(seq_id)
            fill[b] = min(bs, blocks.num_tokens - i * bs)
    out = []
    for block in manager.allocators[group].blocks:
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


def cached_blocks(manager: Any) -> dict[tuple[int, int], int]:
    """(group, block id) -> prefix-cache key of every block registered in the prefix cache now.

    Take it before a call and pass it as `since=` to `block_map_html` during or after the call:
    blocks in use then under the same key were found in the prefix cache, not computed anew.
    """
    return {
        (g, b.block_id): b.block_hash.value
        for g, allocator in enumerate(manager.allocators)
        for b in allocator.blocks
        if b.block_hash is not None
    }


def batch_labels(seq_ids: Sequence[Hashable], num_beams: int = 1) -> dict[Hashable, str]:
    """Readable labels for the sequences of one batch, in row order: 'row 0', 'row 1', ...; with
    `num_beams` > 1, 'r0 b1' (row 0, beam 1), as generate lays beams out (row-major)."""
    if num_beams < 1:
        raise ValueError(f"num_beams is {num_beams}; expected an integer >= 1")
    if num_beams == 1:
        return {sid: f"row {i}" for i, sid in enumerate(seq_ids)}
    return {sid: f"r{i // num_beams} b{i % num_beams}" for i, sid in enumerate(seq_ids)}


def short_label(seq_id: Hashable, width: int = 12) -> str:
    """A short text for a sequence id: a tuple id such as ('pagedkv.hf', 17) shows its last
    part ('17'); anything longer than `width` characters is cut with an ellipsis."""
    if isinstance(seq_id, tuple) and seq_id:
        seq_id = seq_id[-1]
    text = str(seq_id)
    return text if len(text) <= width else text[: width - 1] + "…"


def seq_color(index: int) -> str:
    """The colour of the `index`-th sequence: the palette, then golden-angle hues (distinct for
    hundreds of sequences: consecutive ones are ~137 degrees apart, lightness alternates)."""
    if index < len(_PALETTE):
        return _PALETTE[index]
    hue = (index * 137.508) % 360
    return f"hsl({hue:.0f}, 60%, {42 if index % 2 else 55}%)"


# ---- HTML -----------------------------------------------------------------------------------
def block_map_html(
    manager: Any,
    max_blocks: int = 1024,
    *,
    labels: Mapping[Hashable, str] | None = None,
    since: Mapping[int, int] | None = None,
) -> str:
    """The block map as HTML: one square per block, coloured by state or owning sequence.

    `max_blocks` bounds the squares drawn: a larger pool has its long runs of free blocks drawn
    as one gap each, and a note counts any blocks left undrawn. `labels` names sequences in the
    legend and tooltips (default: a short form of each id; see `batch_labels`). `since`, from
    `cached_blocks` taken earlier, marks blocks in use that came from the prefix cache (hatched).
    """
    if max_blocks < 1:
        raise ValueError(f"max_blocks is {max_blocks}; expected an integer >= 1")
    seq_ids = manager.seq_ids
    names = {sid: (labels or {}).get(sid) or short_label(sid) for sid in seq_ids}
    colors = {sid: seq_color(i) for i, sid in enumerate(seq_ids)}
    groups = manager.config.groups
    sections = []
    for g, group in enumerate(groups):
        reused = _reused_blocks(manager, g, since)
        infos = block_map(manager, g)
        items, covered = _layout(infos, max_blocks)
        small = len(items) > 512  # big maps: smaller squares, no ref-count digits
        cells = [
            _gap_html(item, small)
            if isinstance(item, tuple)
            else _cell_html(
                item, manager.block_size, colors, names, item["block_id"] in reused, small
            )
            for item in items
        ]
        caption = ""
        if len(groups) > 1:
            kind = "full attention" if group.window is None else f"sliding window {group.window}"
            caption = f"<div><b>{kind}</b>: layers {list(group.layers)}</div>"
        sections.append(
            f'{caption}<div style="display:flex;flex-wrap:wrap">{"".join(cells)}</div>'
            f"{_undrawn_html(infos, covered) if covered < len(infos) else ''}"
        )
    return (
        f'<div style="font:12px sans-serif;max-width:820px">{_header_html(manager)}'
        f"{''.join(sections)}{_legend_html(seq_ids, names, colors, bool(since))}</div>"
    )


def _reused_blocks(manager: Any, group: int, since: Mapping | None) -> set[int]:
    """Blocks of a group in use now under the prefix-cache key they had in `since`."""
    if not since:
        return set()
    now = cached_blocks(manager)
    return {
        b.block_id
        for b in manager.allocators[group].blocks
        if b.ref_count > 0 and now.get((group, b.block_id), -1) == since.get((group, b.block_id))
    }


def _layout(infos: list[dict], max_blocks: int) -> tuple[list, int]:
    """(what to draw: block infos and (first, last) gaps of free blocks, blocks covered).

    A pool that fits is drawn whole; otherwise runs of >= _MIN_GAP free blocks become gaps,
    and drawing stops after `max_blocks` squares."""
    if len(infos) <= max_blocks:
        return list(infos), len(infos)
    items: list = []
    squares = covered = 0
    i = 0
    while i < len(infos) and squares < max_blocks:
        j = i
        while j < len(infos) and infos[j]["state"] == "free":
            j += 1
        if j - i >= _MIN_GAP:
            items.append((i, j - 1))
            covered += j - i
            i = j
            continue
        items.append(infos[i])
        squares += 1
        covered += 1
        i += 1
    return items, covered


def _header_html(manager: Any) -> str:
    """Three short lines (wrapping, never wider than the map) instead of the one-line repr."""
    s, c = manager.stats, manager.config
    lines = [
        f"{s.num_seqs} sequences ({s.num_swapped_seqs} swapped out); blocks "
        f"{s.num_used_blocks}/{s.num_blocks} in use ({s.usage:.1%}), peak {s.peak_used_blocks}, "
        f"{s.num_cached_blocks} in the prefix cache",
        f"block: {c.block_size} tokens x {c.num_layers} layers x {c.num_kv_heads} KV heads x "
        f"head_dim {c.head_dim}, {c.dtype.value} on {manager.cache.device}; pool "
        f"{format_bytes(c.total_bytes)}",
        f"prefix cache: {s.prefix_hits} of {s.prefix_queries} prompt tokens found "
        f"({s.prefix_hit_rate:.1%}); {s.evictions} evictions; {s.cow_copies} copy-on-write copies",
    ]
    line = '<div style="font:12px monospace;overflow-wrap:anywhere">{}</div>'
    return "<b>KVCacheManager</b>" + "".join(line.format(html.escape(t)) for t in lines)


def _cell_html(
    info: dict, block_size: int, colors: dict, names: dict, reused: bool, small: bool
) -> str:
    state = info["state"]
    owners = info["owners"]
    if state == "free":
        color = _FREE
    elif state == "cached":
        color = _CACHED
    else:
        color = colors[owners[0]]
    title = (
        f"block {info['block_id']}: {state}, ref {info['ref_count']}, "
        f"{info['num_tokens']}/{block_size} tokens"
        + (", in the prefix cache" if info["hashed"] else "")
        + (", found in the prefix cache by this call" if reused else "")
        + (f"; {', '.join(names[o] for o in owners)}" if owners else "")
    )
    size = 8 if small else 14
    style = f"width:{size}px;height:{size}px;margin:1px;background-color:{color};"
    if state in ("used", "shared"):  # a partly filled block is paler
        style += f"opacity:{0.45 + 0.55 * info['num_tokens'] / block_size:.2f};"
    if reused:  # hatched: these K/V were not computed by this call
        style += (
            "background-image:repeating-linear-gradient(45deg,rgba(255,255,255,.7) 0 2px,"
            "transparent 2px 5px);"
        )
    if state == "shared":  # a dark frame; the digit is the number of holders
        style += "box-shadow:inset 0 0 0 2px #222;"
    label = str(info["ref_count"]) if state == "shared" and not small else ""
    style += (
        f"font:{9 if not small else 6}px monospace;color:#000;text-align:center;"
        f"line-height:{size}px"
    )
    return f'<div title="{html.escape(title)}" style="{style}">{label}</div>'


def _gap_html(gap: tuple[int, int], small: bool) -> str:
    first, last = gap
    size = 8 if small else 14
    return (
        f'<div title="blocks {first}-{last}: free" style="height:{size}px;margin:1px;'
        f"padding:0 4px;background:{_FREE};font:9px sans-serif;color:#666;"
        f'line-height:{size}px">{last - first + 1} free</div>'
    )


def _undrawn_html(infos: list[dict], start: int) -> str:
    rest = infos[start:]
    counts = {state: sum(i["state"] == state for i in rest) for state in _STATES}
    parts = ", ".join(f"{n} {state}" for state, n in counts.items() if n)
    return (
        f"<div>blocks {start}-{len(infos) - 1} not drawn ({len(rest)} blocks: {parts}); "
        f"pass a larger max_blocks to block_map_html to draw them</div>"
    )


_STATES = ("used", "shared", "cached", "free")


def _legend_html(seq_ids: Iterable[Hashable], names: dict, colors: dict, marks: bool) -> str:
    seq_ids = list(seq_ids)
    chip = (
        '<span style="background:{};color:#fff;text-shadow:0 0 2px #000;padding:0 4px;'
        'margin-right:2px;white-space:nowrap">{}</span>'
    )
    seqs = "".join(chip.format(colors[s], html.escape(names[s])) for s in seq_ids[:_MAX_LEGEND])
    if len(seq_ids) > _MAX_LEGEND:
        seqs += f" and {len(seq_ids) - _MAX_LEGEND} more (hover a block to see its sequences)"
    swatch = '<span style="background:{};padding:0 6px;margin:0 2px"></span>'
    keys = (
        f"free {swatch.format(_FREE)} cached (free, keeps its prefix) {swatch.format(_CACHED)} "
        "shared: dark frame, the digit counts holders; paler = partly filled"
    )
    if marks:
        keys += "; hatched: found in the prefix cache"
    return (
        f'<div style="font:11px sans-serif;margin-top:4px">{keys}</div>'
        f'<div style="font:11px sans-serif;margin-top:2px;line-height:18px">sequences: '
        f"{seqs or '(none)'}</div>"
    )

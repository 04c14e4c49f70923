"""The block map the notebook shows (kvcache/display.py): readable sequence names, distinct
colours for many sequences, blocks from the prefix cache marked, nothing hidden silently; and the
stats' printed ratios."""

from __future__ import annotations

import re

import pytest

from pagedkv.kvcache import KVCacheConfig, KVCacheManager
from pagedkv.kvcache.display import batch_labels, block_map_html, cached_blocks, seq_color

HF_ID = "pagedkv.hf"  # how the transformers integration names its sequences


def _manager(num_blocks: int, block_size: int = 4) -> KVCacheManager:
    config = KVCacheConfig(
        num_layers=1, num_kv_heads=1, head_dim=8, block_size=block_size, num_blocks=num_blocks
    )
    return KVCacheManager(config)


def _add(mgr: KVCacheManager, seq_id, tokens: list[int]) -> None:
    """A sequence whose tokens are all computed (full blocks join the prefix cache)."""
    cached = mgr.allocate(seq_id, tokens)
    mgr.append(seq_id, len(tokens) - cached)


def test_many_sequences_get_distinct_colours_and_short_names():
    mgr = _manager(512)
    for i in range(30):
        _add(mgr, (HF_ID, 100 + i), list(range(1000 * i, 1000 * i + 9)))
    html = block_map_html(mgr)
    legend = html[html.index("sequences:") :]
    chips = re.findall(r"background:([^;]+);color:#fff[^>]*>([^<]*)</span>", legend)
    assert [name for _, name in chips] == [str(100 + i) for i in range(30)]
    assert len({color for color, _ in chips}) == 30, "every sequence has its own colour"
    assert HF_ID not in html, "ids like ('pagedkv.hf', 17) show as 17"
    assert len({seq_color(i) for i in range(500)}) == 500


def test_batch_labels_name_rows_and_beams():
    ids = [(HF_ID, n) for n in range(6)]
    assert list(batch_labels(ids).values()) == [f"row {i}" for i in range(6)]
    assert list(batch_labels(ids, num_beams=3).values()) == [
        "r0 b0", "r0 b1", "r0 b2", "r1 b0", "r1 b1", "r1 b2",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="num_beams is 0; expected an integer >= 1"):
        batch_labels(ids, num_beams=0)
    mgr = _manager(64)
    _add(mgr, ids[0], [1, 2, 3, 4, 5])
    html = block_map_html(mgr, labels={ids[0]: "row 0"})
    assert ">row 0</span>" in html and "; row 0" in html  # legend and tooltips


def test_blocks_found_in_the_prefix_cache_are_marked():
    mgr = _manager(64)
    _add(mgr, "turn 1", list(range(12)))  # 3 full blocks, registered
    mgr.free("turn 1")
    since = cached_blocks(mgr)
    assert len(since) == 3
    _add(mgr, "turn 2", list(range(12)) + [50, 51, 52, 53, 54])  # its first 3 blocks hit
    html = block_map_html(mgr, since=since)
    marked = re.findall(r'title="block (\d+):[^"]*found in the prefix cache by this call', html)
    assert sorted((0, int(b)) for b in marked) == sorted(since)  # (group, block id)
    assert mgr.stats.prefix_hits == 12
    assert "hatched: found in the prefix cache" in html
    assert "found in the prefix cache by this call" not in block_map_html(mgr)  # no `since`


def test_a_large_pool_is_drawn_whole_or_says_what_it_left_out():
    mgr = _manager(4096)
    _add(mgr, "a", list(range(40)))  # blocks 0-9
    html = block_map_html(mgr)
    assert re.search(r">4086 free</div>", html), "the free tail is one labelled gap"
    assert "not drawn" not in html
    assert html.count('title="block ') == 10
    html = block_map_html(mgr, max_blocks=4)
    assert "blocks 4-4095 not drawn (4092 blocks: 6 used, 4086 free)" in html
    with pytest.raises(ValueError, match="max_blocks is 0; expected an integer >= 1"):
        block_map_html(mgr, max_blocks=0)


def test_header_wraps_instead_of_running_off_the_side():
    mgr = _manager(32)
    html = block_map_html(mgr)
    assert "<pre>" not in html and "overflow-wrap:anywhere" in html
    assert "max-width:820px" in html


def test_stats_print_ratios_rounded():
    mgr = _manager(32)
    _add(mgr, "a", list(range(12)))
    mgr.free("a")
    _add(mgr, "b", list(range(9)) + [90, 91, 92, 93, 94, 95])  # 8 of 15 prompt tokens hit
    stats = mgr.stats
    assert stats.as_dict()["prefix_hit_rate"] == round(8 / 27, 4)  # queries: 12 + 15
    assert "prefix cache: 8 of 27 prompt tokens found (29.6%)" in str(stats)
    assert str(8 / 27) not in str(stats.as_dict())

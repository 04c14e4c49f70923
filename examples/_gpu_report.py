"""The markdown report of `benchmark_kernels.py`: one heading with the card's name, then a
table per section, ready to paste into docs/benchmarks.md. Built from the JSON results only,
so a report can be rebuilt from a saved JSON file."""

from __future__ import annotations

MiB = 2**20


def _f(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _verdict(ok: bool | None, smoke: bool) -> str:
    if ok is None:
        return ""
    return "not judged" if smoke else "met" if ok else "MISSED"


def markdown(results: dict) -> str:
    """The whole report."""
    smoke = results["smoke"]
    v = results["versions"]
    lines = [f"### {results['device']}: GPU check, {results['date']}", ""]
    if smoke:
        lines += ["**SMOKE RUN**: tiny shapes and models, numbers meaningless, goals not judged.",
                  ""]  # fmt: skip
    lines.append(
        f"torch {v['torch']}, triton {v['triton']}, transformers {v['transformers']}, "
        f"CUDA {v.get('cuda') or '-'}, pagedkv {v.get('pagedkv') or '-'}; kernels backend: "
        f"{results['backend']}; `{results['command']}`; {results['total_s']:.0f} s in all."
    )
    lines += ["", *section_table(results), ""]
    sections = results["sections"]
    for name, render in (("checks", checks_md), ("kernels", kernels_md),
                         ("generate", generate_md), ("batching", batching_md)):  # fmt: skip
        record = sections.get(name)
        if record and record.get("result"):
            lines += [*render(record["result"], smoke), ""]
    return "\n".join(lines).rstrip() + "\n"


def problems(record: dict) -> list[str]:
    """A section's failed checks and errors, one line each."""
    found = list(record.get("result", {}).get("failures", []))
    if record["status"] == "error":
        found.append(f"section error: {record['error']}")
    return found


def section_table(results: dict) -> list[str]:
    lines = ["| section | status | seconds (budget) | notes |", "|---|---|---|---|"]
    for name, record in results["sections"].items():
        result = record.get("result", {})
        notes = problems(record) + [f"skipped {s}" for s in result.get("skipped", [])]
        notes += [f"{server} did not run: {why}"
                  for server, why in result.get("server_errors", {}).items() if server != "paged"]  # fmt: skip
        if name == "checks" and "passed" in result:
            notes.insert(0, f"{result['passed']} checks passed")
        status = record["status"]
        if status == "ok" and result.get("failures"):
            status = "FAILED"
        seconds = f"{record.get('seconds', 0):.0f} ({record.get('budget_s', 0):.0f})"
        text = "; ".join(notes).replace("|", "/") or "-"
        lines.append(f"| {name} | {status} | {seconds} | {text} |")
    return lines


def checks_md(r: dict, smoke: bool) -> list[str]:
    """Max relative error per case and dtype."""
    dtypes = ["bfloat16", "float16", "float32"]
    table: dict[str, dict[str, str]] = {}
    for row in r.get("attention", []):
        mark = "" if row["ok"] else " FAIL"
        table.setdefault(row["name"], {})[row["dtype"]] = f"{row['error']:.1e}{mark}"
    lines = [
        "**Correctness**: paged_attention against the torch reference in float64, max |error| "
        "/ max |expected| (tolerances: bf16 2e-2, fp16 5e-3, fp32 1e-4); write_kv, gather_kv, "
        f"copy_blocks exact. {r.get('passed', 0)} passed, {len(r.get('failures', []))} failed, "
        f"{len(r.get('skipped', []))} skipped.",
        "",
        "| case | " + " | ".join(dtypes) + " |",
        "|---|" + "---|" * len(dtypes),
    ]
    for name, cells in table.items():
        lines.append(f"| {name} | " + " | ".join(cells.get(d, "-") for d in dtypes) + " |")
    return lines


def _goal_text(row: dict, smoke: bool) -> str:
    parts = []
    meets = row.get("meets", {})
    if "of_copy" in meets:
        parts.append(f">= {row['goal_fraction']:.0%} of copy: {_verdict(meets['of_copy'], smoke)}")
    if "vs_sdpa" in meets:
        parts.append(f"<= SDPA: {_verdict(meets['vs_sdpa'], smoke)}")
    return "; ".join(parts)


def kernels_md(r: dict, smoke: bool) -> list[str]:
    lines = [
        "**Kernels**: bf16, 32 query / 8 KV heads, head_dim 128, block 16; default launch "
        "configs; `do_bench` median and p20-p80; fraction of a device-to-device copy "
        f"({_f(r.get('copy_gbps'), '.0f')} GB/s); SDPA on a contiguous cache of the same content.",
        "",
        "| op | shape | layout | ms | p20-p80 | GB/s | of copy | TFLOP/s | SDPA ms | goal |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r.get("rows", []):
        lines.append(
            f"| {row['op']} | {row['shape']} | {row['layout']} | {row['ms']:.3f} | "
            f"{row['ms_p20']:.3f}-{row['ms_p80']:.3f} | {row['gbps']:.0f} | "
            f"{_f(row.get('fraction_of_copy'), '.0%')} | {_f(row.get('tflops'), '.0f')} | "
            f"{_f(row.get('sdpa_ms'), '.3f')} | {_goal_text(row, smoke)} |"
        )
    return lines


def generate_md(r: dict, smoke: bool) -> list[str]:
    lines = [
        f"**generate**, stock vs paged: {r.get('model', '?')}, block size "
        f"{r.get('block_size')}. Medians of the rounds; KV: stock = its cache tensors, paged = "
        "the manager's peak bytes in use; alloc peak: CUDA bytes allocated at the call's peak "
        "beyond those held before it (paged's pool excluded).",
        "",
        "| case | setup | rounds | stock tok/s | paged tok/s | paged/stock time | KV stock MiB "
        "| KV paged MiB | KV paged/stock | alloc peak MiB stock / paged | rows differ |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in r.get("cases", {}).items():
        alloc = (f"{_f(_mib(c['stock_peak_alloc_bytes']), '.0f')} / "
                 f"{_f(_mib(c['paged_peak_alloc_bytes']), '.0f')}")  # fmt: skip
        tokens = c["tokens"]
        lines.append(
            f"| {name} | {c['setup']} | {c['rounds']} | {c['stock_tokens_per_s']:.1f} | "
            f"{c['paged_tokens_per_s']:.1f} | {c['time_ratio']:.2f}x | "
            f"{c['stock_kv_bytes'] / MiB:.1f} | {c['paged_kv_bytes'] / MiB:.1f} | "
            f"{_f(c['memory_ratio'], '.2f')}x | {alloc} | "
            f"{tokens['rows_differ']} of {tokens['rows']} |"
        )
    for name, c in r.get("cases", {}).items():
        for d in c["tokens"].get("first_differences", []):
            lines.append(
                f"- {name}, row {d['row']}: first differs at new token {d['position']}; stock's "
                f"top-2 logit gap there {d['stock_top2_gap']}, paged's token "
                f"{d['paged_token_gap']} below stock's top"
            )
    return lines


def _mib(nbytes: int | None) -> float | None:
    return None if nbytes is None else nbytes / MiB


BATCHING_SERVERS = (
    ("paged", "pagedkv generate_batch", None),
    ("transformers", "transformers continuous batching", "vs_transformers"),
    ("static", "static generate, batches of 8", "vs_static"),
)


def batching_md(r: dict, smoke: bool) -> list[str]:
    if "tokens_per_s" not in r:
        return [f"**Continuous batching**: no complete round ({r.get('setup', '?')})."]
    lines = [
        f"**Continuous batching**: {r['setup']}; {r['model']}; token budget "
        f"{r['token_budget']} per forward (both continuous batchers); medians of "
        f"{r['rounds']} round(s); transformers could use flash attention: "
        f"{r.get('transformers_flash')}.",
        "",
        "| server | tok/s | seconds per round | paged / this | goal |",
        "|---|---|---|---|---|",
    ]
    errors = r.get("server_errors", {})
    for name, label, key in BATCHING_SERVERS:
        if name in errors or name not in r["tokens_per_s"]:
            reason = errors.get(name, "did not run").replace("|", "/")
            lines.append(f"| {label} | error: {reason} | | | |")
            continue
        ratio = "-" if key is None else _f(r["ratios"][key], ".2f", "-") + "x"
        goal = "" if key is None else (
            f">= {r['goals'][key]:.1f}x: {_verdict(r['meets'][key], smoke)}")  # fmt: skip
        seconds = ", ".join(f"{t:.1f}" for t in r["samples_s"][name])
        lines.append(f"| {label} | {r['tokens_per_s'][name]:.1f} | {seconds} | {ratio} | {goal} |")
    counts = [
        f"{name} {len(found)} of {r['requests']}"
        for name in ("paged", "transformers")
        if (found := r.get(f"{name}_differ_from_static")) is not None
    ]
    lines += ["", "Requests whose tokens differ from static generate's: "
              + (", ".join(counts) or "not compared") + "."]  # fmt: skip
    return lines

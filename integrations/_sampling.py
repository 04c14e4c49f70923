"""The token sampler of continuous batching: the next token of B requests from logits `[B, V]`.

Each row follows transformers' generate for the parameters it supports, in its order:
repetition penalty, then (sampling rows only) temperature, top-k, top-p; greedy rows take the
argmax. Rows mix greedy and sampling, with their own parameters, in one vectorised call.

Why counter-based noise: `torch.multinomial` draws from one generator shared by the batch, so a
row's token would depend on which requests happen to share its step and in what order, and a
request could not be replayed alone. Here the noise of vocabulary entry `i` for the row about to
sample its `counter`-th token is a hash of `(seed, counter, i)`, and the token is the Gumbel-max
`argmax(filtered_logits - log(-log(u)))`, distributed as `softmax(filtered_logits)`. A row's token
thus depends only on its own logits, parameters, seed and counter: the same whatever the batch
composition, and the same on every replay.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from numbers import Integral, Real

import torch

# What generate uses for a parameter left None (`GenerationConfig._get_default_generation_params`).
_GENERATE_DEFAULTS = dict(
    do_sample=False, temperature=1.0, top_k=50, top_p=1.0, repetition_penalty=1.0
)
_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens; validated on construction."""

    do_sample: bool = False
    temperature: float = 1.0  # ignored when do_sample is False
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off
    seed: int = 0  # the request's noise stream

    def __post_init__(self):
        _validate({f.name: getattr(self, f.name) for f in fields(self)}, request=None)

    @classmethod
    def from_generation_config(cls, config, seed: int | None, *, request=None) -> SamplingParams:
        """The parameters generate would use for `config` (a `transformers.GenerationConfig`):
        None means generate's default (top_k 50, applied when sampling); temperature, top_k and
        top_p are ignored when not sampling. `seed` None draws one from torch's global RNG.
        A bad value raises ValueError naming `request` (an id or index) when given."""
        values = {}
        for name, default in _GENERATE_DEFAULTS.items():
            value = getattr(config, name, None)
            values[name] = default if value is None else value
        if not values["do_sample"]:
            values.update(temperature=1.0, top_k=0, top_p=1.0)
        if seed is None:
            seed = int(torch.randint(0, 2**63 - 1, ()).item())
        values["seed"] = seed
        _validate(values, request)
        for name in ("temperature", "top_p", "repetition_penalty"):
            values[name] = float(values[name])
        return cls(**values)


def _validate(values: dict, request) -> None:
    """Raise ValueError for the first value outside its range, naming the request if given."""

    def bad(name: str, expected: str) -> ValueError:
        where = "" if request is None else f"request {request!r}: "
        return ValueError(f"{where}{name}={values[name]!r} is invalid; expected {expected}")

    def is_int(v) -> bool:
        return isinstance(v, Integral) and not isinstance(v, bool)

    def is_real(v) -> bool:
        return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v)

    if not isinstance(values["do_sample"], bool):
        raise bad("do_sample", "a bool")
    t = values["temperature"]
    if values["do_sample"] and not (is_real(t) and t > 0):
        raise bad("temperature", "a finite float > 0 when sampling (for greedy, do_sample=False)")
    if not (is_int(values["top_k"]) and values["top_k"] >= 0):
        raise bad("top_k", "an int >= 0 (0: off)")
    if not (is_real(values["top_p"]) and 0 < values["top_p"] <= 1):
        raise bad("top_p", "a float in (0, 1] (1.0: off)")
    if not (is_real(values["repetition_penalty"]) and values["repetition_penalty"] > 0):
        raise bad("repetition_penalty", "a finite float > 0 (1.0: off)")
    if not (is_int(values["seed"]) and 0 <= values["seed"] < 2**63):
        raise bad("seed", "an int in [0, 2**63)")


@dataclass(frozen=True)
class SamplingBatch:
    """The per-row parameters of one step, as tensors on a device, built once by `of`. Greedy
    rows hold neutral temperature, top-k and top-p, so only the penalty touches their logits."""

    do_sample: torch.Tensor  # bool [B]
    temperature: torch.Tensor  # float32 [B]; 1.0 for greedy rows
    top_k: torch.Tensor  # int64 [B]; 0: off
    top_p_cut: torch.Tensor  # float32 [B]; 1 - top_p, the cumulative mass top-p removes
    use_top_p: torch.Tensor  # bool [B]; top_p < 1 on a sampling row
    penalty: torch.Tensor  # float32 [B]; 1.0: off
    seed: torch.Tensor  # int64 [B]
    # Host-side summaries, so `sample` skips unused stages without reading the device.
    any_sample: bool
    max_top_k: int  # the largest top_k of a sampling row, 0 if none uses top-k
    any_top_p: bool
    any_penalty: bool

    @classmethod
    def of(cls, params: Sequence[SamplingParams], device) -> SamplingBatch:
        def col(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        s = [p.do_sample for p in params]
        top_k = [p.top_k if p.do_sample else 0 for p in params]
        top_p = [p.top_p if p.do_sample else 1.0 for p in params]
        return cls(
            do_sample=col(s, torch.bool),
            temperature=col([p.temperature if p.do_sample else 1.0 for p in params], torch.float32),
            top_k=col(top_k, torch.int64),
            top_p_cut=col([1.0 - p for p in top_p], torch.float32),
            use_top_p=col([p < 1.0 for p in top_p], torch.bool),
            penalty=col([float(p.repetition_penalty) for p in params], torch.float32),
            seed=col([p.seed for p in params], torch.int64),
            any_sample=any(s),
            max_top_k=max(top_k, default=0),
            any_top_p=any(p < 1.0 for p in top_p),
            any_penalty=any(p.repetition_penalty != 1.0 for p in params),
        )

    def __len__(self) -> int:
        return self.seed.shape[0]


def filtered_logits(
    logits: torch.Tensor, batch: SamplingBatch, history: torch.Tensor | None
) -> torch.Tensor:
    """float32 `[B, V]`: the logits after the repetition penalty and, on sampling rows,
    temperature, top-k and top-p; removed tokens are -inf (transformers' definitions)."""
    _check_shapes(logits, batch, history)
    x = logits.to(torch.float32)
    rows, vocab = x.shape
    if batch.any_penalty:
        # RepetitionPenaltyLogitsProcessor: each id in history once; -1 padding and ids >= V go to
        # an extra column that is dropped.
        ids = torch.where(history < 0, vocab, history.clamp(max=vocab))
        seen = torch.zeros(rows, vocab + 1, dtype=torch.bool, device=x.device)
        seen = seen.scatter(1, ids, True)[:, :vocab]
        pen = batch.penalty[:, None]
        x = torch.where(seen, torch.where(x < 0, x * pen, x / pen), x)
    if not batch.any_sample:
        return x
    x = x / batch.temperature[:, None]
    if batch.max_top_k > 0:
        # TopKLogitsWarper: keep logits >= the k-th largest (ties kept); k > V keeps all.
        k_max = min(batch.max_top_k, vocab)
        top = torch.topk(x, k_max, dim=-1).values
        kth = top.gather(1, (batch.top_k.clamp(1, k_max) - 1)[:, None])
        x = x.masked_fill((x < kth) & (batch.top_k > 0)[:, None], -math.inf)
    if batch.any_top_p:
        # TopPLogitsWarper: remove the ascending prefix of mass <= 1 - top_p, keep the largest.
        # transformers' own sort call: ties at the boundary fall the same way. Each row is
        # sorted on its own (std::sort per row on CPU, a sort per slice on CUDA), so its tie
        # order depends on the row alone.
        sorted_x, order = torch.sort(x, dim=-1)
        remove = sorted_x.softmax(dim=-1).cumsum(dim=-1) <= batch.top_p_cut[:, None]
        remove[:, -1] = False
        remove = remove.scatter(1, order, remove) & batch.use_top_p[:, None]
        x = x.masked_fill(remove, -math.inf)
    return x


def sample(
    logits: torch.Tensor,
    batch: SamplingBatch,
    *,
    history: torch.Tensor | None,
    counters: torch.Tensor,
) -> torch.Tensor:
    """The next token of each row, int64 `[B]`.

    logits `[B, V]`, any float dtype (computed in float32); history int64 `[B, L]`, each row's
    prompt and generated ids padded with -1, read only by the repetition penalty (None when no
    row has one); counters int64 `[B]`, the index of the token each row samples now."""
    if counters.shape != (len(batch),) or counters.dtype != torch.int64:
        raise ValueError(
            f"counters must be int64 of shape ({len(batch)},), got {counters.dtype} "
            f"{tuple(counters.shape)}"
        )
    x = filtered_logits(logits, batch, history)
    greedy = x.argmax(dim=-1)
    if not batch.any_sample:
        return greedy
    u = _uniform(batch.seed, counters, x.shape[1])
    drawn = (x - torch.log(-torch.log(u)).to(torch.float32)).argmax(dim=-1)
    return torch.where(batch.do_sample, drawn, greedy)


def _check_shapes(logits: torch.Tensor, batch: SamplingBatch, history) -> None:
    if logits.dim() != 2 or logits.shape[0] != len(batch) or not logits.is_floating_point():
        raise ValueError(
            f"logits must be a float [B={len(batch)}, V] tensor, got {logits.dtype} "
            f"{tuple(logits.shape)}"
        )
    if batch.any_penalty and (
        history is None
        or history.dtype != torch.int64
        or history.dim() != 2
        or len(history) != len(batch)
    ):
        got = None if history is None else f"{history.dtype} {tuple(history.shape)}"
        raise ValueError(
            f"a row has a repetition penalty, so history must be an int64 [B={len(batch)}, L] "
            f"tensor of previous ids padded with -1; got {got}"
        )


def _uniform(seed: torch.Tensor, counter: torch.Tensor, vocab: int) -> torch.Tensor:
    """float64 `[B, V]` in (0, 1), strictly: a hash of (seed[b], counter[b], v) for each entry.

    Integer ops on int64 holding 32-bit words, every product below 2**63 (no signed overflow).
    Three 32-bit row keys hash (seed, counter); then two independent words per entry, `hi` and
    `lo`, give 52 bits."""
    words = [seed & _MASK32, (seed >> 32) & _MASK32, counter & _MASK32, (counter >> 32) & _MASK32]
    keys = []
    for lane in (0x9E3779B9, 0x85EBCA6B, 0xC2B2AE35):
        h = torch.full_like(seed, lane)
        for w in words:
            h = _mix32(h ^ w)
        keys.append(h[:, None])
    v = torch.arange(vocab, dtype=torch.int64, device=seed.device)[None, :]
    hi = _mix32(_mix32(v ^ keys[0]) ^ keys[1])
    lo = _mix32(v ^ keys[2])
    return _unit_float(hi, lo)


def _unit_float(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """float64 in (0, 1), strictly, from two 32-bit words: (m + 1/2) / 2**52 for the 52-bit m,
    exact in float64, so the extremes are 2**-53 and 1 - 2**-53."""
    m = (hi << 20) | (lo >> 12)
    return (2 * m + 1).to(torch.float64) * 2.0**-53


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (Wellons' hash-prospector): a bijection of 32-bit words with strong avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for 32-bit x and c, in 16-bit halves of c: products stay below 2**48."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32

"""Continuous batching of a transformers model on the paged cache: `BatchingEngine`, and
`generate_batch` on top of it.

Every engine step asks `kvcache.scheduler.Scheduler` for the next forward (decodes first,
prompt chunks within a token budget, new requests admitted as blocks allow, the newest
preempted when they run out), runs it as one ragged forward (`_hf_ragged`), samples the next
token of every row that finished its prompt from the batch of last-token logits (`_sampling`),
and hands the tokens back. A request that finishes leaves the batch at once and its blocks
serve the next ones.

    engine = BatchingEngine(model, max_new_tokens=64)
    a = engine.add_request(prompt_ids)
    b = engine.add_request(other_ids, do_sample=True, temperature=0.7, seed=1)
    for request_id, new_ids, finished in engine:    # add or cancel requests inside the loop
        ...
    engine.result(a), engine.timings(a), engine.stats
    engine.close()

The engine runs in the caller's thread; each step holds the model's lock, so a `generate` of
the same model in another thread takes turns with it.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, PreTrainedModel

from pagedkv.kvcache import KVCacheConfig, KVCacheManager, KVCacheStats
from pagedkv.kvcache.scheduler import Request, Scheduler

from ._hf_enable import disable_paged_attention, enable_on, get_manager, state_of
from ._hf_ragged import ragged_forward
from ._sampling import SamplingBatch, SamplingParams, sample

__all__ = ["BatchingEngine", "RequestTimings", "generate_batch"]

# Generation settings a request may set (besides max_new_tokens); others are refused.
_SUPPORTED = (
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "eos_token_id",
    "pad_token_id",
    "seed",
)


@dataclass(frozen=True)
class RequestTimings:
    """Wall-clock timings of one request (seconds; None until it happened)."""

    num_tokens: int
    time_to_first_token: float | None  # from add_request to its first token
    total_time: float | None  # from add_request to its last token (None while it runs)
    tokens_per_second: float | None  # tokens after the first / time after the first


@dataclass
class _Tracked:
    request: Request
    params: SamplingParams
    added: float
    first: float | None = None
    last: float | None = None


class BatchingEngine:
    """Continuous batching over `model` (see the module docstring).

    The model runs on the manager `enable_paged_attention` gave it, or on `manager` when it
    is not enabled (then enabled on it until `close`), or else on a manager made here:
    `KVCacheConfig.from_model_config` with `config_overrides` (`num_blocks`, `block_size`,
    `num_cpu_blocks`, ...); `close` then gives the model its stock attention back.
    `generation_kwargs` are every request's defaults over the model's generation config:
    greedy or sampling (`do_sample`, `temperature`, `top_k`, `top_p`, a `seed`: request i
    gets seed + i), `repetition_penalty`, `eos_token_id` (one or several), `max_new_tokens`.
    Beam search is refused (use `model.generate`). `max_num_seqs`, `max_num_batched_tokens`,
    `preemption`: see `Scheduler`. Call it from one thread (each step holds the model's lock).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        manager: KVCacheManager | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 512,
        preemption: str | None = None,
        config_overrides: dict | None = None,
        **generation_kwargs,
    ) -> None:
        if not isinstance(model, PreTrainedModel):
            raise TypeError(
                f"BatchingEngine needs a transformers model; got {type(model).__name__}"
            )
        self.model = model
        self._defaults = _merge(model, generation_kwargs, "the engine's defaults")
        self._seed = generation_kwargs.get("seed")
        enabled = get_manager(model)
        self._enabled_here = enabled is None
        if enabled is not None:
            if manager is not None and manager is not enabled:
                raise ValueError(
                    "manager= is not the manager enable_paged_attention gave this model; pass "
                    "none (the model's is used) or disable_paged_attention(model) first"
                )
            manager = enabled
        else:
            manager = enable_on(model, None, config_overrides or {}, manager)
        self.manager = manager
        state = state_of(model)
        if state.gather:
            if self._enabled_here:
                disable_paged_attention(model)
            raise ValueError(
                f"{type(model).__name__} ({model.config.model_type}) runs its own attention "
                "code on gathered K/V, which cannot read a packed forward of many sequences; "
                "use model.generate with paged attention for this model"
            )
        self._state = state
        try:
            self.scheduler = Scheduler(
                manager,
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens,
                preemption=preemption,
                extra_key=None,
            )
        except BaseException:
            self.close()
            raise
        self._tracked: dict[Hashable, _Tracked] = {}
        self._ids = itertools.count()
        self._num_added = 0
        self._closed = False
        self.num_steps = 0

    # ---- requests -------------------------------------------------------------------------
    def add_request(
        self,
        prompt: Sequence[int] | torch.Tensor,
        *,
        max_new_tokens: int | None = None,
        request_id: Hashable | None = None,
        **generation_kwargs,
    ) -> Hashable:
        """Queue a request (token ids, a list or a 1-D tensor) with its own settings over the
        engine's; returns its id (`request_id`, or the next integer). Bad input raises
        `ValueError` naming the request, and the engine is unchanged."""
        self._check_open()
        if request_id is None:
            request_id = next(self._ids)
            while request_id in self._tracked:
                request_id = next(self._ids)
        try:
            hash(request_id)
        except TypeError:
            raise ValueError(f"request id {request_id!r} is not hashable") from None
        name = f"request {request_id!r}"
        if isinstance(prompt, torch.Tensor):
            if prompt.ndim != 1:
                raise ValueError(
                    f"{name}: a prompt tensor must be 1-D; got shape {list(prompt.shape)}"
                )
            prompt = prompt.tolist()
        self._check_ids(prompt, name)
        config = _merge(self.model, generation_kwargs, name, base=self._defaults)
        if max_new_tokens is None:
            max_new_tokens = config.max_new_tokens
        if max_new_tokens is None:
            raise ValueError(f"{name}: give max_new_tokens (none is set for the engine either)")
        seed = generation_kwargs.get("seed")
        if seed is None and self._seed is not None:
            seed = self._seed + self._num_added  # the engine's seed, one stream per request
        params = SamplingParams.from_generation_config(config, seed, request=request_id)
        eos = config.eos_token_id
        eos = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
        if request_id in self._tracked and not self._tracked[request_id].request.done:
            raise ValueError(f"{name} is already queued or running")
        request = self.scheduler.add(request_id, prompt, max_new_tokens, eos)
        self._tracked[request_id] = _Tracked(request, params, time.perf_counter())
        self._num_added += 1
        return request_id

    def _check_ids(self, prompt, name: str) -> None:
        """Token ids the model's embedding has (checked here: a bad id would fail mid-step)."""
        vocab = getattr(self.model.config.get_text_config(), "vocab_size", None)
        if vocab is None or not isinstance(prompt, Sequence) or isinstance(prompt, str):
            return  # the scheduler names what is wrong with a prompt that is not a list
        bad = next(
            (
                t
                for t in prompt
                if isinstance(t, int) and not isinstance(t, bool) and not 0 <= t < vocab
            ),
            None,
        )
        if bad is not None:
            raise ValueError(
                f"{name}: token id {bad} is outside the model's vocabulary [0, {vocab})"
            )

    def cancel(self, request_id: Hashable) -> None:
        """Stop a request; its blocks are freed at once."""
        self.scheduler.cancel(request_id)

    def result(self, request_id: Hashable) -> list[int]:
        """The ids a request generated so far (all of them once it finished)."""
        return list(self._get(request_id).request.output)

    def status(self, request_id: Hashable) -> str:
        """'waiting', 'running', 'swapped', 'finished' or 'cancelled'."""
        return self._get(request_id).request.status.value

    def timings(self, request_id: Hashable) -> RequestTimings:
        tracked = self._get(request_id)
        n = len(tracked.request.output)
        first = None if tracked.first is None else tracked.first - tracked.added
        total = (
            None
            if not tracked.request.done or tracked.last is None
            else tracked.last - tracked.added
        )
        rate = None
        if tracked.first is not None and tracked.last is not None and tracked.last > tracked.first:
            rate = (n - 1) / (tracked.last - tracked.first)
        return RequestTimings(n, first, total, rate)

    def forget(self, request_id: Hashable) -> list[int]:
        """Drop a finished or cancelled request's record; returns its ids."""
        tracked = self._get(request_id)
        if not tracked.request.done:
            raise ValueError(f"request {request_id!r} is still {tracked.request.status.value}")
        del self._tracked[request_id]
        return list(tracked.request.output)

    def _get(self, request_id: Hashable) -> _Tracked:
        try:
            return self._tracked[request_id]
        except (KeyError, TypeError):
            raise ValueError(f"unknown request id {request_id!r}") from None

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    @property
    def stats(self) -> KVCacheStats:
        return self.manager.stats

    # ---- running --------------------------------------------------------------------------
    def step(self) -> list[tuple[Hashable, list[int], bool]]:
        """Run one forward; returns `(request_id, new_token_ids, finished)` per request that
        got a token. An error (Ctrl-C included) leaves every request where it was."""
        self._check_open()
        with self._state.lock:
            self._state.check_call()
            scheduled = self.scheduler.schedule()
            if scheduled is None:
                return []
            try:
                logits = ragged_forward(
                    self.model, self._state.cache_kwarg, self.manager, scheduled
                )
                rows = [scheduled.requests[i] for i in scheduled.sample_rows]
                tokens = self._sample(logits, rows) if rows else []
            except BaseException:
                self.scheduler.abort_step(scheduled)
                raise
            events = self.scheduler.finish_step(scheduled, tokens)
        self.num_steps += 1
        now = time.perf_counter()
        out = []
        for request, new, finished in events:
            tracked = self._tracked[request.request_id]
            if tracked.first is None:
                tracked.first = now
            tracked.last = now
            out.append((request.request_id, new, finished))
        return out

    def _sample(self, logits: torch.Tensor, rows: list[Request]) -> list[int]:
        params = [self._tracked[r.request_id].params for r in rows]
        batch = SamplingBatch.of(params, logits.device)
        history = None
        if any(p.repetition_penalty != 1.0 for p in params):
            width = max(r.num_tokens for r in rows)
            history = torch.full((len(rows), width), -1, dtype=torch.long)
            for i, r in enumerate(rows):
                history[i, : r.num_tokens] = torch.tensor(r.tokens())
            history = history.to(logits.device)
        counters = torch.tensor(
            [len(r.output) for r in rows], dtype=torch.long, device=logits.device
        )
        return sample(logits, batch, history=history, counters=counters).tolist()

    def stream(self) -> Iterator[tuple[Hashable, list[int], bool]]:
        """Run until no request is left (requests added meanwhile included), yielding
        `(request_id, new_token_ids, finished)` as tokens come."""
        while self.scheduler.has_unfinished:
            yield from self.step()

    __iter__ = stream

    def close(self) -> None:
        """Cancel what is left; a model enabled here gets its stock attention back."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        scheduler = getattr(self, "scheduler", None)
        if scheduler is not None:
            scheduler.free_all()
        if self._enabled_here and get_manager(self.model) is self.manager:
            disable_paged_attention(self.model)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this BatchingEngine is closed")

    def __enter__(self) -> BatchingEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"BatchingEngine({type(self.model).__name__}, {self.scheduler!r}, steps={self.num_steps})"


def generate_batch(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int] | torch.Tensor],
    *,
    max_new_tokens: int | Sequence[int],
    manager: KVCacheManager | None = None,
    progress: bool = False,
    max_num_seqs: int = 64,
    max_num_batched_tokens: int = 512,
    **generation_kwargs,
) -> list[list[int]]:
    """Generate for every prompt with continuous batching; returns each prompt's generated ids
    in input order (prompt excluded, a stop token included when hit).

    `max_new_tokens`: one limit, or one per prompt. Works with or without
    `enable_paged_attention`: without it, the model runs on `manager` or on a temporary one
    sized for these requests, and is left as it was. `progress=True` shows a bar of tokens.
    Generation settings: see `BatchingEngine`.
    """
    if isinstance(prompts, torch.Tensor) or not isinstance(prompts, Sequence):
        raise ValueError(
            f"prompts must be a list of token-id lists or 1-D tensors; got {type(prompts).__name__}"
        )
    limits = _limits(max_new_tokens, len(prompts))
    overrides = {}
    if get_manager(model) is None and manager is None:
        overrides = _pool_for(model, prompts, limits)
    with BatchingEngine(
        model,
        manager=manager,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        config_overrides=overrides,
        **generation_kwargs,
    ) as engine:
        ids = [
            engine.add_request(p, max_new_tokens=n, request_id=i)
            for i, (p, n) in enumerate(zip(prompts, limits, strict=True))
        ]
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(limits), unit="tok", desc="generate_batch")
        try:
            for request_id, new, finished in engine:
                if bar is not None:
                    bar.update(len(new))
                    if finished:  # a stop token ends it early: its unused limit leaves the total
                        left = limits[request_id] - len(engine.result(request_id))
                        bar.total -= left
                        bar.refresh()
        finally:
            if bar is not None:
                bar.close()
        return [engine.result(i) for i in ids]


def _limits(max_new_tokens, count: int) -> list[int]:
    if isinstance(max_new_tokens, int) and not isinstance(max_new_tokens, bool):
        return [max_new_tokens] * count
    if isinstance(max_new_tokens, Sequence) and not isinstance(max_new_tokens, str):
        if len(max_new_tokens) != count:
            raise ValueError(
                f"max_new_tokens has {len(max_new_tokens)} entries; expected one per prompt ({count})"
            )
        return list(max_new_tokens)
    raise ValueError(f"max_new_tokens must be an int or a list of ints; got {max_new_tokens!r}")


def _pool_for(model: PreTrainedModel, prompts, limits: list[int]) -> dict:
    """Blocks for every request at once, capped by the default pool of the device."""
    default = KVCacheConfig.from_model_config(model.config, dtype=model.dtype, device=model.device)
    bs = default.block_size
    lengths = [len(p) for p in prompts]
    need = sum(-(-(n + m) // bs) for n, m in zip(lengths, limits, strict=False)) + 1
    counts = tuple(min(need, default.group_blocks(g)) for g in range(len(default.groups)))
    return {"num_blocks": counts[0] if len(set(counts)) == 1 else counts}


def _merge(model: PreTrainedModel, kwargs: dict, name: str, base: GenerationConfig | None = None):
    """The generation config of `kwargs` over `base` (the model's by default), checked."""
    unknown = sorted(k for k in kwargs if k not in (*_SUPPORTED, "max_new_tokens"))
    if "num_beams" in unknown and kwargs["num_beams"] not in (None, 1):
        raise ValueError(
            f"{name}: num_beams={kwargs['num_beams']!r}: beam search does not batch "
            "continuously; use model.generate(..., num_beams=...) for it"
        )
    if unknown:
        raise ValueError(
            f"{name}: generation settings {unknown} are not supported by continuous batching; "
            f"supported: {', '.join((*_SUPPORTED, 'max_new_tokens'))}"
        )
    config = copy.deepcopy(base if base is not None else model.generation_config)
    settings = {k: v for k, v in kwargs.items() if k != "seed"}
    config.update(**settings)
    if (config.num_beams or 1) > 1:
        raise ValueError(
            f"{name}: the generation config asks for num_beams={config.num_beams}; beam search "
            "does not batch continuously; use model.generate for it"
        )
    return config

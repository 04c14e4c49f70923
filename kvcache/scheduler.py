"""`Scheduler`: which requests run in the next forward, and how many of their tokens.

Continuous batching policy, model-agnostic: a request is a prompt, a token limit and its
stop tokens; the scheduler turns the live requests into one manager `Step` per forward and
takes the sampled tokens back. Each step:

1. resumes swapped-out requests (oldest first) while the pool has room for them;
2. gives every running request that decodes its one token (decode first);
3. gives running requests still in their prompt a chunk of it (chunked prefill), within a
   token budget per step (`max_num_batched_tokens`);
4. admits waiting requests (oldest first) while the budget, `max_num_seqs` and the free
   blocks allow; a request starts from the longest cached prefix of its tokens, so cached
   tokens are never computed again;
5. plans the step all or nothing. When the pool runs out, the newest running request is
   preempted, and the step planned again without it: swapped out to the CPU swap space
   (`num_cpu_blocks`) when there is room, else freed and recomputed later from its prompt and
   the tokens it produced (its full blocks stay in the prefix cache, so usually little is
   recomputed). Either way it resumes exactly where it was.

The caller runs the forward of `ScheduledStep.step` on the packed tokens, samples the next
token of each row in `sample_rows`, and hands them to `finish_step` (or calls `abort_step` if
the forward failed: every request keeps what it had computed; the admissions and preemptions
made while planning stand, so the next step may be planned differently).

    sched = Scheduler(manager, max_num_batched_tokens=256)
    sched.add("a", prompt_ids, max_new_tokens=32, eos_token_ids={2})
    while sched.has_unfinished:
        scheduled = sched.schedule()
        ...  # the forward over scheduled.token_ids at scheduled.positions, through scheduled.step
        for request, new_ids, finished in sched.finish_step(scheduled, next_tokens):
            ...
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from operator import attrgetter

from . import _checks
from .allocator import OutOfBlocksError
from .manager import KVCacheManager
from .step import Step

__all__ = ["Request", "RequestStatus", "ScheduledStep", "Scheduler"]


class RequestStatus(str, Enum):
    WAITING = "waiting"  # not in the cache (new, or preempted to be recomputed)
    RUNNING = "running"  # its tokens are in device blocks
    SWAPPED = "swapped"  # preempted to the CPU swap space
    FINISHED = "finished"  # hit a stop token or its token limit
    CANCELLED = "cancelled"


@dataclass(eq=False)
class Request:
    """One generation request and how far it got."""

    request_id: Hashable
    prompt: tuple[int, ...]
    max_new_tokens: int
    eos_token_ids: frozenset[int] = frozenset()
    output: list[int] = field(default_factory=list)  # generated ids, stop token included
    status: RequestStatus = RequestStatus.WAITING
    num_computed: int = 0  # tokens whose K/V the cache holds
    finish_reason: str | None = None  # "stop", "length" or "cancelled"
    num_preemptions: int = 0
    arrival: int = 0  # admission order: older requests go first and are preempted last

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    def tokens(self, start: int = 0, stop: int | None = None) -> list[int]:
        """Its token ids (prompt, then output) from `start` to `stop`."""
        stop = self.num_tokens if stop is None else stop
        n = len(self.prompt)
        head = list(self.prompt[start:stop]) if start < n else []
        return head + self.output[max(0, start - n) : max(0, stop - n)]

    @property
    def done(self) -> bool:
        return self.status in (RequestStatus.FINISHED, RequestStatus.CANCELLED)


@dataclass(frozen=True)
class ScheduledStep:
    """One forward: its rows, their tokens, and the open manager step that stores them.

    Row i computes `num_tokens[i]` tokens of `requests[i]`, `token_ids[i]`, at positions
    `positions[i]` onwards; rows are packed in order (the step's `query_start_loc`).
    `sample_rows` are the rows whose last token's logits give their request's next token
    (a row in the middle of its prompt gives none); `logits_indices` are those tokens' indices
    in the packed forward.
    """

    step: Step
    requests: tuple[Request, ...]
    num_tokens: tuple[int, ...]
    token_ids: tuple[tuple[int, ...], ...]
    positions: tuple[int, ...]
    sample_rows: tuple[int, ...]
    logits_indices: tuple[int, ...]

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    @property
    def num_decodes(self) -> int:
        return sum(1 for r, n in zip(self.requests, self.num_tokens) if n == 1 and r.output)

    def flat_token_ids(self) -> list[int]:
        return [t for ids in self.token_ids for t in ids]

    def flat_positions(self) -> list[int]:
        return [p + j for p, n in zip(self.positions, self.num_tokens) for j in range(n)]


class Scheduler:
    """Continuous-batching scheduler over one `KVCacheManager` (see the module docstring).

    `max_num_seqs`: requests in the cache at once; `max_num_batched_tokens`: tokens per
    forward; `preemption`: "swap" (to the CPU swap space, falling back to recompute when it is
    full), "recompute", or None: swap when the manager has swap space, else recompute.
    `extra_key` namespaces this scheduler's prefixes in the prefix cache (e.g. a model id).
    """

    _ids = itertools.count()

    def __init__(
        self,
        manager: KVCacheManager,
        *,
        max_num_seqs: int = 128,
        max_num_batched_tokens: int = 512,
        preemption: str | None = None,
        extra_key: Hashable = None,
    ) -> None:
        if not isinstance(manager, KVCacheManager):
            raise ValueError(f"Scheduler needs a KVCacheManager; got {type(manager).__name__}")
        _checks.check_count("max_num_seqs", max_num_seqs, minimum=1)
        _checks.check_count("max_num_batched_tokens", max_num_batched_tokens, minimum=1)
        if preemption not in (None, "swap", "recompute"):
            raise ValueError(f"preemption must be 'swap', 'recompute' or None; got {preemption!r}")
        if preemption == "swap" and not manager.config.num_cpu_blocks:
            raise ValueError(
                "preemption='swap' needs CPU swap space; set num_cpu_blocks > 0 in KVCacheConfig"
            )
        self.manager = manager
        self.max_num_seqs = int(max_num_seqs)
        self.max_num_batched_tokens = int(max_num_batched_tokens)
        self.swap = manager.config.num_cpu_blocks > 0 and preemption != "recompute"
        self.extra_key = extra_key
        self._uid = next(self._ids)
        self._arrivals = itertools.count()
        self._requests: dict[Hashable, Request] = {}  # every live (unfinished) request
        self._waiting: list[Request] = []  # by arrival
        self._running: list[Request] = []  # by arrival
        self._swapped: list[Request] = []  # by arrival
        self._open: ScheduledStep | None = None
        self.num_preemptions = 0  # since creation
        self.num_swaps = 0

    # ---- requests -------------------------------------------------------------------------
    def add(
        self,
        request_id: Hashable,
        prompt: Sequence[int],
        max_new_tokens: int,
        eos_token_ids: Iterable[int] = (),
    ) -> Request:
        """Queue a request. Bad input raises `ValueError` naming the request; nothing changes."""
        _checks.check_hashable(request_id, "request id")
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} is already queued or running")
        try:
            ids = _checks.as_token_list(prompt)
        except ValueError as err:
            raise ValueError(f"request {request_id!r}: {err}") from None
        if not ids:
            raise ValueError(
                f"request {request_id!r}: the prompt is empty; give at least one token"
            )
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise ValueError(
                f"request {request_id!r}: max_new_tokens must be an int >= 1; got {max_new_tokens!r}"
            )
        if max_new_tokens < 1:
            raise ValueError(
                f"request {request_id!r}: max_new_tokens must be >= 1; got {max_new_tokens}"
            )
        eos = _stop_tokens(request_id, eos_token_ids)
        self._check_fits(request_id, len(ids), max_new_tokens)
        request = Request(request_id, tuple(ids), max_new_tokens, eos, arrival=next(self._arrivals))
        self._requests[request_id] = request
        self._waiting.append(request)
        return request

    def _check_fits(self, request_id: Hashable, prompt_len: int, max_new_tokens: int) -> None:
        """A request must fit the pool alone, or it could never finish."""
        total = prompt_len + max_new_tokens - 1  # the last token is sampled, never stored
        bs = self.manager.block_size
        for g, group in enumerate(self.manager.config.groups):
            need = math.ceil(total / bs)
            if group.window is not None:  # its window, and a step's new tokens beside it
                need = min(need, 2 * (math.ceil(group.window / bs) + 1))
            have = self.manager.config.group_blocks(g)
            if need > have:
                raise ValueError(
                    f"request {request_id!r}: a prompt of {prompt_len} tokens plus "
                    f"max_new_tokens={max_new_tokens} needs up to {need} blocks of "
                    f"{self.manager.block_size} tokens, and the pool holds {have}"
                    + (f" (KV cache group {g})" if len(self.manager.config.groups) > 1 else "")
                    + "; shorten the prompt or max_new_tokens, or give the manager more blocks"
                )

    def cancel(self, request_id: Hashable) -> Request:
        """Stop a request now: its blocks are freed at once. Not inside an open step."""
        request = self._live(request_id, "cancel")
        if self._open is not None and request in self._open.requests:
            raise ValueError(
                f"cannot cancel request {request_id!r} while a step that computes it is open; "
                "finish or abort that step first"
            )
        self._drop(request)
        request.status, request.finish_reason = RequestStatus.CANCELLED, "cancelled"
        return request

    def get(self, request_id: Hashable) -> Request:
        return self._live(request_id, "find")

    def _live(self, request_id: Hashable, what: str) -> Request:
        try:
            request = self._requests.get(request_id)
        except TypeError:
            raise ValueError(f"request id {request_id!r} is not hashable") from None
        if request is None:
            raise ValueError(
                f"cannot {what} request {request_id!r}: no such request is queued or running "
                f"({len(self._requests)} are)"
            )
        return request

    @property
    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_swapped(self) -> int:
        return len(self._swapped)

    def requests(self) -> list[Request]:
        """Live requests, oldest first."""
        return sorted(self._requests.values(), key=lambda r: r.arrival)

    def _seq_id(self, request: Request) -> tuple:
        return ("pagedkv.request", self._uid, request.request_id)

    # ---- one step -------------------------------------------------------------------------
    def schedule(self) -> ScheduledStep | None:
        """Plan the next forward (an open manager step); None when no request is live."""
        if self._open is not None:
            raise RuntimeError("the previous step is still open: finish_step or abort_step it")
        for _ in range(len(self._requests) + 2):  # each pass that plans nothing preempts one
            if not self._requests:
                return None
            self._resume_swapped()
            rows = self._running_rows()
            rows += self._admit(rows)
            scheduled = self._plan(rows)
            if scheduled is not None:
                self._open = scheduled
                return scheduled
        raise RuntimeError(f"the scheduler cannot plan a step that fits the pool: {self!r}")

    def _resume_swapped(self) -> None:
        """Swap requests back in (oldest first) while they can run in this step beside the
        running ones: budget left, and blocks for what they hold and their next tokens."""
        while self._swapped and len(self._running) < self.max_num_seqs:
            request = self._swapped[0]
            planned = self._running_rows()
            budget = self.max_num_batched_tokens - sum(n for _, n in planned)
            if budget <= 0:
                return
            held = request.num_computed
            rows = [(r, r.num_computed, n) for r, n in planned]
            rows += [(request, 0, held), (request, held, min(request.num_tokens - held, budget))]
            if not self._room_for(rows):
                return
            try:
                self.manager.swap_in(self._seq_id(request))
            except OutOfBlocksError:
                return
            self._swapped.pop(0)
            request.status = RequestStatus.RUNNING
            bisect.insort(self._running, request, key=_arrival)

    def _running_rows(self) -> list[tuple[Request, int]]:
        """Decode rows first (one token each), then prompt chunks, within the budget."""
        budget = self.max_num_batched_tokens
        rows = []
        for request in self._running:
            if budget and request.num_tokens - request.num_computed == 1:
                rows.append((request, 1))
                budget -= 1
        for request in self._running:
            left = request.num_tokens - request.num_computed
            if budget and left > 1:
                n = min(left, budget)
                rows.append((request, n))
                budget -= n
        return rows

    def _admit(self, rows: list[tuple[Request, int]]) -> list[tuple[Request, int]]:
        """Admit waiting requests (oldest first) while budget, seats and blocks allow. None
        while swapped-out requests wait to come back (they are older)."""
        budget = self.max_num_batched_tokens - sum(n for _, n in rows)
        planned = [(r, r.num_computed, n) for r, n in rows]
        admitted = []
        while (
            self._waiting
            and not self._swapped
            and budget > 0
            and len(self._running) < self.max_num_seqs
        ):
            request = self._waiting[0]
            tokens = request.tokens()
            cached, revived = self.manager.cached_prefix(tokens, extra_key=self.extra_key)
            n = min(request.num_tokens - cached, budget)
            if not self._room_for([*planned, (request, cached, n)], revived):
                break
            seq_id = self._seq_id(request)
            cached = self.manager.allocate(seq_id, tokens, extra_key=self.extra_key)
            n = min(request.num_tokens - cached, budget)
            self._waiting.pop(0)
            request.status, request.num_computed = RequestStatus.RUNNING, cached
            bisect.insort(self._running, request, key=_arrival)
            planned.append((request, cached, n))
            admitted.append((request, n))
            budget -= n
        return admitted

    def _room_for(
        self, rows: list[tuple[Request, int, int]], taken: Sequence[int] | None = None
    ) -> bool:
        """Whether each group has the free blocks these rows need: (request, tokens held,
        tokens added), and `taken[g]` free blocks more (cached ones a new request revives)."""
        cfg = self.manager.config
        for g, group in enumerate(cfg.groups):
            need = sum(self._blocks(group.window, held, held + added) for _, held, added in rows)
            need += 0 if taken is None else taken[g]
            if need > self.manager.allocators[g].num_free_blocks:
                return False
        return True

    def _blocks(self, window: int | None, held: int, total: int) -> int:
        """Blocks a sequence growing from `held` to `total` tokens adds in a group (at most:
        a sliding group releases what its window left behind)."""
        bs = self.manager.block_size
        grow = math.ceil(total / bs) - math.ceil(held / bs)
        if window is None:
            return grow
        # a long step stores only its last window; its old blocks go back when it commits
        return min(grow, math.ceil(min(total - held, window) / bs) + 1)

    def _plan(self, rows: list[tuple[Request, int]]) -> ScheduledStep | None:
        """Open the manager step for `rows`, preempting the newest running requests until it
        fits. None when every row was preempted (the caller plans again)."""
        while rows:
            requests = [r for r, _ in rows]
            counts = [n for _, n in rows]
            starts = [r.num_computed for r in requests]
            ids = [r.tokens(s, s + n) for r, s, n in zip(requests, starts, counts)]
            try:
                step = self.manager.step(
                    [self._seq_id(r) for r in requests], counts, token_ids=ids, keep=0
                )
            except OutOfBlocksError:
                if len(self._running) == 1:
                    raise  # alone and still short: `_check_fits` rules this out
                victim = self._running[-1]
                self._preempt(victim)
                rows = [(r, n) for r, n in rows if r is not victim]
                continue
            sample_rows, logits_indices, end = [], [], 0
            for i, (request, start, n) in enumerate(zip(requests, starts, counts)):
                end += n
                if start + n == request.num_tokens:
                    sample_rows.append(i)
                    logits_indices.append(end - 1)
            return ScheduledStep(
                step,
                tuple(requests),
                tuple(counts),
                tuple(map(tuple, ids)),
                tuple(starts),
                tuple(sample_rows),
                tuple(logits_indices),
            )
        return None

    def _preempt(self, request: Request) -> None:
        """Take a running request out of the cache: to the CPU swap space if it fits there,
        else to be recomputed (its full blocks stay in the prefix cache)."""
        self._running.remove(request)
        self.num_preemptions += 1
        request.num_preemptions += 1
        seq_id = self._seq_id(request)
        if self.swap:
            try:
                self.manager.swap_out(seq_id)
            except OutOfBlocksError:
                pass  # the swap space is full: recompute instead
            else:
                self.num_swaps += 1
                request.status = RequestStatus.SWAPPED
                bisect.insort(self._swapped, request, key=_arrival)
                return
        self.manager.free(seq_id)
        request.status, request.num_computed = RequestStatus.WAITING, 0
        bisect.insort(self._waiting, request, key=_arrival)

    def finish_step(
        self, scheduled: ScheduledStep, next_tokens: Sequence[int]
    ) -> list[tuple[Request, list[int], bool]]:
        """Commit the step's forward and take each sample row's next token (in `sample_rows`
        order). Returns `(request, new_token_ids, finished)` for each request that got a token;
        finished requests are freed at once."""
        self._check_open(scheduled)
        if len(next_tokens) != len(scheduled.sample_rows):
            raise ValueError(
                f"expected {len(scheduled.sample_rows)} next tokens (one per sample row); "
                f"got {len(next_tokens)}"
            )
        scheduled.step.commit()
        self._open = None
        for request, n in zip(scheduled.requests, scheduled.num_tokens):
            request.num_computed += n
        events = []
        for i, token in zip(scheduled.sample_rows, next_tokens):
            request = scheduled.requests[i]
            token = int(token)
            request.output.append(token)
            if token in request.eos_token_ids:
                request.finish_reason = "stop"
            elif len(request.output) >= request.max_new_tokens:
                request.finish_reason = "length"
            if request.finish_reason is not None:
                self._drop(request)
                request.status = RequestStatus.FINISHED
            events.append((request, [token], request.finish_reason is not None))
        return events

    def abort_step(self, scheduled: ScheduledStep) -> None:
        """The forward failed: undo the step. Each request keeps the tokens it had computed
        before it; admissions and preemptions made while planning it stand."""
        self._check_open(scheduled)
        self._open = None
        scheduled.step.abort()

    def _check_open(self, scheduled: ScheduledStep) -> None:
        if self._open is None or scheduled is not self._open:
            raise ValueError("this ScheduledStep is not the scheduler's open step")

    def _drop(self, request: Request) -> None:
        """Remove a live request from its queue and free what it holds."""
        del self._requests[request.request_id]
        if request.status == RequestStatus.WAITING:
            self._waiting.remove(request)
            return
        queue = self._running if request.status == RequestStatus.RUNNING else self._swapped
        queue.remove(request)
        self.manager.free(self._seq_id(request))

    def free_all(self) -> None:
        """Cancel every live request (after an error, or when the caller stops early)."""
        if self._open is not None:
            self.abort_step(self._open)
        for request in list(self._requests.values()):
            self.cancel(request.request_id)

    def __repr__(self) -> str:
        return (
            f"Scheduler(waiting={len(self._waiting)}, running={len(self._running)}, "
            f"swapped={len(self._swapped)}, preemptions={self.num_preemptions})"
        )


_arrival = attrgetter("arrival")


def _stop_tokens(request_id: Hashable, eos_token_ids: object) -> frozenset[int]:
    if isinstance(eos_token_ids, (str, bytes)) or not isinstance(eos_token_ids, Iterable):
        raise ValueError(
            f"request {request_id!r}: eos_token_ids must be a collection of token ids; got "
            f"{eos_token_ids!r}"
        )
    try:
        ids = _checks.as_token_list(list(eos_token_ids), "eos_token_ids")
    except ValueError as err:
        raise ValueError(f"request {request_id!r}: {err}") from None
    return frozenset(ids)

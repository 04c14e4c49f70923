"""Time budgets for the sections of `benchmark_kernels.py`, and the wrapper that runs a section.

The script has to finish within minutes on one GPU, so each section gets a share of the time
left (`Budget`) and plans its work with it: it skips what no longer fits and runs fewer rounds
when time is short. As a safety net, a section that runs past its budget by more than a fifth
is stopped by an alarm (`SectionTimeout`, SIGALRM in the main thread; none where that is not
available). `run_section` records whatever the section finished before an error or a timeout,
and the error's last line, so the script goes on to the next section.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

HARD_LIMIT_FACTOR = 1.2  # a section is stopped at this multiple of its budget


class SectionTimeout(BaseException):
    """Raised in the main thread when a section runs past its hard limit. A BaseException, like
    KeyboardInterrupt, so that `except Exception` in the code it interrupts does not swallow it
    (pagedkv aborts an interrupted step and re-raises)."""


@dataclass
class Budget:
    """Seconds a piece of work may take, counted from its creation."""

    seconds: float
    start: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def allows(self, estimate_s: float) -> bool:
        """Whether work expected to take `estimate_s` seconds fits in what is left."""
        return estimate_s <= self.left()

    def share(self, fraction: float) -> Budget:
        """A budget of `fraction` of what is left now (for one part of a section)."""
        return Budget(max(0.0, self.left()) * fraction)


@contextlib.contextmanager
def hard_limit(seconds: float) -> Iterator[None]:
    """Raise SectionTimeout in this (main) thread after `seconds`; a no-op elsewhere."""
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable or seconds <= 0:
        yield
        return

    def expire(signum, frame):
        raise SectionTimeout(f"stopped after its hard limit of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def last_line(err: BaseException) -> str:
    """The last line of the error's traceback: its type and message."""
    return "".join(traceback.format_exception_only(type(err), err)).strip().splitlines()[-1]


def run_section(name: str, fn: Callable[[Budget, dict], None], budget_s: float) -> dict:
    """Run `fn(budget, out)`, which fills `out` as it goes; returns the section's record:
    status ("ok" or "error"), its budget and seconds, `result` (out, also when it failed part
    way), and on an error its last line and traceback."""
    budget = Budget(budget_s)
    out: dict = {}
    record: dict = {"status": "ok", "budget_s": round(budget_s, 1)}
    try:
        with hard_limit(budget_s * HARD_LIMIT_FACTOR):
            fn(budget, out)
    except (Exception, SectionTimeout) as err:
        record.update(status="error", error=last_line(err), traceback=traceback.format_exc())
    record["seconds"] = round(budget.elapsed(), 1)
    record["result"] = out
    return record


def split_budget(total_left: float, weights: dict[str, float], name: str) -> float:
    """Section `name`'s share of the time left, by weight among the sections not run yet
    (`weights` holds those, `name` first): a section that finishes early leaves its time to
    the ones after it."""
    return max(0.0, total_left) * weights[name] / sum(weights.values())

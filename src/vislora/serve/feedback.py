"""Feedback on answers: online accuracy and click-through per adapter and per rollout arm.

Every answer carries a request id (uuid4 hex). The book remembers, for `feedback.ttl_s` seconds and at most
`feedback.max_pending` answers, who answered (adapter, rollout, shadow) and their top-1 labels; `give` takes one
label or click per id and counts it:

    accuracy = feedback labels equal to the top-1 label / feedback labels   (the primary; the shadow's top-1 too)
    CTR      = clicks / click feedback                                      (the primary: its answer was shown)

Ids that expired, were dropped (more than max_pending waiting) or already got their feedback are remembered too
(as many again, oldest forgotten first), so a late or second feedback is told which it was.

    with build_engine(config) as engine:
        answer = engine.predict("cat.png", adapter="cats")
        engine.feedback.give(answer.request_id, label="cat").correct
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from vislora.errors import Conflict, ServeError, UnknownRequest
from vislora.serve.config import BASE_SHADOW, FeedbackSection
from vislora.serve.metrics import NO_ADAPTER, ServeMetrics
from vislora.serve.records import Output, top1


@dataclass(frozen=True, slots=True)
class Answered:
    """What one answer was, kept until its feedback arrives."""

    request_id: str
    adapter: str | None  # None: the base model
    rollout: str | None
    top1: str | None  # None: no class scores (a text, or a base head naming no classes)
    classes: tuple[str, ...] | None  # the answering adapter's classes, that a label must be one of
    shadow: str | None  # the rollout's shadow, if it ran on this input ("@base": the base model)
    shadow_top1: str | None
    at: float  # the book's clock when answered


@dataclass(frozen=True)
class Scored:
    """One feedback as counted."""

    request_id: str
    adapter: str | None
    rollout: str | None
    label: str | None
    correct: bool | None  # top-1 == label; None without a label
    click: bool | None
    shadow: str | None
    shadow_correct: bool | None  # the shadow's top-1 == label; None without a label or a shadow with classes


class FeedbackBook:
    """Answers waiting for feedback, bounded by age and count; thread-safe. `clock` (seconds, monotonic) may be
    replaced, e.g. by a test that moves time."""

    def __init__(self, section: FeedbackSection, metrics: ServeMetrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.section = section
        self.metrics = metrics
        self.clock = clock
        self._pending: OrderedDict[str, Answered] = OrderedDict()  # oldest first
        self._gone: OrderedDict[str, str] = OrderedDict()  # id -> why it takes no feedback, oldest first
        self._given: dict[str, Scored] = {}  # ids of _gone that got their feedback
        self._lock = threading.Lock()
        self._expired = (f"expired after {section.ttl_s:g} s without feedback (feedback.ttl_s); send feedback sooner "
                         "or raise feedback.ttl_s")  # one string for every expired id
        self._dropped = (f"was dropped unanswered: more than {section.max_pending} answers were waiting for "
                         "feedback (feedback.max_pending)")
        metrics.feedback_pending.set_function(lambda: self.pending)

    @property
    def pending(self) -> int:
        """Answers that can still take feedback."""
        with self._lock:
            self._expire(self.clock())
            return len(self._pending)

    def remember(self, output: Output, shadow: str | None = None, shadow_top1: str | None = None) -> None:
        """Keep `output` (and its shadow's top-1, if one ran) for feedback under its request id."""
        classes = output.classes if output.logits is not None else None
        now = self.clock()
        answered = Answered(output.request_id, output.adapter, output.rollout, top1(output.logits, classes), classes,
                            shadow, shadow_top1, now)
        with self._lock:
            self._expire(now)
            self._pending[answered.request_id] = answered
            while len(self._pending) > self.section.max_pending:
                dropped, _ = self._pending.popitem(last=False)
                self._forget(dropped, self._dropped)
        self.metrics.answers.labels(output.rollout or "", output.adapter or NO_ADAPTER).inc()

    def give(self, request_id: str, label: str | None = None, click: bool | None = None) -> Scored:
        """Count a label (scored against the top-1 of the answer and of its shadow) and/or a click for one answer;
        each answer takes feedback once."""
        if label is None and click is None:
            raise ServeError("feedback needs a label (the true class) or a click (true/false); got neither")
        with self._lock:
            self._expire(self.clock())
            answered = self._pending.get(request_id)
            if answered is None:
                raise self._missing(request_id)
            if label is not None:
                _check_label(answered, label)
            del self._pending[request_id]
            scored = Scored(request_id, answered.adapter, answered.rollout, label,
                            None if label is None else answered.top1 == label, click, answered.shadow,
                            None if label is None or answered.shadow_top1 is None else answered.shadow_top1 == label)
            self._given[request_id] = scored
            self._forget(request_id, "already got its feedback")
        self._count(scored)
        return scored

    # ------------------------------------------------------------ internals (the lock is held)
    def _expire(self, now: float) -> None:
        while self._pending:
            request_id, answered = next(iter(self._pending.items()))
            if now - answered.at < self.section.ttl_s:
                return
            del self._pending[request_id]
            self._forget(request_id, self._expired)

    def _forget(self, request_id: str, why: str) -> None:
        self._gone[request_id] = why
        while len(self._gone) > self.section.max_pending:
            old, _ = self._gone.popitem(last=False)
            self._given.pop(old, None)

    def _missing(self, request_id: str) -> ServeError:
        why = self._gone.get(request_id)
        if why is None:
            return UnknownRequest(f"request {request_id!r} was never issued by this server or was forgotten (it "
                                  f"keeps the last {self.section.max_pending} ids; use the request_id of an answer "
                                  "from this server, within feedback.ttl_s)")
        given = self._given.get(request_id)
        if given is not None:
            what = ", ".join(f"{k} {v!r}" for k, v in (("label", given.label), ("click", given.click)) if v is not None)
            return Conflict(f"request {request_id!r} {why} ({what}); each answer is counted once")
        return UnknownRequest(f"request {request_id!r} {why}")

    def _count(self, scored: Scored) -> None:
        m, rollout, adapter = self.metrics, scored.rollout or "", scored.adapter or NO_ADAPTER
        if scored.correct is not None:
            m.feedback_labels.labels(rollout, adapter, "primary", str(scored.correct).lower()).inc()
        if scored.shadow_correct is not None:
            shadow = NO_ADAPTER if scored.shadow == BASE_SHADOW else scored.shadow
            m.feedback_labels.labels(rollout, shadow, "shadow", str(scored.shadow_correct).lower()).inc()
        if scored.click is not None:
            m.feedback_clicks.labels(rollout, adapter, str(scored.click).lower()).inc()


def _check_label(answered: Answered, label: str) -> None:
    who = "the base model" if answered.adapter is None else f"adapter {answered.adapter!r}"
    if answered.classes is None:
        raise ServeError(f"request {answered.request_id!r} was answered by {who} without class scores (an "
                         "embedding of a text, or a base head that names no classes), so a label cannot be scored; "
                         "send a click instead")
    if label not in answered.classes:
        shown = ", ".join(repr(c) for c in answered.classes[:20]) + (", ..." if len(answered.classes) > 20 else "")
        raise ServeError(f"label {label!r} is not one of {who}'s {len(answered.classes)} classes ({shown}); send the "
                         "true class by its name, as predict's labels spell it")

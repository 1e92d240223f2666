"""The jobs runner: one Trio task that owns everything that happens to a job after it is accepted.

- Submits are group-committed (every submit waiting while the store writes joins the next transaction) and
  routed as they are (`Planner.lane`): a batch when the job can wait for one and its target has the batch API,
  else the engine's queue. Jobs added to the store without a lane are routed by the next pass.
- Per target, waiting jobs are formed into batches (`Planner.form`) and submitted; a failed create puts its
  jobs back and holds the target back (the upstream's retry-after, else doubling from `poll_initial_s`).
- Batches in flight are polled with backoff (`Planner.poll_at`). Before a job's deadline comes too near
  (`min_slack_s`), it leaves its batch for the engine; a batch none of whose jobs are left is cancelled.
- An ended batch's results are streamed and settled in chunks: a success completes its job at the batch price
  (the interactive price times `price_multiplier`), an invalid request fails it, anything else sends it to
  the engine (or fails it as late, past its deadline). A result whose job has moved on is dropped, its cost
  counted as wasted.
- The engine's queue runs `engine_concurrency` jobs at once through `run_interactive` (the engine, as a
  batch-priority request, once wired in); a retryable failure is retried with backoff while the deadline allows.
- Finished jobs wake their waiters (`wait`), and their webhooks are delivered with retries. They are kept for
  `retention_s`, then purged (checked hourly).

Every store call runs in a worker thread, one at a time (SQLite fsyncs); a store that fails (a full disk) is
reported through `on_event` and retried, never fatal. Durable times are unix seconds from `wall_clock`; sleeps
use trio's clock. Restarting is safe at any point: the store's fencing makes every completion happen once.
"""

from __future__ import annotations

import math
import sqlite3
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import msgspec
import trio

from ..errors import Code, SidecardError, shutting_down
from ..protocol import Usage
from ..upstream.batches import BatchItem, BatchStatus, MessageBatches
from ..upstream.errors import UpstreamError
from . import planner as plan
from .planner import Planner, Waiting
from .settings import JobsSettings
from .store import (
    ABANDONED,
    TERMINAL,
    Batch,
    Claim,
    Failure,
    JobSpec,
    JobStore,
    JobView,
    Outcome,
    Settle,
    StoreError,
    custom_id,
    parse_custom_id,
)
from .submit import BATCH_NOT_FOUND, not_found
from .webhook import WebhookSender, next_attempt_at

T = TypeVar("T")

ROUTE_AT_ONCE: Final = 5000  # accepted jobs routed per pass
SETTLE_AT_ONCE: Final = 500  # batch results settled per transaction
MIN_TICK_S: Final = 0.05
PASS_PACING: Final = 4.0  # the scheduler rests at least this many times as long as its last pass took
STORE_RETRY_S: Final = 5.0  # after a store failure
ENGINE_GRACE_S: Final = 5.0  # past a job's deadline, an engine run is cut short
TURNAROUNDS_KEPT: Final = 100
PURGE_EVERY_S: Final = 3600.0  # finished jobs past the retention time are forgotten this often
_encoder: Final = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class EngineRun:
    """A job to run through the engine."""

    id: str
    request: bytes  # as submitted
    deadline: float  # unix time
    attempt: int  # this run's number, from 1
    meta: bytes


RunInteractive = Callable[[EngineRun], Awaitable[Outcome]]  # raises SidecardError
Price = Callable[[str, Usage], float]  # a model's interactive price for a usage, USD
EventSink = Callable[[str, dict[str, Any]], None]
SettledSink = Callable[[list[Settle]], Awaitable[None]]  # told of the settles that took effect; must not raise


class _Signal:
    """A wake-up that cannot be missed: take `mark()` before looking for work, then `wait(mark, until)`."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        self._event.set()

    def mark(self) -> trio.Event:
        return self._event

    async def wait(self, mark: trio.Event, until: float = math.inf) -> None:
        """Until set since MARK was taken, or trio time UNTIL."""
        with trio.move_on_at(until):
            await mark.wait()
        if mark is self._event and mark.is_set():
            self._event = trio.Event()


@dataclass(slots=True)
class _Submission:
    specs: Sequence[JobSpec]
    done: trio.Event = field(default_factory=trio.Event)
    ids: list[str] = field(default_factory=list)
    error: SidecardError | None = None


class JobRunner:
    def __init__(
        self,
        store: JobStore,
        settings: JobsSettings,
        *,
        batches_for: Callable[[str], MessageBatches | None],
        run_interactive: RunInteractive,
        price: Price,
        wall_clock: Callable[[], float] = time.time,
        webhooks: WebhookSender | None = None,
        on_event: EventSink | None = None,
        store_in_thread: bool = True,
        on_settled: SettledSink | None = None,
        screen: Callable[[bytes], Failure | None] | None = None,
        vet: Callable[[list[Settle]], Awaitable[list[Settle]]] | None = None,
    ) -> None:
        """`batches_for(target)`: the batch API for a job's target (None: that target has none, its jobs run on the
        engine). `price(model, usage)`: the interactive price. `on_event(name, fields)`: for the log.
        `on_settled(settles)`: what happened to claimed jobs (finished, failed, cancelled, sent to the engine), once
        recorded: for the caller's accounting. `screen(meta)`: a job about to be sent in a batch that must not be
        (its failure), or None. `vet(settles)`: a batch's answers before their jobs complete (the output
        guardrails): each settle as it is, changed, failed, or sent to the engine.
        `store_in_thread=False` runs store calls on the event loop: for tests on a mock clock, which cannot see a
        worker thread's time and would jump past it."""
        self.store = store
        self.settings = settings
        self.planner = Planner.from_settings(settings)
        self._batches_for = batches_for
        self._run_interactive = run_interactive
        self._price = price
        self._wall = wall_clock
        self._webhooks = webhooks
        self._on_event = on_event or (lambda name, fields: None)
        self._on_settled = on_settled
        self._screen = screen
        self._vet = vet
        self._db_limiter = trio.CapacityLimiter(1)
        self._store_in_thread = store_in_thread
        self._wake = _Signal()  # the scheduler's
        self._engine_ready = _Signal()
        self._hooks_ready = _Signal()
        self._submits: list[_Submission] = []
        self._submit_ready = _Signal()
        self._waiters: dict[str, list[trio.Event]] = {}
        self._busy: set[str] = set()  # batches being submitted, polled or read
        self._held: dict[str, tuple[float, float]] = {}  # target -> (until, last hold): after a failed create
        self._running = False
        self._nursery: trio.Nursery | None = None
        self._next_purge = -math.inf
        self._pending = 0  # see `pending`
        self.turnarounds: deque[float] = deque(maxlen=TURNAROUNDS_KEPT)  # submitted to ended, recent batches
        self.counts = dict.fromkeys(("batch", "engine", "cache", "fallback", "failed", "wasted_results"), 0)

    # ------------------------------------------------------------ the API the faces use

    async def submit(self, specs: Sequence[JobSpec]) -> list[str]:
        """Accept SPECS durably (checked already: `submit.check_submit`); their ids once committed."""
        if not self._running:
            raise shutting_down("the jobs runner is not running")
        submission = _Submission(specs)
        self._submits.append(submission)
        self._submit_ready.set()
        await submission.done.wait()
        if submission.error is not None:
            raise submission.error
        return submission.ids

    async def complete_cached(self, spec: JobSpec, outcome: Outcome) -> str:
        """A job answered at once (from the cache): accepted and succeeded together."""
        job_id = await self._db(self.store.add_done, spec, outcome)
        self.counts["cache"] += 1
        self._finished([job_id])
        return job_id

    async def pending(self) -> int:
        """Jobs accepted and not finished: counted as they come and go, recounted by every pass (a submit need
        not wait for a count of the store)."""
        return self._pending if self._running else await self._db(self.store.pending)

    async def requests(self, job_ids: list[str]) -> dict[str, bytes]:
        """The requests of JOB_IDS, as submitted."""
        return await self._db(self.store.requests, job_ids)

    async def metas(self, job_ids: list[str]) -> dict[str, bytes]:
        """The callers' own data of JOB_IDS, as submitted."""
        return await self._db(self.store.metas, job_ids)

    async def view(self, job_id: str) -> JobView:
        view = await self._db(self.store.view, job_id)
        if view is None:
            raise not_found(job_id)
        return view

    async def meta(self, job_id: str) -> bytes | None:
        """The caller's own bytes kept with the job (None: no such job)."""
        return (await self._db(self.store.metas, [job_id])).get(job_id)

    async def wait(self, job_id: str, timeout_s: float) -> JobView:
        """The job once it has finished, or as it is after TIMEOUT_S."""
        event = trio.Event()
        waiters = self._waiters.setdefault(job_id, [])
        waiters.append(event)  # before reading: a finish in between is not missed
        try:
            view = await self.view(job_id)
            if view.state in TERMINAL:
                return view
            with trio.move_on_after(timeout_s):
                await event.wait()
            return await self.view(job_id)
        finally:
            waiters.remove(event)
            if not waiters:
                del self._waiters[job_id]

    async def cancel(self, job_id: str) -> JobView:
        failure = Failure("cancelled", "the job was cancelled")
        state = await self._db(self.store.cancel, job_id, self._wall(), failure)
        if state is None:
            raise not_found(job_id)
        await self._tell([Settle(job_id, 0, failure=failure)])
        self._finished([job_id], pending=True)
        return await self.view(job_id)

    async def cancel_batch(self, batch_id: str) -> BatchStatus:
        """Cancel a batch in flight (by sidecard's id): requests not yet processed come back cancelled and their
        jobs run through the engine."""
        batch = await self._db(self.store.batch, batch_id)
        client = None if batch is None or batch.upstream is None else self._batches_for(batch.target)
        if batch is None or batch.upstream is None or client is None:
            raise SidecardError(BATCH_NOT_FOUND, f"no batch {batch_id[:80]!r} in flight")
        try:
            status = await client.cancel(batch.upstream)
        except UpstreamError as err:
            raise SidecardError(Code.UPSTREAM_ERROR, f"the batch API refused the cancel ({err.outcome})") from None
        await self._db(self.store.batch_polled, batch.id, self._wall())  # poll again soon
        self._wake.set()
        return status

    async def stats(self) -> dict[str, Any]:
        stats = await self._db(self.store.stats, self._wall(), at_risk_s=self.settings.min_slack_s)
        turnarounds = sorted(self.turnarounds)
        stats["recent_turnaround_s"] = turnarounds[len(turnarounds) // 2] if turnarounds else None
        stats["counts"] = dict(self.counts)
        stats["batches"] = [
            {"id": b.id, "upstream": b.upstream, "jobs": b.size, "submitted": b.submitted, "polls": b.polls}
            for b in await self._db(self.store.batches_in_flight)
        ]
        return stats

    # ------------------------------------------------------------ the task

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the jobs until cancelled (jobs in flight are taken up again after a restart)."""
        recovered = await self._db(self.store.recover, self._wall())
        self._on_event("jobs_recovered", recovered)
        self._pending = await self._db(self.store.pending)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._committer)
            for _ in range(self.settings.engine_concurrency):
                nursery.start_soon(self._engine_worker)
            if self._webhooks is not None:
                nursery.start_soon(self._deliver_hooks)
            self._running = True
            task_status.started()
            try:
                await self._schedule()
            finally:
                self._running = False

    async def _schedule(self) -> None:
        while True:
            mark = self._wake.mark()  # before the pass: a wake-up during it makes another
            started = time.perf_counter()
            try:
                wake_at = await self._pass()
            except StoreError as err:
                self._on_event("jobs_store_error", {"error": str(err)})
                wake_at = self._wall() + STORE_RETRY_S
            cost = time.perf_counter() - started
            await self._wake.wait(mark, self._trio_at(wake_at))
            # A burst of wake-ups makes one pass; a costly pass (a long queue) is not run back to back.
            await trio.sleep(max(MIN_TICK_S, PASS_PACING * cost))

    async def _pass(self) -> float:
        """Route, form and submit, start the polls due; when the next pass is due (unix time)."""
        nursery = self._nursery
        assert nursery is not None
        now = self._wall()
        self._pending = await self._db(self.store.pending)
        routable = await self._db(self.store.accepted, ROUTE_AT_ONCE)  # (added without a lane)
        if routable:
            lanes = [(job.id, self._lane(job.target, job.size, job.deadline, now)) for job in routable]
            await self._db(self.store.route, lanes, now)
            self._engine_ready.set()
            if len(routable) == ROUTE_AT_ONCE:
                self._wake.set()
        if now >= self._next_purge:
            purged = await self._db(self.store.purge, now - self.settings.retention_s)
            self._next_purge = now + PURGE_EVERY_S
            if purged:
                self._on_event("jobs_purged", {"jobs": purged})
        formation = self.planner.form((Waiting(*row) for row in await self._db(self.store.waiting)), now)
        if formation.to_engine:
            await self._db(self.store.to_engine, formation.to_engine, now)
            self.counts["fallback"] += len(formation.to_engine)
            self._engine_ready.set()
        wake_at = min(self._next_purge, math.inf if formation.wake_at is None else formation.wake_at)
        for target, job_ids in formation.batches:
            if self._batches_for(target) is None:  # the target lost its batch API (a reload)
                await self._db(self.store.to_engine, job_ids, now)
                self._engine_ready.set()
                continue
            until = self._held.get(target, (0.0, 0.0))[0]
            if until > now:
                wake_at = min(wake_at, until)
                continue
            batch_id, claims = await self._db(self.store.form_batch, target, job_ids, now)
            if claims:
                self._busy.add(batch_id)
                nursery.start_soon(self._submit_batch, batch_id, target, claims)
        for batch in await self._db(self.store.batches_in_flight):
            if batch.id in self._busy or batch.next_poll is None:
                continue
            if batch.next_poll <= now:
                self._busy.add(batch.id)
                nursery.start_soon(self._poll, batch)
            else:
                wake_at = min(wake_at, batch.next_poll)
        return wake_at

    def _lane(self, target: str | None, size: int | None, deadline: float, now: float) -> str:
        batchable = target is not None and size is not None and self._batches_for(target) is not None
        return self.planner.lane(deadline, now, size=size if batchable else None)

    # ------------------------------------------------------------ batches

    async def _submit_batch(self, batch_id: str, target: str, claims: list[Claim]) -> None:
        """Create the batch upstream and record it. (A store failure here leaves its jobs waiting for the next
        start, whose recovery queues them again.)"""
        try:
            client = self._batches_for(target)
            assert client is not None  # (`_pass` forms batches only for targets that have the API)
            claims = await self._screened(claims, batch_id)
            if not claims:
                await self._db(self.store.batch_unsubmitted, batch_id)  # (nothing left to send: abandoned)
                return
            try:
                status = await client.create([(custom_id(c.id, c.fence), c.payload) for c in claims])
            except UpstreamError as err:
                moved = await self._db(self.store.batch_unsubmitted, batch_id)
                self._hold(target, err)
                self._on_event("jobs_batch_create_failed", {"target": target, "jobs": moved, "outcome": err.outcome})
                return
            now = self._wall()
            first_fallback = min(self.planner.fallback_at(c.deadline) for c in claims)
            # The batch exists upstream: record it even if we are being stopped, or its results are never read.
            with trio.CancelScope(shield=True):
                await self._db(self.store.batch_submitted, batch_id, status.id, now, self.planner.poll_at(0, now, first_fallback))
            self._held.pop(target, None)
            self._on_event("jobs_batch_submitted", {"batch": batch_id, "upstream": status.id, "target": target, "jobs": len(claims)})
        except StoreError as err:
            self._on_event("jobs_store_error", {"error": str(err)})
        finally:
            self._busy.discard(batch_id)
            self._wake.set()

    async def _screened(self, claims: list[Claim], batch_id: str) -> list[Claim]:
        """CLAIMS less those `screen` refuses now (a kill switch turned on since they were accepted): failed."""
        if self._screen is None:
            return claims
        refused = {c.id: failure for c in claims if (failure := self._screen(c.meta)) is not None}
        if refused:
            await self._apply([Settle(c.id, c.fence, failure=refused[c.id]) for c in claims if c.id in refused], batch_id)
        return [c for c in claims if c.id not in refused]

    def _hold(self, target: str, err: UpstreamError) -> None:
        """No batch for TARGET for a while after a failed create (its jobs may go to the engine meanwhile)."""
        now = self._wall()
        last = self._held.get(target, (0.0, 0.0))[1]
        delay = err.retry_after_s or min(self.settings.poll_max_s, max(self.settings.poll_initial_s, last * 2))
        self._held[target] = (now + delay, delay)

    async def _poll(self, batch: Batch) -> None:
        try:
            await self._poll_batch(batch)
        except StoreError as err:
            self._on_event("jobs_store_error", {"error": str(err)})
        finally:
            self._busy.discard(batch.id)
            self._wake.set()

    async def _poll_batch(self, batch: Batch) -> None:
        client = self._batches_for(batch.target)
        assert batch.upstream is not None
        if client is None:  # the target lost its batch API (a reload): its jobs go to the engine
            await self._db(self.store.batch_done, batch.id, self._wall(), state=ABANDONED)
            self._engine_ready.set()
            return
        running = await self._db(self.store.batch_jobs, batch.id)
        try:
            status = await client.retrieve(batch.upstream)
            if status.ended:
                await self._read_results(batch, client, status)
                return
        except UpstreamError as err:  # polled again, with backoff
            if err.status == 404:  # the upstream does not know it (another workspace, a restarted simulator)
                self._on_event("jobs_batch_lost", {"batch": batch.id, "jobs": len(running)})
                await self._db(self.store.batch_done, batch.id, self._wall(), state=ABANDONED)
                self._engine_ready.set()  # its jobs run on the engine now, not at their deadline
                return
            self._on_event("jobs_batch_poll_failed", {"batch": batch.id, "outcome": err.outcome})
        now = self._wall()
        due = set(self.planner.fallbacks(((job_id, deadline) for job_id, _, deadline in running), now))
        if due:
            moved = await self._db(self.store.settle, [Settle(i, f) for i, f, _ in running if i in due], now)
            self.counts["fallback"] += len(moved)
            self._on_event("jobs_fallback", {"batch": batch.id, "jobs": len(moved), "why": "deadline"})
            self._engine_ready.set()
        remaining = [deadline for job_id, _, deadline in running if job_id not in due]
        if not remaining and due:
            try:
                await client.cancel(batch.upstream)  # nobody waits for it now; what it did is read when it ends
            except UpstreamError:
                pass
        first_fallback = min(map(self.planner.fallback_at, remaining), default=None)
        await self._db(self.store.batch_polled, batch.id, self.planner.poll_at(batch.polls + 1, now, first_fallback))

    async def _read_results(self, batch: Batch, client: MessageBatches, status: BatchStatus) -> None:
        """Settle every job of an ended batch from its results, a chunk per transaction (bounded memory)."""
        running = {job_id: (fence, deadline) for job_id, fence, deadline in await self._db(self.store.batch_jobs, batch.id)}
        completed = set(await self._db(self.store.completed_in, batch.id))  # before a restart, read again now
        settles: list[Settle] = []
        dropped = 0.0  # the cost of results whose job had moved on
        settled_here: set[str] = set()
        async with await client.open_results(status) as stream:
            async for item in stream:
                settle, cost = self._settle_for(item, running, status.id)
                if settle is None:
                    parsed = parse_custom_id(item.custom_id)
                    if cost and (parsed is None or parsed[0] not in completed):
                        dropped += cost
                        self.counts["wasted_results"] += 1
                    continue
                settles.append(settle)
                if len(settles) >= SETTLE_AT_ONCE:
                    settled_here.update(await self._apply(settles, batch.id))
                    settles = []
        settled_here.update(await self._apply(settles, batch.id))
        now = self._wall()
        await self._db(self.store.batch_done, batch.id, now, wasted_usd=dropped)
        if batch.submitted is not None:
            self.turnarounds.append(now - batch.submitted)
        self._engine_ready.set()
        self._on_event("jobs_batch_ended", {"batch": batch.id, "upstream": status.id, "settled": len(settled_here),
                                            "wasted_usd": round(dropped, 6)})  # fmt: skip

    def _settle_for(self, item: BatchItem, running: dict[str, tuple[int, float]], upstream_id: str) -> tuple[Settle | None, float]:
        """The settle a result makes (None: its job moved on), and what the result cost at the batch price."""
        listed = cost = 0.0
        reply = None
        if item.result.type == "succeeded":
            try:
                reply = item.reply()
            except UpstreamError:
                reply = None  # a malformed message: the job runs through the engine
            else:
                listed = self._price(reply.message.model, reply.message.usage)
                cost = listed * self.settings.price_multiplier
        parsed = parse_custom_id(item.custom_id)
        job = None if parsed is None else running.get(parsed[0])
        if parsed is None or job is None or job[0] != parsed[1]:
            return None, cost
        job_id, fence = parsed
        deadline = job[1]
        error = item.result.error.error if item.result.error is not None else None
        action = plan.ENGINE if (item.result.type == "succeeded" and reply is None) else self.planner.on_item(
            item.result.type, error.type if error is not None else None, deadline, self._wall()
        )
        if action == plan.COMPLETE:
            assert reply is not None
            outcome = Outcome(served="batch", message=item.result.message, usage=reply.message.usage, cost_usd=cost,
                              list_usd=listed, batch=upstream_id)  # fmt: skip
            return Settle(job_id, fence, outcome=outcome), 0.0
        if action == plan.FAIL:
            message = f"the batch refused the request: {error.message[:300] if error is not None else 'invalid'}"
            return Settle(job_id, fence, failure=Failure(Code.INVALID_REQUEST, message)), 0.0
        if action == plan.LATE:
            return Settle(job_id, fence, failure=Failure(Code.DEADLINE_EXCEEDED, "the job's deadline passed before an answer")), 0.0
        return Settle(job_id, fence), 0.0

    async def _apply(self, settles: list[Settle], batch_id: str) -> list[str]:
        if not settles:
            return []
        if self._vet is not None:
            settles = await self._vet(settles)
        done = await self._db(self.store.settle, settles, self._wall())
        await self._tell(done)
        finished = [s.id for s in done if s.outcome is not None or s.failure is not None]
        self.counts["batch"] += sum(s.outcome is not None for s in done)
        self.counts["failed"] += sum(s.failure is not None for s in done)
        self.counts["fallback"] += len(done) - len(finished)
        self._finished(finished, pending=True)
        return [s.id for s in done]

    # ------------------------------------------------------------ the engine

    async def _engine_worker(self) -> None:
        while True:
            mark = self._engine_ready.mark()
            try:
                claims = await self._db(self.store.claim_engine, self._wall(), 1)
                if claims:
                    await self._run_engine(claims[0])
                    continue
                next_at = await self._db(self.store.next_engine_at)
            except StoreError as err:
                self._on_event("jobs_store_error", {"error": str(err)})
                next_at = self._wall() + STORE_RETRY_S
            await self._engine_ready.wait(mark, self._trio_at(math.inf if next_at is None else next_at))

    async def _run_engine(self, claim: Claim) -> None:
        run = EngineRun(claim.id, claim.payload, claim.deadline, claim.attempt, claim.meta)
        settle: Settle
        with trio.move_on_at(self._trio_at(claim.deadline + ENGINE_GRACE_S)) as scope:
            try:
                outcome = await self._run_interactive(run)
            except SidecardError as err:
                now = self._wall()
                at = self.planner.retry_at(claim.attempt, now, claim.deadline, retryable=err.retryable)
                if at is not None and err.retry_after_ms is not None:
                    at = max(at, now + err.retry_after_ms / 1000)
                if at is not None and at < claim.deadline:
                    settle = Settle(claim.id, claim.fence, not_before=at)
                else:
                    settle = Settle(claim.id, claim.fence, failure=Failure(err.code, err.message, err.retryable))
            except Exception as exc:  # a bug in the engine must fail this job, not the runner
                self._on_event("jobs_engine_error", {"job": claim.id, "error": type(exc).__name__})
                settle = Settle(claim.id, claim.fence, failure=Failure(Code.INTERNAL, "sidecard failed to run the job"))
            else:
                settle = Settle(claim.id, claim.fence, outcome=outcome)
        if scope.cancelled_caught:
            settle = Settle(claim.id, claim.fence, failure=Failure(Code.DEADLINE_EXCEEDED, "the job's deadline passed before an answer"))
        done = await self._db(self.store.settle, [settle], self._wall())
        await self._tell(done)
        if done and (settle.outcome is not None or settle.failure is not None):
            self.counts["engine" if settle.outcome is not None else "failed"] += 1
            self._finished([claim.id], pending=True)
        elif done:
            self._engine_ready.set()

    # ------------------------------------------------------------ submits, finishes, webhooks

    async def _committer(self) -> None:
        while True:
            mark = self._submit_ready.mark()
            if not self._submits:
                await self._submit_ready.wait(mark)
                continue
            group, self._submits = self._submits, []
            specs = [spec for s in group for spec in s.specs]
            now = self._wall()
            lanes = [self._lane(s.target, None if s.params is None else len(s.params), s.deadline, now) for s in specs]
            try:
                ids = await self._db(self.store.add, specs, now, lanes)
            except StoreError as err:
                self._on_event("jobs_store_error", {"error": str(err)})
                refusal = SidecardError(Code.UPSTREAM_UNAVAILABLE, "the job store could not record the job; try again")
                for submission in group:
                    submission.error = refusal
                    submission.done.set()
                continue
            self._pending += len(ids)
            start = 0
            for submission in group:
                submission.ids = ids[start : start + len(submission.specs)]
                start += len(submission.specs)
                submission.done.set()
            if plan.ENGINE in lanes:
                self._engine_ready.set()
            if plan.BATCH in lanes:
                self._wake.set()

    def _finished(self, job_ids: list[str], *, pending: bool = False) -> None:
        """JOB_IDS have finished (PENDING: they were counted as pending until now)."""
        if pending:
            self._pending = max(0, self._pending - len(job_ids))
        for job_id in job_ids:
            for event in self._waiters.get(job_id, ()):
                event.set()
        if job_ids:
            self._hooks_ready.set()

    async def _deliver_hooks(self) -> None:
        assert self._webhooks is not None
        while True:
            mark = self._hooks_ready.mark()
            try:
                due = await self._db(self.store.hooks_due, self._wall(), self._webhooks.settings.concurrency)
                if due:
                    async with trio.open_nursery() as nursery:
                        for hook in due:
                            nursery.start_soon(self._deliver, hook.id, hook.url, hook.attempts)
                    continue
                next_at = await self._db(self.store.next_hook_at)
            except StoreError as err:
                self._on_event("jobs_store_error", {"error": str(err)})
                next_at = self._wall() + STORE_RETRY_S
            await self._hooks_ready.wait(mark, self._trio_at(math.inf if next_at is None else next_at))

    async def _deliver(self, job_id: str, url: str, attempts: int) -> None:
        assert self._webhooks is not None
        try:
            view = await self._db(self.store.view, job_id)
            if view is None:
                return
            body = _encoder.encode({"type": "job.finished", "job": view})
            delivered = await self._webhooks.deliver(url, job_id, body, int(self._wall()))
            next_at = None if delivered else next_attempt_at(attempts + 1, self._wall(), self._webhooks.settings)
            await self._db(self.store.hook_attempted, job_id, delivered=delivered, next_at=next_at)
        except StoreError as err:
            self._on_event("jobs_store_error", {"error": str(err)})
            return
        if not delivered and next_at is None:
            self._on_event("jobs_webhook_failed", {"job": job_id, "attempts": attempts + 1})

    # ------------------------------------------------------------ plumbing

    async def _tell(self, settles: list[Settle]) -> None:
        if self._on_settled is None or not settles:
            return
        try:
            await self._on_settled(settles)
        except Exception as exc:  # the caller's accounting must not stop the runner
            self._on_event("jobs_settled_error", {"error": type(exc).__name__})

    async def _db(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A store call in a worker thread, one at a time; SQLite's failures as `StoreError`."""

        def run() -> T:
            try:
                return call(*args, **kwargs)
            except sqlite3.Error as exc:
                raise StoreError(f"job store: {exc}") from None

        if not self._store_in_thread:
            await trio.lowlevel.checkpoint()
            return run()
        return await trio.to_thread.run_sync(run, limiter=self._db_limiter)

    def _trio_at(self, wall: float) -> float:
        return trio.current_time() + (wall - self._wall()) if math.isfinite(wall) else math.inf

"""The engine's side of async jobs (docs/jobs.md): a submit is planned, switched, looked up and admitted like a
request; a job runs either in a Message Batch (the runner, `jobs/`) or through the engine as a `batch`-priority
request; either way its end is accounted for like a request's.

- **Submit**: each request is planned (prompts rendered, its version pinned), meets the kill switches (again
  before it is sent in a batch or run on the engine: `_killed`) and the cache (a cached answer completes the job
  at once), then traffic control: rate limits, and its budgets, against
  which its worst case is reserved until the job ends. A job whose route leads with a first-party target goes
  to the runner with that target's Messages params, for a batch; any other job runs on the engine only.
- **Engine runs**: the reservation made at submit is released and the engine admits, walks, caches, samples and
  accounts for the run itself, as a `batch`-priority request (it never starves interactive traffic) whose deadline
  is what is left of the job's.
- **Batch results**: a job a batch completed is accounted for through the engine's own sinks (metrics, spend
  settled against its reservation at the batch price, a quality sample, the log line) and its answer cached.
  After a restart the reservation is gone; the spend is then added to its budgets as it lands.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import msgspec
import trio

from ..config import Target
from ..errors import Code, SidecardError, shutting_down
from ..jobs.runner import EngineRun, JobRunner
from ..jobs.settings import JobsSettings
from ..jobs.store import Failure, JobSpec, JobStore, JobView, Outcome, Settle, StoreError
from ..jobs.submit import check_submit, deadline_from, not_found
from ..jobs.webhook import WebhookSender
from ..observe.log import JsonLog
from ..observe.metrics import Metrics
from ..observe.redact import pseudonym
from ..fleet.gate import FleetTicket
from ..protocol import UNDECODABLE, Attempt, BadFrame, Complete, Completion, ServedBy, Submit, api_message, decode_body
from ..safety.access import ANYONE, AccessControl, Identity
from ..traffic import Admission
from ..upstream.batches import MessageBatches
from ..upstream.client import message_extra
from ..upstream.pool import ConnectionPool
from . import Engine, _app_of
from .answers import disabled
from .safety import marks_of, with_text
from .types import JobRun, Trace

_encoder: Final = msgspec.json.Encoder()
_complete_decoder: Final = msgspec.json.Decoder(Complete)
GAUGES_EVERY_S: Final = 15.0
SETTLE_CHUNK: Final = 500  # (the runner's results per transaction)


class JobDesk:
    """Where the faces hand jobs in and read them back; owns the runner (run it with `run`)."""

    def __init__(
        self,
        engine: Engine,
        store: JobStore,
        settings: JobsSettings,
        *,
        pool: ConnectionPool,
        api_key: str | None,
        anthropic_version: str | None,
        log: JsonLog,
        metrics: Metrics,
        webhook_secret: bytes | None = None,
        wall: Callable[[], float] = time.time,
        store_in_thread: bool = True,
        access: AccessControl | None = None,
    ) -> None:
        """`access`: the app identities, by which a job submitted by an app is run and checked (docs/safety.md)."""
        self.engine = engine
        self._access = access
        self.settings = settings
        self.log = log
        self.metrics = metrics
        self._pool = pool
        self._api_key = api_key
        self._anthropic_version = anthropic_version
        self._wall = wall
        self._clients: dict[str, MessageBatches] = {}
        self._admissions: dict[str, Admission] = {}  # job id -> its reservation, held since submit
        self._answered: dict[str, tuple[Trace, Completion | None]] = {}  # a batch's answers vetted, to account for
        self.stopping = False  # the daemon is draining (`drain`)
        self._waits: set[trio.CancelScope] = set()
        webhooks = WebhookSender(pool, webhook_secret, settings.webhook) if webhook_secret is not None else None
        self.runner = JobRunner(
            store, settings, batches_for=self._batches_for, run_interactive=self._run, price=engine.accounting.prices.cost,
            wall_clock=wall, webhooks=webhooks, on_event=self._event, on_settled=self._settled,
            store_in_thread=store_in_thread, screen=self._killed, vet=self._vet,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The runner and the gauges, until cancelled; then the store is closed (no store call is left running)."""
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.runner.run)
                nursery.start_soon(self._gauges)
                task_status.started()
        finally:
            self.runner.store.close()

    async def _gauges(self) -> None:
        metrics = self.metrics
        while True:
            try:
                stats = await self.runner.stats()
            except StoreError:
                stats = None  # (the runner reports store failures)
            if stats is not None:
                for state, count in stats["jobs"].items():
                    metrics.jobs(state).set(count)
                metrics.jobs_at_risk.set(stats["at_risk"])
                metrics.jobs_oldest_pending_seconds.set(stats["oldest_pending_s"] or 0.0)
                metrics.job_batches_in_flight.set(stats["batches_in_flight"])
                metrics.jobs_savings_usd.set(stats["savings_usd"])
            await trio.sleep(GAUGES_EVERY_S)

    # ------------------------------------------------------------ the faces' side

    async def submit(self, submit: Submit, identity: Identity = ANYONE) -> list[JobView]:
        """Accept SUBMIT's jobs (all or none), each authorised for IDENTITY as a request; their views, in order.
        Raises `SidecardError`."""
        if self.stopping:
            raise shutting_down("the daemon is shutting down")
        now = self._wall()
        deadline = deadline_from(submit.by, now, self.settings)
        requests = _requests(submit)
        check_submit(len(requests), await self.runner.pending(), submit.webhook, self.settings)
        prepared: list[tuple[JobSpec, Outcome | None, Admission | None]] = []
        try:
            for request in requests:
                prepared.append(await self._prepare(request, now, deadline, submit.webhook, identity))
        except BaseException:
            for _, _, admission in prepared:
                self._release(admission)
            raise
        queued = [(spec, admission) for spec, outcome, admission in prepared if outcome is None]
        try:
            queued_ids = await self.runner.submit([spec for spec, _ in queued]) if queued else []
        except BaseException:  # (cancelled too: jobs it accepted all the same are accounted for as they land)
            for _, admission in queued:
                self._release(admission)
            raise
        for (_, admission), job_id in zip(queued, queued_ids, strict=True):
            if admission is not None:
                self._admissions[job_id] = admission
        ids = iter(queued_ids)
        views = []
        for spec, outcome, _ in prepared:
            if outcome is not None:
                job_id = await self.runner.complete_cached(spec, outcome)
                self.metrics.jobs_finished("cache", "succeeded").inc()
                state, finished = "succeeded", now
            else:
                job_id, state, finished = next(ids), "accepted", None
            views.append(JobView(id=job_id, state=state, created=now, deadline=spec.deadline, attempts=0,
                                 webhook=spec.webhook, finished=finished, outcome=outcome))  # fmt: skip
        return views

    async def view(self, job_id: str, identity: Identity = ANYONE) -> JobView:
        await self._check_owner(job_id, identity)
        return await self.runner.view(job_id)

    async def wait(self, job_id: str, timeout_s: float, identity: Identity = ANYONE) -> JobView:
        """The job once finished, or as it is after TIMEOUT_S (or at once when the daemon starts draining)."""
        await self._check_owner(job_id, identity)
        with trio.CancelScope() as scope:
            self._waits.add(scope)
            try:
                if not self.stopping:
                    return await self.runner.wait(job_id, timeout_s)
            finally:
                self._waits.discard(scope)
        return await self.runner.view(job_id)

    async def _check_owner(self, job_id: str, identity: Identity) -> None:
        """With access control on, an app sees only its own jobs: another's is `job_not_found`, as an unknown id
        is (no way to learn which ids exist)."""
        if identity is ANYONE or identity.app is None:
            return
        meta = await self.runner.meta(job_id)
        if meta is None or _scope(meta).app != identity.name:
            raise not_found(job_id)

    def drain(self) -> None:
        """The daemon is draining: submits are refused, waits answer now (the runner stops with the services)."""
        self.stopping = True
        for scope in self._waits:
            scope.cancel()

    # ------------------------------------------------------------ submit

    async def _prepare(self, request: Complete, created: float, deadline: float, webhook: str | None,
                       identity: Identity) -> tuple[JobSpec, Outcome | None, Admission | None]:
        """One request of a submit: (its spec, its outcome if it is answered already, its reservation). Checked
        like a request of IDENTITY's: its access, the injection and data policies, the kill switches, then rate
        limits and budgets (fleet-wide in fleet mode), its worst case reserved until the job's deadline. A
        refusal is accounted for (log line, per-app count, audit record) like a refused request's."""
        engine = self.engine
        if request.stream:
            raise SidecardError(Code.BAD_REQUEST, "stream: a job's answer is not streamed")
        trace = engine._trace(request, identity=identity)
        try:
            return await self._prepared(trace, created, deadline, webhook)
        except SidecardError as err:
            refused = err.of_request(trace.request_id, trace.upstream_request_id)  # named as its log line names it
            engine.accounting.finish(trace, None, refused)
            raise refused from err

    async def _prepared(self, trace: Trace, created: float, deadline: float,
                        webhook: str | None) -> tuple[JobSpec, Outcome | None, Admission | None]:
        engine, request = self.engine, trace.request
        answer = engine._prelude(trace)  # the plan, the safety gate, kill switches and the cache
        plan = trace.plan
        assert plan is not None
        served = plan.request  # as its experiment arm serves it (a version, model or route), if it has one
        if plan.version is not None:
            served.version = plan.version.version  # the job keeps the version it was planned with
        app = marks_of(trace).identity
        if app is not ANYONE and served.max_tokens is None:
            served.max_tokens = plan.body["max_tokens"]  # (capped to what the app may have): the job keeps it
        arm = (plan.experiment, plan.arm) if plan.experiment is not None and plan.arm is not None else None
        meta = _encoder.encode(Scope(request.feature, plan.prompt, app.name if app.app is not None else None, arm))
        if answer is not None:
            engine.accounting.finish(trace, answer, None)
            spec = JobSpec(request=_encoder.encode(served), created=created, deadline=deadline, webhook=webhook, meta=meta)
            return spec, Outcome(served="cache", message=_message(answer), usage=answer.usage, request_id=answer.request_id), None
        if engine.fleet is not None:
            await engine._fleet_admit(trace, shared_cache=False, hold_s=max(0.0, deadline - self._wall()))
        else:
            engine._admit(trace)
        plan = trace.plan
        assert plan is not None
        target = plan.route.targets[0]
        # The batch's grouping key: the target's configured base URL ("" for the default), resolved when the batch is
        # sent (a simulated upstream's address changes across restarts). Betas travel as headers, and an answer that
        # output guardrails check or scrubbed data's placeholders are restored in is the engine's to finish: engine
        # only.
        batchable = not plan.headers and engine.upstream.batch_base(target) is not None
        key = (target.base_url or "") if batchable else None
        params = None if key is None else _encoder.encode({"model": target.model, **plan.body})
        served.route = plan.route_name  # (a soft budget, or an injection policy, may have moved it)
        spec = JobSpec(request=_encoder.encode(served), created=created, deadline=deadline, target=key, params=params,
                       webhook=webhook, meta=meta)  # fmt: skip
        return spec, None, trace.admission

    def _identity(self, scope: Scope) -> Identity:
        """The app a job was submitted by, as the config has it now; `forbidden` if it is no longer an app."""
        if scope.app is None or self._access is None or not self._access.settings.enabled:
            return ANYONE
        app = self._access.settings.apps.get(scope.app)
        if app is None:
            raise SidecardError(Code.FORBIDDEN, f"the job's app {scope.app!r} is no longer a known app")
        return Identity(scope.app, app)

    def _batches_for(self, key: str) -> MessageBatches | None:
        """The batch API for the grouping key KEY: a first-party target's configured base URL ("": the default)."""
        base = self.engine.upstream.batch_base(Target(model="-", base_url=key or None))
        if self._api_key is None or base is None:
            return None
        client = self._clients.get(base)
        if client is None:
            client = self._clients[base] = MessageBatches(
                self._pool, api_key=self._api_key, base_url=base, anthropic_version=self._anthropic_version
            )
        return client

    # ------------------------------------------------------------ running and settling

    def _killed(self, meta: bytes) -> Failure | None:
        """A queued job a kill switch has stopped since it was accepted: `ai_disabled`, whatever the switch's mode
        (its static or cached answer is for requests answered now)."""
        try:
            scope = _scope_decoder.decode(meta)
        except msgspec.MsgspecError:
            return None
        switch = self.engine.kills.match(scope.feature, scope.prompt, self.engine._clock())
        return None if switch is None else Failure(Code.AI_DISABLED, disabled(switch).message)

    async def _run(self, run: EngineRun) -> Outcome:
        """A job through the engine, as a batch-priority request of its app with what is left of its deadline
        (checked, guarded and audited as the app's request)."""
        if (killed := self._killed(run.meta)) is not None:
            raise SidecardError(killed.code, killed.message, retryable=False)
        # Its budgets' reservation is released for the run's own; the rate limits the submit took are the run's.
        prepaid = self._admissions.pop(run.id, None)
        self._release(prepaid)
        scope = _scope(run.meta)
        request = _complete_decoder.decode(run.request)
        request.priority = "batch"
        request.deadline_ms = max(1, int((run.deadline - self._wall()) * 1000))
        job = JobRun(run.id, scope.arm, prepaid)
        completion = await self.engine.complete(request, identity=self._identity(scope), job=job)
        if completion.degraded:  # a stale or static answer: the job has time to get a real one
            raise SidecardError(Code.UPSTREAM_UNAVAILABLE, "only a degraded answer was available", retryable=True)
        return Outcome(served="engine", message=_message(completion), usage=completion.usage,
                       cost_usd=completion.cost_usd, list_usd=completion.cost_usd, request_id=completion.request_id)  # fmt: skip

    async def _vet(self, settles: list[Settle]) -> list[Settle]:
        """A batch's answers before their jobs complete: each as its app's request's answer, its placeholders
        restored and the output guardrails applied: a redaction masks it, a flag is noted, a block fails the job
        `output_blocked`, a retry sends the job to the engine (whose guardrails retry with the corrective
        instruction). Never raises: an answer that cannot be vetted completes as it came."""
        answered = [s for s in settles if s.outcome is not None and s.outcome.served == "batch"]
        if not answered:
            return settles
        ids = [s.id for s in answered]
        requests, metas = await self.runner.requests(ids), await self.runner.metas(ids)
        vetted = {}
        for s in answered:
            if s.id in requests:
                try:
                    vetted[s.id] = await self._vetted(s, _complete_decoder.decode(requests[s.id]), _scope(metas.get(s.id, b"")))
                except Exception as exc:  # (a bug here must not hold a batch's results)
                    self.log.internal_error("jobs_vet", exc, s.id)
        if len(self._answered) > 10 * SETTLE_CHUNK:  # (results whose jobs moved on are never settled: forget them)
            self._answered.clear()
        return [vetted.get(s.id, s) for s in settles]

    async def _vetted(self, settle: Settle, request: Complete, scope: Scope) -> Settle:
        engine, outcome = self.engine, settle.outcome
        assert outcome is not None
        try:
            identity = self._identity(scope)
        except SidecardError as err:  # its app is gone: the job fails, its answer's spend counts all the same
            self._account_batch(settle.id, self._answer_trace(settle.id, request, scope, ANYONE)[0], outcome, None, err)
            return dataclasses.replace(settle, outcome=None, failure=Failure(err.code, err.message))
        trace, completion = self._answer_trace(settle.id, request, scope, identity, outcome)
        assert completion is not None
        gate = engine.gate
        if trace.plan is None or gate is None:
            self._answered[settle.id] = (trace, completion)
            return dataclasses.replace(settle, outcome=msgspec.structs.replace(outcome, request_id=trace.request_id))
        marks = marks_of(trace)
        marks.placeholders = gate.placeholders(trace)
        marks.restore = marks.placeholders is not None
        checked = with_text(completion, marks.restored) if marks.restore else completion
        guard = gate.guard(trace)
        decision = await gate.decide(trace, guard, checked.text) if guard is not None else None
        if decision is not None and decision.outcome == "redact":
            checked = with_text(checked, lambda text: guard.check(text).text)  # type: ignore[union-attr]
        if decision is not None and decision.outcome in ("block", "retry"):
            self._account_batch(settle.id, trace, outcome, None, gate.blocked(decision))
            if decision.outcome == "retry":
                return Settle(settle.id, settle.fence)  # to the engine
            err = gate.blocked(decision)
            return dataclasses.replace(settle, outcome=None, failure=Failure(err.code, err.message))
        if marks.guardrails:
            checked = msgspec.structs.replace(checked, guardrails=marks.guardrails)
        self._answered[settle.id] = (trace, checked)
        message = outcome.message if checked is completion else _message(checked)
        return dataclasses.replace(settle, outcome=msgspec.structs.replace(outcome, message=message, request_id=trace.request_id))

    def _answer_trace(self, job_id: str, request: Complete, scope: Scope, identity: Identity,
                      outcome: Outcome | None = None) -> tuple[Trace, Completion | None]:
        """A batch's answer as its request's: the trace (planned as at submit, its arm kept) and the completion."""
        engine = self.engine
        trace = engine._trace(request, identity=identity, job=JobRun(job_id, scope.arm))
        try:
            trace.plan = engine.planner.plan(request, trace.started, arm=scope.arm)
        except SidecardError:
            trace.plan = None  # its prompt is gone: the answer stands, and its spend still counts
        return trace, _completion(request, outcome, trace.request_id) if outcome is not None else None

    async def _settled(self, settles: Sequence[Settle]) -> None:
        """Jobs the runner has finished: a batch's answers accounted for, reservations of the rest released."""
        served = [s for s in settles if s.outcome is not None and s.outcome.served == "batch"]
        for s in settles:
            if s.outcome is not None:
                self.metrics.jobs_finished(s.outcome.served, "succeeded").inc()
            elif s.failure is not None:
                self.metrics.jobs_finished("none", "cancelled" if s.failure.code == "cancelled" else s.failure.code).inc()
            if s not in served and (s.outcome is not None or s.failure is not None):
                self._release(self._admissions.pop(s.id, None))
        if not served:
            return
        kept = {s.id: self._answered.pop(s.id) for s in served if s.id in self._answered}
        unvetted = [s.id for s in served if s.id not in kept]  # (a vetting that failed: accounted all the same)
        requests = await self.runner.requests(unvetted) if unvetted else {}
        for s in served:
            assert s.outcome is not None
            if s.id in requests:
                kept[s.id] = self._answer_trace(s.id, _complete_decoder.decode(requests[s.id]), Scope("default", None),
                                                ANYONE, s.outcome)
            if s.id in kept:
                self._account_batch(s.id, kept[s.id][0], s.outcome, kept[s.id][1], None)

    def _account_batch(self, job_id: str, trace: Trace, outcome: Outcome, completion: Completion | None,
                       error: SidecardError | None) -> None:
        """A batch's answer (vetted: `_vet`), through the engine's sinks as a request answered at the batch price:
        COMPLETION, or the ERROR it ended in (a guardrail's block; its spend counts all the same)."""
        engine, request = self.engine, trace.request
        admission = self._admissions.pop(job_id, None) or self._fresh_admission(request, trace.feature, _app_of(trace))
        trace.admission = admission
        reply = _reply_decoder.decode(outcome.message)
        model = reply.model or "unknown"
        trace.attempts.append(Attempt("anthropic", model, "batch", 0.0))
        if trace.plan is None:
            if admission is not None and self._settler is not None:
                self._settler.settle(admission, cost_usd=outcome.cost_usd, tokens_used=0)
            return
        engine.accounting.charge(trace, outcome.usage, model, price_multiplier=self.settings.price_multiplier)
        if completion is not None:
            completion = msgspec.structs.replace(completion, cost_usd=trace.bill.cost_usd, upstream_request_id=outcome.batch)
            if trace.plan.cache_key is not None and engine.cache is not None:
                engine.answers.store(trace, completion)
        engine.accounting.finish(trace, completion, error)

    @property
    def _settler(self) -> Any:
        """Where reservations are settled: the fleet's gate in fleet mode, else traffic control."""
        return self.engine.fleet if self.engine.fleet is not None else self.engine.traffic

    def _fresh_admission(self, request: Complete, feature: str, app: str | None) -> Admission | None:
        """For a job whose reservation did not survive a restart: its budgets (FEATURE: the one it is accounted
        under), nothing held."""
        traffic = self.engine.traffic
        if traffic is None:
            return None
        user = pseudonym(request.user, self.engine.user_salt) if request.user is not None else None
        keys = traffic.ledger.keys_for(feature=feature, route=request.route or "", user=user, app=app)
        if self.engine.fleet is not None:  # the fleet's counters, with no reservation to settle
            admission = Admission([], None, [], 0.0, None)
            budgets = self.engine.fleet._budgets(feature, request.route or "", user, self._wall(), app)
            admission.fleet = FleetTicket("", budgets, [], 0.0)
            return admission
        return Admission(keys, None, [], 0.0, traffic.ledger.reserve(keys, 0.0) if keys else None)

    def _release(self, admission: Admission | None) -> None:
        if admission is not None and self._settler is not None:
            self._settler.settle(admission, cost_usd=0.0, tokens_used=admission.estimated_tokens)

    def _event(self, name: str, fields: dict[str, Any]) -> None:
        level = "warning" if name in ("jobs_store_error", "jobs_webhook_failed", "jobs_engine_error",
                                      "jobs_batch_create_failed", "jobs_batch_lost") else "info"  # fmt: skip
        self.log.event(name, level, **fields)


class Scope(msgspec.Struct, array_like=True):
    """What a kill switch matches a job by, the app that submitted it and the experiment arm it was assigned (kept
    as the job's meta)."""

    feature: str
    prompt: str | None
    app: str | None = None
    arm: tuple[str, str] | None = None


_scope_decoder: Final = msgspec.json.Decoder(Scope)


def _scope(meta: bytes) -> Scope:
    try:
        return _scope_decoder.decode(meta)
    except msgspec.MsgspecError:
        return Scope("default", None)


def _completion(request: Complete, outcome: Outcome, request_id: str) -> Completion:
    """A batch's answer as the engine's answers are."""
    reply = _reply_decoder.decode(outcome.message)
    model = reply.model or "unknown"
    return Completion(
        id=request.id, text=_text(reply.content), content=reply.content, model=model, usage=outcome.usage,
        stop_reason=reply.stop_reason, stop_sequence=reply.stop_sequence, latency_ms=0.0, cost_usd=outcome.cost_usd,
        upstream_request_id=outcome.batch, request_id=request_id, served_by=ServedBy("anthropic", model),
        extra=_extra(outcome.message) or msgspec.UNSET,
    )  # fmt: skip


class _Reply(msgspec.Struct):
    """The parts of a batch's message the accounting reads."""

    content: msgspec.Raw = msgspec.Raw(b"[]")
    model: str = ""
    stop_reason: str | None = None
    stop_sequence: str | None = None


class _Text(msgspec.Struct):
    type: str
    text: str = ""


_reply_decoder: Final = msgspec.json.Decoder(_Reply)
_blocks_decoder: Final = msgspec.json.Decoder(list[_Text])


def _text(content: msgspec.Raw) -> str:
    try:
        return "".join(block.text for block in _blocks_decoder.decode(content) if block.type == "text")
    except UNDECODABLE:
        return ""


def _extra(message: msgspec.Raw) -> dict[str, Any] | None:
    """A batch's message's fields sidecard does not model (a container: then the answer is not cached)."""
    try:
        return message_extra(message)
    except UNDECODABLE:
        return None


def _message(completion: Completion) -> msgspec.Raw:
    return msgspec.Raw(_encoder.encode(api_message(completion)))


def _requests(submit: Submit) -> list[Complete]:
    """A submit's requests: its `jobs`, else the frame's own request fields."""
    if submit.jobs is None:
        fields = {f: getattr(submit, f) for f in Complete.__struct_fields__}
        return [Complete(**fields)]
    requests = []
    for index, raw in enumerate(submit.jobs):
        try:
            request = decode_body(bytes(raw))
        except BadFrame as bad:
            raise SidecardError(bad.error.code, f"jobs[{index}]: {bad.error.message}") from None
        requests.append(Complete(**{f: getattr(request, f) for f in Complete.__struct_fields__}))
    return requests

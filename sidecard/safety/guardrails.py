"""Output guardrails: checks on an answer, each with an action, resolved into one decision.

Checks are compiled once, when the config loads. `Guard.check` runs them on a whole answer; `StreamGuard` runs
the ones that can work on a prefix (regex, blocklist, pii, the length ceiling) as deltas arrive, holding back
the last `stream_hold_chars` characters so that a match up to that long is masked or blocked before any of it
is sent, and runs everything again on the whole answer at the end.

Actions, strongest first: `block` (the answer is not delivered), `retry` (ask once more with a corrective
instruction; an answer that still fails after its retry is blocked, and a stream, which cannot be asked again,
is blocked), `redact` (matches are masked and the reply marked), `flag` (logged and counted). A check that
raises becomes a `check_error` finding with the scope's `on_error` action: no check can fail a request by
crashing.

Findings name the check and its kind, never what matched: they are what logs and metrics see.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Sequence
from typing import Final, Literal, NamedTuple

from ..prompts.files import OutputSpec
from ..prompts.output import corrective_instruction, output_problem
from .pii import PiiMatcher
from .settings import (
    BlocklistCheck,
    Check,
    GuardrailScope,
    GuardrailSettings,
    JsonSchemaCheck,
    JudgeCheck,
    LengthCheck,
    PiiCheck,
    RegexCheck,
)

Outcome = Literal["pass", "flag", "redact", "retry", "block"]
_RANK: Final = {"pass": 0, "flag": 1, "redact": 2, "retry": 3, "block": 4}
CHECK_ERROR: Final = "check_error"


class Finding(NamedTuple):
    check: str  # the check's name: safe for logs and metric labels
    kind: str  # regex, blocklist, pii, json_schema, length, judge, or check_error
    action: str
    # Redact: (start, end, mask) in the text checked. Never logged.
    spans: tuple[tuple[int, int, str], ...] = ()
    # What is wrong, for the corrective instruction; it may quote the answer, so it is never logged.
    problem: str = ""


class Decision(NamedTuple):
    outcome: Outcome
    text: str  # the answer as delivered: masked where redacted
    findings: tuple[Finding, ...] = ()
    retry_instruction: str | None = None  # with outcome "retry": appended as a user turn for the second try

    @property
    def rules(self) -> list[str]:
        """`check:action` for each finding, for the log line and the audit record."""
        return [f"{f.check}:{f.action}" for f in self.findings]


# ---------------------------------------------------------------- compiled checks


class _Compiled:
    __slots__ = ("name", "action", "kind")
    finds_text = False  # can run on a prefix of a stream and report spans

    def __init__(self, name: str, action: str, kind: str) -> None:
        self.name = name
        self.action = action
        self.kind = kind

    def run(self, text: str) -> Finding | None:
        spans = tuple(span for span in self.spans(text, 0) if span[2] is not None)
        return self.finding(spans, "") if spans else None  # type: ignore[arg-type]

    def spans(self, text: str, pos: int) -> Iterator[tuple[int, int, str | None]]:
        """Matches as (start, end, mask); a mask of None is a candidate the check looked at and let go, which a
        stream must not cut through (see `StreamGuard`)."""
        return iter(())

    def finding(self, spans: tuple[tuple[int, int, str], ...], problem: str) -> Finding:
        return Finding(self.name, self.kind, self.action, spans if self.action == "redact" else (), problem)

    def corrective(self, finding: Finding) -> str:
        return (f"Your previous answer could not be used: it contained content that is not allowed here ({self.name}). "
                "Answer again without it.")


class _Regex(_Compiled):
    __slots__ = ("pattern", "mask")
    finds_text = True

    def __init__(self, name: str, check: RegexCheck) -> None:
        super().__init__(name, check.action, "regex")
        self.pattern = re.compile(f"(?i:{check.pattern})" if check.ignore_case else check.pattern)
        self.mask = check.mask

    def spans(self, text: str, pos: int) -> Iterator[tuple[int, int, str | None]]:
        for m in self.pattern.finditer(text, pos):
            if m.end() > m.start():
                yield m.start(), m.end(), self.mask


class _Blocklist(_Compiled):
    """Whole words or phrases, any case (the regex engine's case-insensitive matching). On ASCII text a substring
    test for each entry's first word on the case-folded text (memory speed) guards the regex."""

    __slots__ = ("folded", "pattern", "mask")
    finds_text = True

    def __init__(self, name: str, check: BlocklistCheck) -> None:
        super().__init__(name, check.action, "blocklist")
        words = sorted({w.strip() for w in check.words}, key=len, reverse=True)
        self.folded = tuple({w.split()[0].casefold() for w in words})
        alternatives = "|".join(r"\s+".join(map(re.escape, w.split())) for w in words)
        self.pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)
        self.mask = check.mask

    def spans(self, text: str, pos: int) -> Iterator[tuple[int, int, str | None]]:
        tail = text[pos:] if pos else text
        # On ASCII text case folding is exact; elsewhere (say a dotted capital I) the regex alone decides.
        folded = tail.casefold() if tail.isascii() else None
        if folded is None or any(word in folded for word in self.folded):
            for m in self.pattern.finditer(text, pos):
                yield m.start(), m.end(), self.mask


class _Pii(_Compiled):
    __slots__ = ("matcher",)
    finds_text = True

    def __init__(self, name: str, check: PiiCheck) -> None:
        super().__init__(name, check.action, "pii")
        self.matcher = PiiMatcher(check.kinds)

    def spans(self, text: str, pos: int) -> Iterator[tuple[int, int, str | None]]:
        candidates: list[tuple[int, int]] = []
        for span in self.matcher.find(text, pos, candidates):
            yield span.start, span.end, f"[{span.kind}]"
        for start, end in candidates:
            yield start, end, None

    def corrective(self, finding: Finding) -> str:
        return ("Your previous answer could not be used: it contained personal data or a credential. "
                "Answer again without any.")


class _JsonSchema(_Compiled):
    __slots__ = ("spec",)

    def __init__(self, name: str, action: str, spec: OutputSpec | None) -> None:
        super().__init__(name, action, "json_schema")
        self.spec = spec  # None: the request's prompt supplies its declared output (`bind`)

    def bind(self, output: OutputSpec | None) -> _JsonSchema:
        if self.spec is not None or output is None or output.format != "json":
            return self
        return _JsonSchema(self.name, self.action, output)

    def run(self, text: str) -> Finding | None:
        if self.spec is None:
            raise LookupError("no schema: the check names none and the prompt declares no JSON output")
        problem = output_problem(text, self.spec)
        return self.finding((), problem) if problem is not None else None

    def corrective(self, finding: Finding) -> str:
        return corrective_instruction(finding.problem)


class _Length(_Compiled):
    __slots__ = ("min_chars", "max_chars")

    def __init__(self, name: str, check: LengthCheck) -> None:
        super().__init__(name, check.action, "length")
        self.min_chars = check.min_chars
        self.max_chars = check.max_chars

    def run(self, text: str) -> Finding | None:
        if len(text) < self.min_chars:
            return self.finding((), f"it had {len(text)} characters, fewer than {self.min_chars}")
        if self.max_chars is not None and len(text) > self.max_chars:
            return self.finding((), f"it had {len(text)} characters, more than {self.max_chars}")
        return None

    def corrective(self, finding: Finding) -> str:
        return f"Your previous answer could not be used: {finding.problem}. Answer again within that length."


class JudgeTask(NamedTuple):
    """A sampled judge check the caller runs (it is a model call) and hands back as a score."""

    name: str
    action: str
    policy: str
    min_score: float
    route: str | None
    sample_rate: float


def _compile(check: Check, name: str) -> _Compiled | JudgeTask:
    if isinstance(check, RegexCheck):
        return _Regex(name, check)
    if isinstance(check, BlocklistCheck):
        return _Blocklist(name, check)
    if isinstance(check, PiiCheck):
        return _Pii(name, check)
    if isinstance(check, JsonSchemaCheck):
        return _JsonSchema(name, check.action, OutputSpec(format="json", schema=check.schema) if check.schema is not None else None)
    if isinstance(check, LengthCheck):
        return _Length(name, check)
    assert isinstance(check, JudgeCheck)
    return JudgeTask(name, check.action, check.policy, check.min_score, check.route, check.sample_rate)


def check_name(check: Check, index: int) -> str:
    return check.name or f"{type(check).__struct_config__.tag}.{index}"


class CompiledScope(NamedTuple):
    settings: GuardrailScope
    checks: tuple[_Compiled, ...]
    judges: tuple[JudgeTask, ...]


def compile_scope(scope: GuardrailScope) -> CompiledScope:
    """Raises ValueError for a check that cannot compile (the settings already refuse those at load)."""
    compiled = [_compile(check, check_name(check, i)) for i, check in enumerate(scope.checks)]
    return CompiledScope(scope, tuple(c for c in compiled if isinstance(c, _Compiled)),
                         tuple(c for c in compiled if isinstance(c, JudgeTask)))


# ---------------------------------------------------------------- one answer


class Guard:
    """The checks that apply to one request: its prompt's, feature's and route's, in that order."""

    __slots__ = ("checks", "judges", "on_block", "on_error", "stream_hold_chars", "streamed", "max_chars")

    def __init__(self, scopes: Sequence[CompiledScope], output: OutputSpec | None = None) -> None:
        self.checks = tuple(c.bind(output) if isinstance(c, _JsonSchema) else c for s in scopes for c in s.checks)
        self.judges = tuple(j for s in scopes for j in s.judges)
        self.on_block = scopes[0].settings.on_block if scopes else "error"
        self.on_error = "block" if any(s.settings.on_error == "block" for s in scopes) else "flag"
        self.stream_hold_chars = max((s.settings.stream_hold_chars for s in scopes), default=0)
        # On a stream: text checks that block or redact run on deltas; a length ceiling that blocks stops early.
        self.streamed = tuple(c for c in self.checks if c.finds_text and c.action in ("block", "redact"))
        self.max_chars = min(((c.max_chars, c) for c in self.checks if isinstance(c, _Length) and c.action == "block"
                              and c.max_chars is not None), default=None, key=lambda pair: pair[0])

    def sample_judges(self, rng: random.Random) -> list[JudgeTask]:
        """The judge checks to run on this answer (each sampled at its own rate)."""
        return [task for task in self.judges if rng.random() < task.sample_rate]

    def check(self, text: str, *, retried: bool = False, judged: Sequence[Finding] = ()) -> Decision:
        """All checks on a whole answer, plus the findings of judge runs (`judge_finding`).

        `retried`: this answer is the corrective retry, so a check that asks for another retry blocks instead.
        """
        findings = [f for f in (self._run(c, text) for c in self.checks) if f is not None]
        findings.extend(judged)
        return self.decide(text, findings, retried=retried)

    def _run(self, check: _Compiled, text: str) -> Finding | None:
        try:
            return check.run(text)
        except Exception as exc:  # a check is never allowed to fail the request; the error is the finding
            return self.error_finding(check.name, exc)

    def error_finding(self, name: str, exc: BaseException | None) -> Finding:
        return Finding(name, CHECK_ERROR, self.on_error, (), type(exc).__name__ if exc else "no result")

    def decide(self, text: str, findings: Sequence[Finding], *, retried: bool) -> Decision:
        if not findings:
            return Decision("pass", text)
        if retried:
            findings = [f._replace(action="block") if f.action == "retry" else f for f in findings]
        outcome = strongest(findings)
        if outcome == "redact":
            text = apply_masks(text, [s for f in findings for s in f.spans])
        instruction = None
        if outcome == "retry":
            first = next(f for f in findings if f.action == "retry")
            check = next((c for c in self.checks if c.name == first.check), None)
            instruction = check.corrective(first) if check is not None else (
                "Your previous answer could not be used: it did not follow this policy. Answer again, following it.")
        return Decision(outcome, text, tuple(findings), instruction)

    def judge_finding(self, task: JudgeTask, score: float | None) -> Finding | None:
        """The judge's verdict as a finding: a score below `min_score` fails; None (the judge call failed or
        its reply did not parse) is a `check_error`."""
        if score is None:
            return self.error_finding(task.name, None)
        if score < task.min_score:
            return Finding(task.name, "judge", task.action, (), f"the judge scored it {score:.2f} against the policy")
        return None

    def stream(self) -> StreamGuard:
        return StreamGuard(self)


def strongest(findings: Sequence[Finding]) -> Outcome:
    return max((f.action for f in findings), key=_RANK.__getitem__, default="pass")  # type: ignore[return-value]


def apply_masks(text: str, spans: Sequence[tuple[int, int, str]]) -> str:
    """`text` with each span replaced by its mask; overlapping spans merge under the first one's mask."""
    out: list[str] = []
    cursor = 0
    for start, end, mask in merge_spans(spans):
        out.append(text[cursor:start])
        out.append(mask)
        cursor = end
    out.append(text[cursor:])
    return "".join(out)


def merge_spans(spans: Sequence[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    merged: list[tuple[int, int, str]] = []
    for start, end, mask in sorted(spans, key=lambda s: (s[0], -s[1])):
        if merged and start < merged[-1][1]:
            last = merged[-1]
            merged[-1] = (last[0], max(last[1], end), last[2])
        else:
            merged.append((start, end, mask))
    return merged


# ---------------------------------------------------------------- streams


class StreamStep(NamedTuple):
    text: str  # what the client may be sent now (masked)
    blocked: Decision | None = None  # set when a blocking check fired: end the stream with a typed partial error


_CONTEXT: Final = 32  # released characters kept for lookbehinds and word boundaries


class StreamGuard:
    """Sans-I/O: text deltas in, the text the client may have (and whether to stop) out.

    The last `hold` characters are held back, and nothing is released until a scan has seen it with `hold`
    characters after it, so every match of at most `hold` characters is whole when it is found: a blocking
    one stops the stream before any of it is sent, a redacting one is masked. What is released does not
    depend on how the answer was cut into deltas. Scans run once `step` new characters have arrived, so each
    character is scanned about (hold + step) / step times.
    """

    __slots__ = ("guard", "hold", "step", "_parts", "_pending", "_context", "_base", "_masked_spans",
                 "_total", "_unscanned", "_blocked", "_sent")

    def __init__(self, guard: Guard, *, step: int | None = None) -> None:
        self.guard = guard
        self.hold = guard.stream_hold_chars
        self.step = step if step is not None else max(1, self.hold // 2)
        self._parts: list[str] = []  # the raw answer
        self._pending = ""  # raw text not yet released
        self._context = ""  # the last released raw characters
        self._base = 0  # raw offset of _pending[0]
        self._masked_spans: list[tuple[int, int]] = []  # raw spans masked in what was sent
        self._total = 0
        self._unscanned = 0
        self._blocked: Decision | None = None
        self._sent: list[str] = []  # what the client was sent

    def feed(self, piece: str) -> StreamStep:
        if self._blocked is not None or not piece:
            return StreamStep("", self._blocked)
        self._parts.append(piece)
        self._pending += piece
        self._total += len(piece)
        self._unscanned += len(piece)
        if self.guard.max_chars is not None and self._total > self.guard.max_chars[0]:
            limit, check = self.guard.max_chars
            return self._block([check.finding((), f"it had more than {limit} characters")])
        if not self.guard.streamed:
            return self._release(len(self._pending), [])
        if self._unscanned < self.step:
            return StreamStep("")
        return self._scan(final=False)

    def finish(self, judged: Sequence[Finding] = ()) -> tuple[str, Decision]:
        """The rest of the text to send, and the decision on the whole answer: every check again on the raw
        text, plus judge findings. A stream cannot be asked again, so `retry` blocks; so does a redaction
        that could not be applied before sending (a match longer than the hold): the client must not be told
        the answer was fine."""
        if self._blocked is not None:
            return "", self._blocked
        step = self._scan(final=True) if self.guard.streamed else self._release(len(self._pending), [])
        if step.blocked is not None:
            return "", step.blocked
        decision = self.guard.check("".join(self._parts), retried=True, judged=judged)
        findings = tuple(f._replace(action="block", spans=()) if f.action == "redact" and not self._all_masked(f)
                         else f for f in decision.findings)
        return step.text, Decision(strongest(findings), "".join(self._sent), findings)

    def _all_masked(self, finding: Finding) -> bool:
        return all(any(s <= start and end <= e for s, e in self._masked_spans) for start, end, _ in finding.spans)

    def _scan(self, *, final: bool) -> StreamStep:
        self._unscanned = 0
        buffer = self._context + self._pending
        offset = len(self._context)
        spans: list[tuple[int, int, str]] = []
        blocking: list[Finding] = []
        whole: list[tuple[int, int]] = []  # regions not to cut through: every match and candidate
        for check in self.guard.streamed:
            try:
                found = [(s - offset, e - offset, m) for s, e, m in check.spans(buffer, offset)]
            except Exception as exc:  # as in Guard.check: the error is a finding, and only blocks if so configured
                if self.guard.on_error == "block":
                    blocking.append(self.guard.error_finding(check.name, exc))
                continue
            whole.extend((s, e) for s, e, _ in found)
            masked = [(s, e, m) for s, e, m in found if m is not None]
            if masked and check.action == "block":
                blocking.append(check.finding((), ""))
            else:
                spans.extend(masked)
        if blocking:
            return self._block(blocking)
        cut = len(self._pending) if final else len(self._pending) - self.hold
        merged = merge_spans(spans)
        for start, end in sorted(whole):
            if start < cut < end:
                cut = end  # a match straddling the cut goes out whole (masked if it is to be)
        return self._release(cut, [span for span in merged if span[1] <= cut])

    def _release(self, cut: int, spans: list[tuple[int, int, str]]) -> StreamStep:
        if cut <= 0:
            return StreamStep("")
        released = self._pending[:cut]
        text = apply_masks(released, spans)
        self._masked_spans.extend((self._base + s, self._base + e) for s, e, _ in spans)
        self._context = (self._context + released)[-_CONTEXT:]
        self._pending = self._pending[cut:]
        self._base += cut
        self._sent.append(text)
        return StreamStep(text)

    def _block(self, findings: list[Finding]) -> StreamStep:
        self._blocked = Decision("block", "".join(self._sent), tuple(findings))
        return StreamStep("", self._blocked)


# ---------------------------------------------------------------- per request


class Guardrails:
    """Every configured scope, compiled once at load; `for_request` picks the ones a request falls under."""

    def __init__(self, settings: GuardrailSettings) -> None:
        self._tables = tuple({name: compile_scope(scope) for name, scope in table.items() if scope.checks}
                             for table in (settings.prompts, settings.features, settings.routes))

    def for_request(self, *, prompt: str | None, feature: str | None, route: str | None,
                    output: OutputSpec | None = None) -> Guard | None:
        scopes = [scope for table, key in zip(self._tables, (prompt, feature, route), strict=True)
                  if key is not None and (scope := table.get(key)) is not None]
        return Guard(scopes, output) if scopes else None

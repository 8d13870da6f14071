"""PASS/FAIL lines for ``benchmarks/gpu_checks.sh``: one per target, each with its measure.

Every line has one shape, so that a log can be read by eye and parsed by a test (the
values below only illustrate the format)::

    PASS class-time arcface_triton class B=1024 D=512 C=100000 bf16 fwd+bwd: 1.31x <= 1.5x (...)
    FAIL cuda-tests tests/gpu/test_gpu.py: 2 failures > 0 failures (310 passed, 2 failed)
    SKIP memcheck compute-sanitizer: - ? 0 errors (compute-sanitizer not found)

``STATUS TARGET SUBJECT: MEASURE OP LIMIT (DETAIL)``: OP is ``<=`` when the measure meets
the limit, ``>`` when it does not, ``?`` when nothing was measured. SKIP means *not
verified* (a tool is missing): it is never a pass. The speed and memory targets are in
:mod:`.targets`; this module holds the line format, the verdicts of the script's other
steps (CUDA tests, compute-sanitizer, kernel self-check, wall time) and the summary.

It imports no torch, so each verdict costs the script milliseconds::

    python -m speed_bench.checks pytest LOG RC
    python -m speed_bench.checks memcheck LOG RC [--no-sanitizer]
    python -m speed_bench.checks selfcheck LOG RC
    python -m speed_bench.checks targets LOG RC      # the lines speed.py --check printed
    python -m speed_bench.checks exit NAME LOG RC    # a step without targets of its own
    python -m speed_bench.checks elapsed SECONDS LIMIT
    python -m speed_bench.checks summary FILE...     # exit status: the number of FAILs
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence

STATUSES = ("PASS", "FAIL", "SKIP")
LINE_RE = re.compile(
    r"^(?P<status>PASS|FAIL|SKIP) (?P<target>\S+) (?P<subject>.+?): (?P<measure>\S+(?: \S+)?)"
    r" (?P<op><=|>|\?) (?P<limit>\S+(?: \S+)?) \((?P<detail>.*)\)$"
)


@dataclass
class Outcome:
    """One target's verdict. ``measure`` None: nothing was measured (FAIL or SKIP)."""

    status: str
    target: str
    subject: str
    measure: Optional[float]
    limit: float
    unit: str = "x"
    detail: str = ""

    def line(self) -> str:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")
        limit = _num(self.limit, self.unit)
        if self.measure is None:
            measure, op = "-", "?"
        else:
            measure = _num(self.measure, self.unit)
            op = "<=" if self.measure <= self.limit else ">"
        return f"{self.status} {self.target} {self.subject}: {measure} {op} {limit} ({self.detail})"

    def as_dict(self) -> dict:
        return {**self.__dict__, "line": self.line()}


def _num(value: float, unit: str) -> str:
    text = f"{value:.3g}" if isinstance(value, float) and not value.is_integer() else f"{value:g}"
    return f"{text}x" if unit == "x" else f"{text} {unit}"


def judge(target: str, subject: str, measure, limit, unit="x", detail="") -> Outcome:
    """PASS when ``measure <= limit``, FAIL otherwise or when nothing was measured."""
    status = "PASS" if measure is not None and measure <= limit else "FAIL"
    return Outcome(status, target, subject, measure, limit, unit, detail)


def parse_line(line: str) -> Optional[dict]:
    """The fields of a PASS/FAIL/SKIP line, or None for any other line."""
    m = LINE_RE.match(line.rstrip("\n"))
    return m.groupdict() if m else None


def parse_lines(text: str) -> List[dict]:
    return [p for p in map(parse_line, text.splitlines()) if p is not None]


# ----------------------------------------------------------------- the script's steps

_COUNT_RE = re.compile(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)")


def pytest_counts(log: str) -> dict:
    """Counts from pytest's final summary line ("3 passed, 1 skipped in 2.1s")."""
    summary = [ln for ln in log.splitlines() if re.search(r"\bin \d+(\.\d+)?s\b", ln)]
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    for n, word in _COUNT_RE.findall(summary[-1] if summary else ""):
        word = "error" if word.startswith("error") else word
        counts[word] = counts.get(word, 0) + int(n)
    return counts


def _counts_text(c: dict) -> str:
    parts = [f"{c[k]} {k}" for k in ("passed", "failed", "error", "skipped") if c.get(k)]
    return ", ".join(parts) or "no summary line"


def pytest_outcome(log: str, rc: int, target: str = "cuda-tests", subject="pytest") -> Outcome:
    """PASS when pytest exited 0 with at least one test passed and none failed: a run in
    which every test skipped (no CUDA device) verified nothing."""
    c = pytest_counts(log)
    bad = c["failed"] + c["error"]
    detail = f"{_counts_text(c)}; exit status {rc}"
    if rc == 0 and bad == 0 and c["passed"] == 0:
        return Outcome("FAIL", target, subject, None, 0, "failures", "no test ran: " + detail)
    if rc != 0 and bad == 0:
        return Outcome("FAIL", target, subject, None, 0, "failures", detail)
    return judge(target, subject, bad, 0, "failures", detail)


_SANITIZER_RE = re.compile(r"ERROR SUMMARY: (\d+) errors?")


def memcheck_outcome(log: str, rc: int, sanitizer: bool = True) -> Outcome:
    """compute-sanitizer's memcheck over the kernel tests: its error summary must say 0 and
    the tests must pass. Without the tool the tests still run (so the selection stays
    valid), but the target is SKIP: not verified."""
    tests = pytest_outcome(log, rc, "memcheck", "compute-sanitizer")
    if not sanitizer:
        why = "compute-sanitizer not found; tests ran without it: " + tests.detail
        return Outcome("SKIP", "memcheck", "compute-sanitizer", None, 0, "errors", why)
    found = [int(n) for n in _SANITIZER_RE.findall(log)]
    if not found:
        return Outcome(
            "FAIL",
            "memcheck",
            "compute-sanitizer",
            None,
            0,
            "errors",
            "no ERROR SUMMARY; " + tests.detail,
        )
    out = judge("memcheck", "compute-sanitizer", sum(found), 0, "errors", tests.detail)
    if tests.status != "PASS":
        out.status = "FAIL"
    return out


def selfcheck_outcome(log: str, rc: int) -> Outcome:
    """``benchmarks/selfcheck.py`` prints one ``SELF-CHECK ...`` line per kernel family and
    exits non-zero on a failure."""
    lines = [ln for ln in log.splitlines() if ln.startswith("SELF-CHECK")]
    failed = [ln for ln in lines if re.search(r"\bFAIL", ln)]
    detail = f"{len(lines)} SELF-CHECK lines, exit status {rc}"
    if not lines:
        return Outcome("FAIL", "selfcheck", "benchmarks/selfcheck.py", None, 0, "failures",
                       "printed no SELF-CHECK line; exit status " + str(rc))  # fmt: skip
    out = judge("selfcheck", "benchmarks/selfcheck.py", len(failed), 0, "failures", detail)
    if rc != 0:
        out.status = "FAIL"
    return out


def target_lines(log: str, rc: int) -> List[str]:
    """The PASS/FAIL lines ``speed.py --check`` printed, plus a FAIL line when its exit
    status does not match them (a crash: some targets were never judged)."""
    lines = [ln for ln in log.splitlines() if parse_line(ln) is not None]
    fails = sum(parse_line(ln)["status"] == "FAIL" for ln in lines)
    if not lines or rc != min(fails, 100):
        tail = " | ".join(log.strip().splitlines()[-2:])[-300:]
        why = "printed no target line" if not lines else f"{fails} FAIL lines"
        lines.append(
            Outcome("FAIL", "speed-targets", "benchmarks/speed.py", None, 0, "exit",
                    f"exit status {rc}, {why}: {tail}").line()
        )  # fmt: skip
    return lines


def exit_outcome(name: str, log_path: str, rc: int) -> Outcome:
    return judge("step", name, rc, 0, "exit", f"log {log_path}")


def elapsed_outcome(seconds: float, limit: float, subject="gpu_checks.sh") -> Outcome:
    return judge("wall-time", subject, float(seconds), float(limit), "s", "compile included")


def summary(lines: Iterable[str]) -> tuple:
    """(text, number of FAILs) over every PASS/FAIL/SKIP line in ``lines``."""
    parsed = [p for p in map(parse_line, lines) if p is not None]
    n = {s: sum(p["status"] == s for p in parsed) for s in STATUSES}
    text = f"targets: {n['PASS']} PASS, {n['FAIL']} FAIL, {n['SKIP']} SKIP (not verified)"
    if not parsed:
        text += "; no target line was printed"
    return text, n["FAIL"] + (0 if parsed else 1)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    for name in ("pytest", "memcheck", "selfcheck"):
        s = sub.add_parser(name)
        s.add_argument("log")
        s.add_argument("rc", type=int)
        if name == "memcheck":
            s.add_argument("--no-sanitizer", action="store_true")
        if name == "pytest":
            s.add_argument("--subject", default="pytest")
    s = sub.add_parser("targets")
    s.add_argument("log")
    s.add_argument("rc", type=int)
    s = sub.add_parser("exit")
    s.add_argument("name")
    s.add_argument("log")
    s.add_argument("rc", type=int)
    s = sub.add_parser("elapsed")
    s.add_argument("seconds", type=float)
    s.add_argument("limit", type=float)
    s = sub.add_parser("summary")
    s.add_argument("files", nargs="+")
    args = p.parse_args(argv)

    def text(path):
        try:
            with open(path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    if args.what == "summary":
        lines = [ln for path in args.files for ln in text(path).splitlines()]
        out, failed = summary(lines)
        print(out)
        return min(failed, 100)
    if args.what == "targets":
        print("\n".join(target_lines(text(args.log), args.rc)))
        return 0
    if args.what == "exit":
        outcome = exit_outcome(args.name, args.log, args.rc)
    elif args.what == "pytest":
        outcome = pytest_outcome(text(args.log), args.rc, subject=args.subject)
    elif args.what == "memcheck":
        outcome = memcheck_outcome(text(args.log), args.rc, not args.no_sanitizer)
    elif args.what == "selfcheck":
        outcome = selfcheck_outcome(text(args.log), args.rc)
    else:
        outcome = elapsed_outcome(args.seconds, args.limit)
    print(outcome.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())

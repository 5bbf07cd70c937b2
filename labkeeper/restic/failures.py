"""What a failed restic run means: its exit codes, refined by its stderr, and its
backend-retry notes for the run log.

Older restic exits 1 for most fatal errors where newer ones have their own exit
codes; :func:`classify_failure` reads stderr to tell the same cases apart, so every
version maps onto the same typed meaning, and uses the JSON ``exit_error`` line's
message where restic prints one. Which version does what: ``benchmarks/README.md``
(tool versions).
"""

from __future__ import annotations

import json
import re

from labkeeper.errors import CommandError
from labkeeper.process import ExitCode, ExitCodeTable
from labkeeper.secrets import REDACTOR

LOCK_FAILED = "failed to lock repository"

# https://restic.readthedocs.io/en/stable/075_scripting.html#exit-codes
EXIT_CODES = ExitCodeTable("restic", {
    0: ExitCode("success", "ok"),
    1: ExitCode("fatal error", "permanent"),
    3: ExitCode("some source data could not be read (snapshot incomplete)", "warning"),
    10: ExitCode("repository does not exist", "permanent"),
    11: ExitCode(LOCK_FAILED, "transient"),
    12: ExitCode("wrong password", "permanent"),
    130: ExitCode("interrupted", "transient"),
})

# restic < 0.17 exits 1 for these; recognise them by their message.
_STDERR_MEANINGS: tuple[tuple[re.Pattern[str], str, bool], ...] = (
    (re.compile(r"wrong password or no key found"), "wrong password", False),
    (re.compile(r"unable to open config file|Is there a repository at the following location"),
     "repository does not exist", False),
    (re.compile(r"unable to create lock|repository is already locked"), LOCK_FAILED, True),
    (re.compile(r"connection refused|connection reset|i/o timeout|TLS handshake timeout|"
                r"no such host|503 Service Unavailable|500 Internal Server Error"),
     "repository backend unreachable", True),
)


def exit_error_message(stderr: str) -> str | None:
    """The message of restic's JSON ``exit_error`` line (restic >= 0.17 with
    ``--json``: ``{"message_type":"exit_error","code":10,"message":"..."}``), or None."""
    for line in reversed(stderr.splitlines()):
        line = line.strip()
        if not (line.startswith("{") and "exit_error" in line):
            continue
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict) and data.get("message_type") == "exit_error":
            return str(data.get("message", ""))
    return None


def _meaning_from_stderr(text: str) -> tuple[str, bool] | None:
    for pattern, meaning, transient in _STDERR_MEANINGS:
        if pattern.search(text):
            return meaning, transient
    return None


def classify_failure(err: CommandError) -> CommandError:
    """Refine a restic CommandError: the meaning of an exit 1 from its stderr (0.14
    exits 1 where 0.17+ exits 10/11/12), the message from restic's JSON
    ``exit_error`` line when there is one (0.17+ with ``--json``)."""
    if not err.returncode or err.returncode < 0:
        return err
    said = exit_error_message(err.stderr_tail)
    found = _meaning_from_stderr(said if said is not None else err.stderr_tail) \
        if err.returncode == 1 else None
    if found is None and said is None:
        return err
    meaning, transient = found or (err.meaning, err.transient)
    if said is not None:
        last = " | ".join(ln.strip() for ln in said.splitlines() if ln.strip())[:400]
    else:
        last = err.stderr_tail.splitlines()[-1] if err.stderr_tail else ""
    message = f"restic: {meaning}"
    if last:
        message += f": {last}"
    return CommandError(message, argv=err.argv, returncode=err.returncode,
                        stderr_tail=err.stderr_tail, meaning=meaning, transient=transient)




_BACKEND_RETRY_RE = re.compile(
    r"^(?P<call>\S.*?) returned error, retrying after (?P<after>\S+?): (?P<error>.*)$")
_BACKEND_FAILED_RE = re.compile(
    r"^(?P<call>[A-Z][A-Za-z]*\(<[a-z]+/[0-9a-f]+>.*?\)) failed: (?P<error>.*)$")


def backend_retry(line: str) -> str | None:
    """restic's stderr note that a repository backend call failed, as one short line
    for the run log; None for any other line. A run slowed down by a backend call
    restic retries (a lock file gone for good, ``benchmarks/README.md``) names its
    cause with these."""
    line = line.strip()
    m = _BACKEND_RETRY_RE.match(line)
    if m is not None:
        return (f"restic is retrying {m['call']} after {m['after']}: "
                f"{REDACTOR.redact(m['error'])[:200]}")
    m = _BACKEND_FAILED_RE.match(line)
    if m is not None:
        return f"restic could not {m['call']}: {REDACTOR.redact(m['error'])[:200]}"
    return None


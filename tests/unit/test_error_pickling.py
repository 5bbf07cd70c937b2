"""Errors cross process boundaries (Prefect results, subprocess workers): every
labkeeper error survives a pickle round trip with its message, fields and
transient flag, whatever its constructor looks like."""

from __future__ import annotations

import pickle

import pytest

from labkeeper import errors
from labkeeper.drill import DrillFailed, DrillResult
from labkeeper.errors import (
    CommandError,
    CommandNotFound,
    CommandTimeout,
    ConfigError,
    HostKeyError,
    LabkeeperError,
    PermanentError,
    PicklableError,
    PipelineError,
    SecretError,
    ServiceError,
    SSHAuthError,
    SSHConnectError,
    SSHError,
    TaskTimeout,
    TransientError,
)
from labkeeper.path_backup import AttemptStillRunning, PathBackupFailed, ResticMissing
from labkeeper.pg_backup import BackupFailed
from labkeeper.process import CommandResult
from labkeeper.restic import StreamFailed

_CMD = CommandError("pg_dump failed", argv=("pg_dump", "-d", "app"), returncode=1,
                    stderr_tail="FATAL: no", meaning="fatal error", transient=False)

EXAMPLES: list[LabkeeperError] = [
    LabkeeperError("plain", transient=True),
    TransientError("try again"),
    PermanentError("give up"),
    ConfigError("bad inventory", ["line 3: nope", "line 9: nope"]),
    SecretError("cannot resolve", "env:PVE_TOKEN"),
    _CMD,
    CommandTimeout("too slow", argv=("restic", "backup"), timeout=12.5, stderr_tail="..."),
    CommandNotFound("no such program", argv=("nosuch",)),
    PipelineError("pipeline failed", failures=[_CMD], first=_CMD),
    SSHError("ssh trouble"),
    SSHConnectError("refused"),
    SSHAuthError("key refused"),
    HostKeyError("unknown key", host="nas", fingerprint="SHA256:abc"),
    ServiceError("HTTP 503", service="proxmox", status=503, transient=True),
    TaskTimeout("UPID still running"),
    StreamFailed("restic stalled", transient=True, cause="stall", eof_given=False,
                 bytes_relayed=4096, locked=True),
    ResticMissing("restic is not installed on nas", host="nas"),
    PathBackupFailed("backup of photos@nas failed", transient=True, path_set="photos@nas",
                     backup_id="20260101T020000Z-1a2b3c"),
    AttemptStillRunning("pid 42 survived SIGKILL"),
    BackupFailed("backup of appdb failed", transient=True, database="appdb",
                 backup_id="20260101T020000Z-4d5e6f"),
    DrillFailed(DrillResult(kind="database", target="appdb", error="restore failed",
                            transient=True, notes=["scratch dropped"])),
]


def _fields(exc: BaseException) -> dict[str, object]:
    return {k: (_fields(v) if isinstance(v, BaseException) else
                [_fields(x) if isinstance(x, BaseException) else x for x in v]
                if isinstance(v, list) else v)
            for k, v in vars(exc).items()}


@pytest.mark.parametrize("exc", EXAMPLES, ids=lambda e: type(e).__name__)
def test_error_round_trips_through_pickle_with_message_fields_and_transient(exc):
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc)
    assert str(back) == str(exc) and back.message == exc.message
    assert back.args == exc.args
    assert back.transient is exc.transient
    assert _fields(back) == _fields(exc)


def test_every_error_class_of_the_errors_module_has_a_pickle_example():
    defined = {obj for obj in vars(errors).values()
               if isinstance(obj, type) and issubclass(obj, LabkeeperError)}
    assert defined <= {type(e) for e in EXAMPLES}


def test_stream_failed_pickles_without_its_command_results():
    result = CommandResult(argv=("pg_dump",), returncode=1, stdout="", stderr="boom",
                           duration=0.1)
    exc = StreamFailed("pg_dump failed", transient=False, cause="producer",
                       producer=result, consumer=result, bytes_relayed=10)
    back = pickle.loads(pickle.dumps(exc))
    assert back.producer is None and back.consumer is None
    assert (back.cause, back.bytes_relayed, back.eof_given, back.locked,
            back.transient) == ("producer", 10, False, False, False)


def test_a_redacted_message_is_pickled_as_redacted():
    exc = BackupFailed("failed: postgresql://app:hunter2@db/app", database="app")
    assert "hunter2" not in exc.message
    assert b"hunter2" not in pickle.dumps(exc)


class _KeywordOnly(PicklableError):
    """An error outside labkeeper's hierarchy with a keyword-only field."""

    def __init__(self, message: str, *, rows: list[int]) -> None:
        super().__init__(message)
        self.rows = rows


def test_an_error_with_keyword_only_fields_needs_no_reduce_of_its_own():
    back = pickle.loads(pickle.dumps(_KeywordOnly("two rows", rows=[1, 2])))
    assert type(back) is _KeywordOnly
    assert str(back) == "two rows" and back.args == ("two rows",) and back.rows == [1, 2]


def test_run_failures_of_flows_pickle_with_their_rows_and_report():
    from flows.provision import ProvisionFailed
    from tasks.common import RunFailed

    rows = [{"database": "appdb", "status": "failed"}]
    run = pickle.loads(pickle.dumps(RunFailed("1 of 2 backups failed", rows)))
    assert (str(run), run.rows) == ("1 of 2 backups failed", rows)
    prov = pickle.loads(pickle.dumps(ProvisionFailed("web1 failed", {"steps": [1]})))
    assert (str(prov), prov.report) == ("web1 failed", {"steps": [1]})

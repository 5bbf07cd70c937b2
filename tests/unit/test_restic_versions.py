"""restic 0.14 vs 0.18, the pure parts: versions and features, ids, JSON exit errors,
backend notes, ``--retry-lock`` argv (stderr texts as the real binaries print them)."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from labkeeper import restic
from labkeeper.errors import CommandError

FULL = "e5c036586529b501bdb50dfa325fdcb6a980037b1aacda3a526fb64e17ed5602"


def _err(returncode: int, stderr: str, meaning: str = "fatal error",
         transient: bool = False) -> CommandError:
    return CommandError(f"restic failed (exit {returncode})", argv=("restic",),
                        returncode=returncode, stderr_tail=stderr, meaning=meaning,
                        transient=transient)


def test_versions_parse_and_order_and_say_what_they_offer():
    old = restic.ResticVersion.parse("restic 0.14.0 compiled with go1.19.8 on linux/amd64\n")
    new = restic.ResticVersion.parse("restic 0.18.0 compiled with go1.24.4 on linux/amd64")
    assert (str(old), str(new)) == ("0.14.0", "0.18.0") and old < new
    assert not (old.retry_lock or old.exit_codes or old.stdin_from_command)
    assert new.retry_lock and new.exit_codes and new.stdin_from_command
    assert restic.ResticVersion(0, 16, 4).retry_lock
    assert not restic.ResticVersion(0, 16, 4).exit_codes
    with pytest.raises(ValueError):
        restic.ResticVersion.parse("rustic 0.9.0")


def test_full_ids_compare_equal_and_a_short_id_matches_only_its_full_id():
    assert restic.is_full_id(FULL) and not restic.is_full_id(FULL[:8])
    assert restic.same_id(FULL, FULL)
    assert restic.same_id(FULL[:8], FULL) and restic.same_id(FULL, FULL[:8])
    assert not restic.same_id("a9f09d37", FULL)
    assert not restic.same_id("", FULL) and not restic.same_id("latest", FULL)
    assert restic.short_id(FULL) == "e5c03658"


def test_exit_error_json_of_restic_018_gives_the_meaning_and_a_readable_message():
    # restic 0.18 with --json, a lock file listed but gone (exit 1, after 35 s)
    ghost = ('Load(<lock/1111111111>, 0, 0) failed: open r/locks/1111: no such file or '
             'directory\n{"message_type":"exit_error","code":1,"message":"unable to create '
             'lock in backend: open r/locks/1111: no such file or directory"}')
    err = restic.classify_failure(_err(1, ghost))
    assert err.meaning == restic.LOCK_FAILED and err.transient
    assert str(err) == ("restic: failed to lock repository: unable to create lock in "
                        "backend: open r/locks/1111: no such file or directory")
    missing = ('{"message_type":"exit_error","code":10,"message":"Fatal: repository does not '
               'exist: unable to open config file: stat nope/config: no such file or '
               'directory\\nIs there a repository at the following location?\\nnope"}')
    err = restic.classify_failure(_err(10, missing, "repository does not exist"))
    assert err.meaning == "repository does not exist" and not err.transient
    assert "{" not in str(err) and "Is there a repository at the following location? | nope" \
        in str(err)


def test_restic_014_plain_stderr_is_classified_as_before():
    err = restic.classify_failure(_err(1, "Fatal: wrong password or no key found"))
    assert err.meaning == "wrong password" and not err.transient
    assert str(err) == "restic: wrong password: Fatal: wrong password or no key found"
    other = _err(1, "Fatal: something else")
    assert restic.classify_failure(other) is other


def test_backend_notes_come_from_either_versions_stderr_line():
    old = restic.backend_retry("Load(<lock/1111111111>, 0, 0) returned error, retrying after "
                               "552.330144ms: open x: no such file or directory")
    new = restic.backend_retry("Load(<lock/1111111111>, 0, 0) failed: open x: no such file "
                               "or directory")
    assert old == ("restic is retrying Load(<lock/1111111111>, 0, 0) after 552.330144ms: "
                   "open x: no such file or directory")
    assert new == ("restic could not Load(<lock/1111111111>, 0, 0): open x: no such file "
                   "or directory")
    assert restic.backend_retry("Fatal: unable to save snapshot: failed to save /z: x") is None


def test_retry_lock_goes_right_after_the_binary_and_only_when_asked():
    repo = restic.Repo(url="/r", password=SecretStr("x"), binary="/usr/bin/restic")
    argv = restic.prune_argv(repo)
    assert restic.with_retry_lock(argv, 30.0) == ("/usr/bin/restic", "--retry-lock", "30s",
                                                  "prune")
    assert restic.with_retry_lock(argv, None) == argv

"""Secret references: shapes, resolution, redaction."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from labkeeper import secrets
from labkeeper.errors import SecretError
from labkeeper.secrets import MASK, RedactingFilter, SecretRef, resolve


class Holder(BaseModel):
    ref: SecretRef


@pytest.mark.parametrize("ref", ["env:PVE_TOKEN", "file:/run/secrets/restic",
                                 "prefect-block:restic-password"])
def test_well_formed_references_are_accepted(ref):
    assert Holder(ref=ref).ref == ref


@pytest.mark.parametrize("ref", ["hunter2-literal-password", "env:", "env:1BAD", "file:relative/p",
                                 "prefect-block:Bad_Name", "vault:x"])
def test_malformed_references_are_rejected(ref):
    with pytest.raises(ValidationError):
        Holder(ref=ref)


def test_rejection_of_a_pasted_secret_does_not_echo_it():
    pasted = "sup3r-s3cret-pasted-value"
    with pytest.raises(ValidationError) as info:
        Holder(ref=pasted)
    assert pasted not in str(info.value.errors(include_input=False))


def test_env_reference_resolves_and_registers_for_redaction():
    value = resolve("env:LK_T1", environ={"LK_T1": "value-from-env-1"})
    assert value.get_secret_value() == "value-from-env-1"
    assert secrets.redact("x value-from-env-1 y") == f"x {MASK} y"


def test_missing_env_variable_error_names_reference_not_value():
    with pytest.raises(SecretError) as info:
        resolve("env:LK_NOT_SET_ANYWHERE", environ={})
    assert "env:LK_NOT_SET_ANYWHERE" in str(info.value)
    assert info.value.reference == "env:LK_NOT_SET_ANYWHERE"


def test_file_reference_strips_one_trailing_newline(tmp_path: Path):
    f = tmp_path / "pw"
    f.write_text("file-secret-abc\n")
    assert resolve(f"file:{f}").get_secret_value() == "file-secret-abc"


def test_missing_file_is_a_clear_error(tmp_path: Path):
    with pytest.raises(SecretError, match="does not exist"):
        resolve(f"file:{tmp_path}/nope")


def test_empty_and_too_short_secrets_are_refused():
    with pytest.raises(SecretError, match="empty"):
        resolve("env:E", environ={"E": ""})
    with pytest.raises(SecretError, match="shorter"):
        resolve("env:E", environ={"E": "abc"})


def test_logging_filter_masks_values_in_messages_and_args(caplog):
    resolve("env:LK_T2", environ={"LK_T2": "logged-secret-xyz"})
    logger = logging.getLogger("labkeeper.test.redaction")
    logger.addFilter(RedactingFilter())
    with caplog.at_level(logging.INFO, logger="labkeeper.test.redaction"):
        logger.info("token is %s", "logged-secret-xyz")
        logger.info("inline logged-secret-xyz")
    assert "logged-secret-xyz" not in caplog.text
    assert caplog.text.count(MASK) == 2


def test_longer_secret_containing_a_shorter_one_is_masked_whole():
    secrets.register("abcd1234")
    secrets.register("abcd1234-extended")
    assert secrets.redact("abcd1234-extended") == MASK


def test_environment_is_untouched_by_resolution():
    before = dict(os.environ)
    resolve("env:LK_T3", environ={"LK_T3": "some-value-xyz"})
    assert dict(os.environ) == before


def _raise_with(value: str) -> None:
    raise RuntimeError(f"connection failed with key {value}")


def test_traceback_of_a_logged_exception_is_redacted_by_the_record_factory(caplog):
    secrets.install_redaction()
    resolve("env:LK_T4", environ={"LK_T4": "traceback-secret-4321"})
    logger = logging.getLogger("labkeeper.test.tb")
    with caplog.at_level(logging.ERROR, logger="labkeeper.test.tb"):
        try:
            _raise_with("traceback-secret-4321")
        except RuntimeError:
            logger.exception("step failed")
    assert "traceback-secret-4321" not in caplog.text
    assert f"connection failed with key {MASK}" in caplog.text
    assert "Traceback (most recent call last)" in caplog.text  # the traceback is kept


def test_logging_filter_redacts_exception_text_too():
    resolve("env:LK_T5", environ={"LK_T5": "filter-tb-secret-8765"})
    try:
        _raise_with("filter-tb-secret-8765")
    except RuntimeError:
        import sys

        record = logging.LogRecord("labkeeper.x", logging.ERROR, __file__, 1, "boom", None,
                                   sys.exc_info())
    RedactingFilter().filter(record)
    text = logging.Formatter().format(record)
    assert "filter-tb-secret-8765" not in text and MASK in text


@pytest.mark.parametrize(("text", "shown"), [
    ("cloning https://deploy:glpat-77aa@git.example.org/lab/app.git",
     f"cloning https://deploy:{MASK}@git.example.org/lab/app.git"),
    ("https://ghp_0123456789abcdef@github.com/me/app", f"https://{MASK}@github.com/me/app"),
    ("ssh://git@git.example.org/lab/app.git", "ssh://git@git.example.org/lab/app.git"),
    ("git@github.com:me/app.git", "git@github.com:me/app.git"),
])
def test_credentials_inside_urls_are_masked_without_being_resolved(text, shown):
    assert secrets.redact(text) == shown


def test_git_url_credentials_do_not_reach_a_log_record(caplog):
    secrets.install_redaction()
    logger = logging.getLogger("labkeeper.test.giturl")
    with caplog.at_level(logging.INFO, logger="labkeeper.test.giturl"):
        logger.info("compose git %s", "https://bot:tok-998877@git.example.org/app.git")
    assert "tok-998877" not in caplog.text and "bot:" in caplog.text

"""Pure parts of the file backup: argv, environment, restic --json messages, progress,
version check, remote process matching, selection and retention series."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import SecretStr

from labkeeper import path_backup as pb_mod
from labkeeper.inventory import PathBackup, load_inventory
from labkeeper.process import CommandResult
from labkeeper.restic import Repo
from labkeeper.secrets import register
from labkeeper.ssh import ENV_PREAMBLE

EXAMPLE = Path(__file__).resolve().parents[2] / "lab.example.yaml"
PASSWORD = "pw-Secret-123"
REPO = Repo(url="s3:http://127.0.0.1:9000/bkt/restic", password=SecretStr(PASSWORD),
            aws_access_key_id=SecretStr("AKIDX"), aws_secret_access_key=SecretStr("s3cr3t"),
            cache_dir="/var/cache/controller")

# Real restic 0.14 output (error line shortened): stdout status/summary, stderr errors.
STATUS = ('{"message_type":"status","seconds_elapsed":3,"seconds_remaining":7,'
          '"percent_done":0.3,"total_files":10,"files_done":3,"total_bytes":10485760,'
          '"bytes_done":3145728,"current_files":["/a"]}')
SUMMARY = ('{"message_type":"summary","files_new":2,"files_changed":0,"files_unmodified":0,'
           '"dirs_new":22,"dirs_changed":0,"dirs_unmodified":0,"data_blobs":0,'
           '"tree_blobs":23,"data_added":12363,"total_files_processed":2,'
           '"total_bytes_processed":10,"total_duration":0.219276549,"snapshot_id":"643c4369"}')
ERROR_SCAN = ('{"message_type":"error","error":{"Op":"lstat","Path":"/t/deep/d","Err":36},'
              '"during":"scan","item":"/t/deep/d"}')
ERROR_ARCHIVAL = ('{"message_type":"error","error":{"Op":"lstat","Path":"t/deep/d","Err":36},'
                  '"during":"archival","item":"/t/deep/d"}')


def _pb(**kw) -> PathBackup:
    return PathBackup.model_validate({"name": "photos", "host": "nas",
                                      "paths": ["/srv/photos", "/srv/-odd"], **kw})


def test_backup_argv_has_json_host_tags_excludes_and_paths_after_double_dash():
    argv = pb_mod.backup_argv(_pb(excludes=["*.tmp"], one_file_system=True), REPO,
                              lab="home", tags=[*pb_mod.series_tags("nas", "photos"), "backup:x"])
    assert argv[:3] == ("restic", "--compression", "auto")
    assert argv[argv.index("backup") + 1] == "--json"
    assert argv[argv.index("--host") + 1] == "home"
    tags = [argv[i + 1] for i, a in enumerate(argv) if a == "--tag"]
    assert tags == ["labkeeper", "paths:nas/photos", "kind:paths", "backup:x"]
    assert ("--exclude", "*.tmp") == argv[argv.index("--exclude"):argv.index("--exclude") + 2]
    assert "--exclude-caches" in argv and "--one-file-system" in argv
    assert argv[-3:] == ("--", "/srv/photos", "/srv/-odd")
    assert not any(s in a for a in argv for s in (PASSWORD, "s3cr3t", "AKIDX"))


def test_backup_argv_refuses_a_tag_restic_would_split():
    with pytest.raises(ValueError):
        pb_mod.backup_argv(_pb(), REPO, lab="home", tags=["a,b"])


def test_remote_env_carries_the_secrets_but_not_the_controllers_cache_dir():
    env = pb_mod.remote_env(REPO, progress_interval=30)
    assert env["RESTIC_PASSWORD"] == PASSWORD and env["AWS_SECRET_ACCESS_KEY"] == "s3cr3t"
    assert env["RESTIC_REPOSITORY"] == REPO.url and "RESTIC_CACHE_DIR" not in env
    assert env["RESTIC_PROGRESS_FPS"] == "1"
    assert pb_mod.remote_env(REPO, progress_interval=0.5)["RESTIC_PROGRESS_FPS"] == "2"


def test_sudo_restic_form_runs_restic_itself_under_sudo_with_only_variable_names():
    env = pb_mod.remote_env(REPO, progress_interval=30)
    argv = pb_mod.sudo_restic(("restic", "backup", "--", "/srv"), sorted(env))
    assert argv[:2] == ("sudo", "-n") and argv[3] == "--"
    assert argv[2] == ("--preserve-env=AWS_ACCESS_KEY_ID,AWS_SECRET_ACCESS_KEY,"
                       "RESTIC_PASSWORD,RESTIC_PROGRESS_FPS,RESTIC_REPOSITORY")
    assert argv[4:] == ("restic", "backup", "--", "/srv")
    assert "sh" not in argv and ENV_PREAMBLE not in argv
    assert not any(v in a for v in (PASSWORD, "s3cr3t") for a in argv)
    assert set(env) == set(pb_mod.SUDOERS_ENV)  # what the admin guide's sudoers keeps


def test_path_set_sudo_accepts_restic_as_the_shell_free_form():
    assert _pb(sudo="restic").sudo == "restic"
    assert _pb(sudo=True).sudo is True
    with pytest.raises(ValueError):
        _pb(sudo="sh")


def test_host_credentials_replace_the_repositorys_password_and_bucket_keys():
    pb = _pb(host_credentials={"password": "env:HOSTPW",
                               "s3": {"access_key_id": "env:HID", "secret_access_key": "env:HS"}})
    values = {"env:HOSTPW": "host-pw-1234", "env:HID": "HOSTID", "env:HS": "host-s3-9876"}
    repo = pb_mod.host_repo(REPO, pb.host_credentials,
                            resolve_secret=lambda ref: SecretStr(values[ref]))
    env = pb_mod.remote_env(repo, progress_interval=30)
    assert env["RESTIC_PASSWORD"] == "host-pw-1234" and env["AWS_ACCESS_KEY_ID"] == "HOSTID"
    assert env["AWS_SECRET_ACCESS_KEY"] == "host-s3-9876" and PASSWORD not in env.values()
    assert pb_mod.host_repo(REPO, None) is REPO  # no host_credentials: the repository's


def test_host_s3_keys_for_a_repository_without_s3_are_refused():
    local = Repo(url="/srv/restic", password=SecretStr(PASSWORD))
    pb = _pb(host_credentials={"password": "env:HOSTPW",
                               "s3": {"access_key_id": "env:HID", "secret_access_key": "env:HS"}})
    with pytest.raises(pb_mod.ConfigError, match="not an s3: repository"):
        pb_mod.host_repo(local, pb.host_credentials, resolve_secret=lambda r: SecretStr("x" * 8))


def test_sudo_wrap_puts_the_env_preamble_inside_sudo():
    argv = pb_mod.sudo_wrap(("restic", "version"))
    assert argv[:3] == ("sudo", "-n", "--") and ENV_PREAMBLE in argv
    assert argv[-2:] == ("restic", "version")


def test_messages_of_restic_014_are_parsed_by_type_and_noise_is_ignored():
    st = pb_mod.parse_message(STATUS)
    assert isinstance(st, pb_mod.StatusMessage) and st.files_done == 3
    summ = pb_mod.parse_message(SUMMARY)
    assert isinstance(summ, pb_mod.SummaryMessage) and summ.snapshot_id == "643c4369"
    err = pb_mod.parse_message(ERROR_SCAN)
    assert isinstance(err, pb_mod.ErrorMessage)
    assert err.path == "/t/deep/d" and err.reason == "lstat: File name too long"
    for noise in ("Warning: at least one source file could not be read", "", "{broken",
                  '{"message_type":"verbose_status","action":"new"}', "[1, 2]"):
        assert pb_mod.parse_message(noise) is None


def test_error_message_of_newer_restic_uses_its_message_text():
    err = pb_mod.parse_message('{"message_type":"error","error":{"message":"open /x: '
                               'permission denied"},"during":"archival","item":"/x"}')
    assert isinstance(err, pb_mod.ErrorMessage) and err.reason == "open /x: permission denied"


def test_error_collector_counts_a_path_reported_twice_once_and_caps_the_list():
    c = pb_mod.ErrorCollector(keep=2)
    for line in (ERROR_SCAN, ERROR_ARCHIVAL):
        msg = pb_mod.parse_message(line)
        assert isinstance(msg, pb_mod.ErrorMessage)
        c.add(msg)
    assert c.count == 1 and c.paths()[0].during == "scan"
    for i in range(5):
        c.add(pb_mod.ErrorMessage(item=f"/p{i}", error={"Op": "open", "Err": 13}))
    assert c.count == 6 and len(c.paths()) == 2


def test_progress_line_shows_percent_bytes_files_rate_and_eta():
    st = pb_mod.parse_message(STATUS)
    assert isinstance(st, pb_mod.StatusMessage)
    line = pb_mod.format_progress("photos@nas", st)
    assert line == ("photos@nas: 30.0% · 3.0 MiB of 10.0 MiB · 3 of 10 files · "
                    "1.0 MiB/s · ETA 7s")


def test_progress_throttle_lets_one_line_through_per_interval():
    now = [0.0]
    t = pb_mod.ProgressThrottle(30, clock=lambda: now[0])
    st = pb_mod.StatusMessage()
    passed = []
    for second in range(0, 95, 5):
        now[0] = float(second)
        passed.append(t.offer(st))
    assert [s for s, ok in zip(range(0, 95, 5), passed, strict=True) if ok] == [0, 30, 60, 90]


def _res(code: int, out: str = "", err: str = "") -> CommandResult:
    return CommandResult(argv=("restic", "version"), returncode=code, stdout=out, stderr=err,
                         duration=0.1, host="nas")


def test_restic_missing_names_the_host_and_how_to_install_it():
    with pytest.raises(pb_mod.ResticMissing) as e:
        pb_mod.check_version(_res(127, err="sh: 1: restic: not found"), host="nas",
                             binary="restic")
    assert "not installed on nas" in str(e.value) and "apt-get install restic" in str(e.value)
    assert e.value.host == "nas" and not e.value.transient


def test_restic_too_old_or_not_restic_is_refused_and_014_is_accepted():
    with pytest.raises(pb_mod.ResticMissing, match=r"0\.12\.1 on nas is too old"):
        pb_mod.check_version(_res(0, "restic 0.12.1 compiled with go1.16"), host="nas",
                             binary="restic")
    with pytest.raises(pb_mod.ResticMissing, match="is not restic"):
        pb_mod.check_version(_res(0, "hello"), host="nas", binary="restic")
    assert pb_mod.check_version(_res(0, "restic 0.14.0 compiled with go1.19.8 on linux/amd64"),
                                host="nas", binary="restic") == "0.14.0"


def test_attempt_pid_script_finds_only_processes_holding_the_tag_as_a_whole_argument():
    tag = "backup:20260101T000000Z-abcdef"
    # `sh -c 'sleep 30; :' tagger TAG` keeps TAG in its argv while sleeping
    holder = subprocess.Popen(("sh", "-c", "sleep 30; :", "tagger", tag))
    near = subprocess.Popen(("sh", "-c", "sleep 30; :", "tagger", tag + "x"))
    try:
        out = subprocess.run(pb_mod.attempt_pids_argv(tag), capture_output=True, text=True,
                             timeout=30, check=True).stdout
        assert pb_mod.parse_pids(out) == [holder.pid]
    finally:
        for p in (holder, near):
            p.kill()
            p.wait()


def test_attempt_pid_argv_keeps_the_tag_out_of_the_script_text():
    argv = pb_mod.attempt_pids_argv("backup:x")
    assert argv[:2] == ("sh", "-c") and "backup:x" not in argv[2] and argv[-1] == "backup:x"
    with pytest.raises(ValueError):
        pb_mod.attempt_pids_argv("backup:x; rm -rf /")


def test_select_path_sets_by_host_and_name_and_unknown_names_fail():
    inv = load_inventory(EXAMPLE)
    assert pb_mod.select_path_sets(inv) == ["photos", "nextcloud-data", "compose-stacks"]
    assert pb_mod.select_path_sets(inv, host="nas") == ["photos"]
    assert pb_mod.select_path_sets(inv, names=["compose-stacks"]) == ["compose-stacks"]
    with pytest.raises(Exception, match="photo"):
        pb_mod.select_path_sets(inv, names=["photo"])
    with pytest.raises(Exception, match="no path set"):
        pb_mod.select_path_sets(inv, host="nas", names=["compose-stacks"])


def test_retention_series_are_per_host_and_set_with_stable_tags():
    inv = load_inventory(EXAMPLE)
    series = {s.label: s for s in pb_mod.retention_series(inv, "b2-main")}
    assert "paths:nas/photos" in series
    s = series["paths:nas/photos"]
    assert s.host == inv.lab.name and s.tags == ("labkeeper", "paths:nas/photos", "kind:paths")


def test_long_unreadable_paths_are_shortened_for_the_artifact():
    path = "/t/" + "d" * 5000
    short = pb_mod.shorten_path(path, 120)
    assert len(short) <= 120 and short.startswith("/t/ddd") and "/…/" in short
    assert pb_mod.shorten_path("/short") == "/short"


# -- pending cleanups: where, what ---------------------------------------------------------------

def _attempt(backup_id: str = "20260101T020000Z-abcdef", reason: str = "ssh down"
             ) -> pb_mod.PendingAttempt:
    return pb_mod.new_pending(backup_id, snapshot_host="home", reason=reason,
                              now=datetime(2026, 1, 1, 2, 5, tzinfo=UTC))


def test_pending_file_is_one_per_host_and_set_under_the_state_dir():
    path = pb_mod.pending_path(Path("/var/lib/labkeeper"), "nas-1", "photos_raw")
    assert path == Path("/var/lib/labkeeper/path_backup/pending-nas-1.photos_raw.json")
    # "-" may be in both names: the "." keeps host "nas" + set "1-photos" apart from it
    assert pb_mod.pending_path(Path("/s"), "nas", "1-photos") != pb_mod.pending_path(
        Path("/s"), "nas-1", "photos")


@pytest.mark.parametrize("host,name", [("nas", "../etc"), ("a/b", "x"), ("nas", "a.b"),
                                       ("", "x"), ("Nas", "x")])
def test_pending_file_refuses_names_that_could_leave_its_directory_or_collide(host, name):
    with pytest.raises(ValueError, match="cannot name a state file"):
        pb_mod.pending_path(Path("/s"), host, name)


def test_pending_attempts_round_trip_through_the_file_text():
    first = _attempt("20260101T020000Z-abcdef")
    second = _attempt("20260102T020000Z-012345", reason="forget: repository is already locked")
    text = pb_mod.dump_pending("nas", "photos", [first, second])
    data = json.loads(text)
    assert data["series"] == "paths:nas/photos" and data["format"] == 1
    assert pb_mod.load_pending(text, host="nas", name="photos") == [first, second]
    assert first.tag == "backup:20260101T020000Z-abcdef"
    assert first.since == "2026-01-01T02:05:00+00:00" and first.snapshot_host == "home"


def test_pending_reason_is_redacted_and_bounded():
    register("hunter2-Secret-value")
    att = pb_mod.new_pending("x1", snapshot_host="home",
                             reason="ssh said hunter2-Secret-value " + "y" * 5000)
    assert "hunter2-Secret-value" not in att.reason and len(att.reason) <= 1000


@pytest.mark.parametrize("text,match", [
    ("{broken", "Expecting"),
    ("[]", "not a pending-cleanup file"),
    ('{"format": 2, "host": "nas", "path_set": "photos", "attempts": []}', "format 1"),
    ('{"format": 1, "host": "nas", "path_set": "docs", "attempts": []}',
     "nas/docs, not nas/photos"),
    ('{"format": 1, "host": "nas", "path_set": "photos"}', "no list"),
    ('{"format": 1, "host": "nas", "path_set": "photos", "attempts": [{"backup_id": "x"}]}',
     "no snapshot_host"),
    ('{"format": 1, "host": "nas", "path_set": "photos", "attempts": '
     '[{"backup_id": "", "snapshot_host": "home"}]}', "empty id"),
    ('{"format": 1, "host": "nas", "path_set": "photos", "attempts": '
     '[{"backup_id": "a,b", "snapshot_host": "home"}]}', "not a usable restic tag"),
])
def test_a_pending_file_that_is_not_this_sets_is_refused_not_read_as_empty(text, match):
    with pytest.raises(ValueError, match=match):
        pb_mod.load_pending(text, host="nas", name="photos")


def test_recording_an_attempt_twice_keeps_one_and_removal_is_by_id():
    a, b = _attempt("a1"), _attempt("b2")
    attempts = pb_mod.with_pending(pb_mod.with_pending([], a), b)
    assert pb_mod.with_pending(attempts, _attempt("a1", reason="later")) == [a, b]
    assert pb_mod.without_pending(attempts, ["a1", "zz"]) == [b]
    assert pb_mod.without_pending(attempts, []) == [a, b]


def test_pending_store_writes_atomically_and_removes_the_file_when_nothing_is_left(tmp_path):
    store = pb_mod.PendingCleanups(tmp_path, "nas", "photos")
    assert store.read() == []
    store.remove(["nothing"])  # nothing pending: no directory, no file
    assert not (tmp_path / "path_backup").exists()
    store.add(_attempt("a1"))
    store.add(_attempt("b2"))
    assert [a.backup_id for a in store.read()] == ["a1", "b2"]
    assert sorted(p.name for p in store.path.parent.iterdir()) == ["pending-nas.photos.json"]
    store.remove(["a1"])
    assert [a.backup_id for a in store.read()] == ["b2"]
    store.remove(["b2"])
    assert not store.path.exists() and list(store.path.parent.iterdir()) == []


def test_pending_store_refuses_an_unusable_file_with_what_to_do(tmp_path):
    store = pb_mod.PendingCleanups(tmp_path, "nas", "photos")
    store.path.parent.mkdir(parents=True)
    store.path.write_text("{half")
    with pytest.raises(pb_mod.PermanentError) as err:
        store.read()
    assert str(store.path) in str(err.value) and "restic snapshots --tag paths:nas/photos" in \
        str(err.value)

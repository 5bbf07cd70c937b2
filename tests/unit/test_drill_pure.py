"""Pure parts of the DR drills: names, classification, comparison, plans, results,
path-set verdicts, scratch-guest markers."""

from __future__ import annotations

import random
import shlex
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

from flows.dr_drill import artifact_key
from labkeeper import drill, drill_paths
from labkeeper import proxmox as px
from labkeeper.errors import ConfigError
from labkeeper.inventory import GuestDrill, Probe, SmokeQuery, load_inventory
from labkeeper.pg_backup import TableCount
from labkeeper.ssh import remote_command

EXAMPLE = Path(__file__).resolve().parents[2] / "lab.example.yaml"


def test_scratch_names_carry_the_reserved_prefix_a_random_part_and_fit_63_bytes():
    a, b = drill.scratch_db_name("immich"), drill.scratch_db_name("immich")
    assert a != b and a.startswith("labkeeper_drill_immich_")
    assert drill.scratch_db_name("Web-App.v2", token="abcd") == "labkeeper_drill_web_app_v2_abcd"
    long = drill.scratch_db_name("x" * 80, token="0123abcd")
    assert len(long) == 63 and long.endswith("_0123abcd") and drill.is_scratch_db(long)


@pytest.mark.parametrize("name", ["immich", "postgres", "labkeeper_drilled", "Labkeeper_drill_x",
                                  'labkeeper_drill_x"; DROP DATABASE y; --'])
def test_only_drill_scratch_databases_can_ever_be_dropped_or_created(name):
    with pytest.raises(ValueError, match="refusing"):
        drill.drop_db_sql(name)
    with pytest.raises(ValueError, match="refusing"):
        drill.create_db_sql(name)


def test_drop_sql_is_quoted_and_forced():
    assert drill.drop_db_sql("labkeeper_drill_a_1234") == \
        'DROP DATABASE IF EXISTS "labkeeper_drill_a_1234" WITH (FORCE);'


def test_restore_errors_about_missing_roles_are_expected_others_are_not():
    stderr = "\n".join([
        'psql:<stdin>:30: ERROR:  role "immich_owner" does not exist',
        'psql:<stdin>:31: ERROR:  must be member of role "app"',
        "psql:<stdin>:90: ERROR:  relation \"users\" already exists",
        "psql:<stdin>:95: NOTICE:  something harmless",
        "pg_restore: warning: errors ignored on restore: 2",
    ])
    expected, unexpected = drill.restore_errors(stderr)
    assert len(expected) == 2
    assert unexpected == ['psql:<stdin>:90: ERROR:  relation "users" already exists']


def test_tables_must_match_the_manifest_exactly():
    manifest = [TableCount(schema_name="public", name="users", rows=5),
                TableCount(schema_name="public", name="gone", rows=1),
                TableCount(schema_name="s", name="t", rows=0)]
    restored = {("public", "users"): 4, ("s", "t"): 0, ("public", "extra"): 9}
    checks = {c.name: (c.ok, c.detail) for c in drill.compare_tables(manifest, restored)}
    assert checks == {
        "table public.users": (False, "4 rows restored, manifest says 5"),
        "table public.gone": (False, "missing from the restore (manifest: 1 rows)"),
        "table s.t": (True, "0 rows"),
        "table public.extra": (False, "restored but not in the manifest"),
    }


@pytest.mark.parametrize(("query", "rows", "ok"), [
    (SmokeQuery(sql="q", min=1), [["3"]], True),
    (SmokeQuery(sql="q", min=1), [["0"]], False),
    (SmokeQuery(sql="q", max=2), [["3"]], False),
    (SmokeQuery(sql="q", equals=1), [["1"]], True),
    (SmokeQuery(sql="q", equals="t"), [["f"]], False),
    (SmokeQuery(sql="q", min=1), [["x"]], False),
    (SmokeQuery(sql="q", min=1), [], False),
    (SmokeQuery(sql="q", min=1), [["1", "2"]], False),
])
def test_smoke_queries_are_judged_by_min_max_equals(query, rows, ok):
    assert drill.judge_smoke(query, rows)[0] is ok


def test_read_data_subset_rotates_over_the_period():
    seq, last = [], None
    for _ in range(5):
        last = drill.next_subset(last, 3)
        seq.append(last)
    assert seq == [1, 2, 3, 1, 2]
    assert drill.next_subset(7, 3) == 1  # the period shrank
    with pytest.raises(ValueError):
        drill.next_subset(None, 0)


def test_network_is_detached_or_moved_to_the_isolated_bridge():
    config = {"net0": "name=eth0,bridge=vmbr0,tag=20,ip=dhcp", "net1": "virtio=AA,bridge=vmbr1",
              "memory": 512, "netx": "ignored"}
    assert drill.isolate_network(config, None) == ({}, ["net0", "net1"])
    options, delete = drill.isolate_network(config, "vmbr99")
    assert delete == []
    assert options == {"net0": "name=eth0,ip=dhcp,bridge=vmbr99",
                       "net1": "virtio=AA,bridge=vmbr99"}


def test_scratch_vmid_is_the_first_unused_of_the_range():
    assert drill.pick_scratch_vmid(9900, 9905, {9900, 9901, 100}) == 9902
    with pytest.raises(ConfigError, match="no free VMID"):
        drill.pick_scratch_vmid(9900, 9901, {9900, 9901})


def test_plan_targets_all_and_named_targets():
    inv = load_inventory(EXAMPLE)
    assert drill.plan_targets(inv, "all") == [
        ("database", "immich"), ("database", "nextcloud"), ("database", "n8n"),
        ("guest", "db1"),
        ("guest", "vaultwarden"), ("repository", "b2-main"), ("paths", "nas/photos"),
        ("paths", "nextcloud/nextcloud-data"), ("paths", "immich/compose-stacks")]
    assert drill.plan_targets(inv, "db:immich") == [("database", "immich")]
    assert drill.plan_targets(inv, "guest:110") == [("guest", "db1")]
    assert drill.plan_targets(inv, "repository") == [("repository", "b2-main")]
    assert drill.plan_targets(inv, "proxy") == [("guest", "proxy")]


@pytest.mark.parametrize(("target", "message"), [
    ("immich", "names several things"),
    ("nope", "no database, guest, repository or path set called 'nope'"),
    ("paths:immich/photos", "path set 'photos' is on host 'nas', not 'immich'"),
    ("paths:nope", "no path backup 'nope'"),
    ("disk:immich", "unknown drill kind"),
    ("db:nope", "no database 'nope'"),
])
def test_bad_or_ambiguous_targets_are_refused_with_a_hint(target, message):
    with pytest.raises(ConfigError, match=message):
        drill.plan_targets(load_inventory(EXAMPLE), target)


def test_a_result_fails_on_a_failed_check_an_error_or_a_breached_objective():
    r = drill.DrillResult("database", "immich", started_at=datetime(2026, 1, 1, tzinfo=UTC),
                          rpo_objective_s=3600, rto_objective_s=60)
    r.check("table public.users", True, "5 rows")
    r.rpo_s, r.rto_s = 10.0, 5.0
    assert r.passed and r.status == "passed" and r.summary() == "1 check(s) passed"
    r.rto_s = 61.0
    assert not r.passed and r.breaches == ["RTO 61.0 s > objective 60.0 s"]
    r.rto_s = 5.0
    r.check("smoke 1", False, "returned 0")
    assert r.summary() == "smoke 1: returned 0"
    r.fail("boom", transient=True)
    assert r.transient and r.row()["detail"].startswith("boom; smoke 1")
    assert r.row()["checks"] == "1/2" and r.row()["rpo"] == "10.0 s"


def test_artifact_keys_are_lowercase_dashes_only():
    assert artifact_key("database", "Web_App.v2") == "drill-db-web-app-v2"
    assert artifact_key("repository", "b2-main") == "drill-repo-b2-main"
    assert artifact_key("paths", "nas/photos") == "drill-paths-nas-photos"


# -- path-set drills ------------------------------------------------------------------------

def test_path_set_targets_are_host_slash_set_and_follow_the_drill_settings():
    inv = load_inventory(EXAMPLE)
    assert drill.plan_targets(inv, "paths:photos") == [("paths", "nas/photos")]
    assert drill.plan_targets(inv, "paths:nas/photos") == [("paths", "nas/photos")]
    assert drill.plan_targets(inv, "photos") == [("paths", "nas/photos")]
    assert [n for _k, n in drill.plan_targets(inv, "paths")] == [
        "nas/photos", "nextcloud/nextcloud-data", "immich/compose-stacks"]
    only = inv.model_copy(update={"drills": inv.drills.model_copy(update={
        "paths": inv.drills.paths.model_copy(update={"path_sets": ["photos"]})})})
    assert [t for t in drill.plan_targets(only, "all") if t[0] == "paths"] == [
        ("paths", "nas/photos")]
    off = inv.model_copy(update={"drills": inv.drills.model_copy(update={
        "paths": inv.drills.paths.model_copy(update={"enabled": False})})})
    assert not [t for t in drill.plan_targets(off, "all") if t[0] == "paths"]
    assert drill.plan_targets(off, "paths:photos") == [("paths", "nas/photos")]  # manual run


@pytest.mark.parametrize("path", ["/srv/a b/it's \"$HOME\" *;rm -rf ~", "/srv/-n", "/x/\nnl"])
def test_the_source_hash_argv_passes_the_path_as_one_argument_to_a_fixed_script(path):
    argv = drill_paths.source_hash_argv(path)
    assert argv[:4] == ("sh", "-c", drill_paths.SOURCE_SCRIPT, "labkeeper-drill")
    assert argv[4] == path and len(argv) == 5
    assert shlex.split(remote_command(argv)) == list(argv)  # what the remote shell sees
    assert '"$1"' in drill_paths.SOURCE_SCRIPT and "$2" not in drill_paths.SOURCE_SCRIPT
    assert drill_paths.source_hash_argv(path, sudo=True)[:3] == ("sudo", "-n", "--")


@pytest.mark.parametrize("bad", ["relative/path", "/with\x00nul"])
def test_the_source_hash_argv_refuses_relative_paths_and_nul(bad):
    with pytest.raises(ValueError):
        drill_paths.source_hash_argv(bad)


HASH_A = "a" * 64
HASH_B = "b" * 64


@pytest.mark.parametrize(("rc", "stdout", "expected"), [
    (0, f"12 1700000000 1700000001\n{HASH_A} */srv/f\n12 1700000000 1700000001\n",
     drill_paths.SourceFile("ok", HASH_A, 12, 1700000000, 1700000001, False)),
    (0, f"12 1700000000 1700000001\n\\{HASH_A} */srv/new\\nline\n13 1700000009 1700000009\n",
     drill_paths.SourceFile("ok", HASH_A, 12, 1700000000, 1700000001, True)),
    (66, "", drill_paths.SourceFile("gone")),
])
def test_the_hosts_answer_is_parsed_with_escaped_names_and_changes_while_hashing(
        rc, stdout, expected):
    assert drill_paths.parse_source(rc, stdout, "") == expected


def test_an_unreadable_or_garbled_answer_is_an_error_naming_why():
    e = drill_paths.parse_source(68, "12 1 1\n", "sha256sum: /srv/f: Permission denied\n")
    assert e.state == "error" and e.error == "sha256sum failed: sha256sum: /srv/f: " \
                                             "Permission denied"
    assert drill_paths.parse_source(0, "hello\n", "").state == "error"


def test_ls_lines_give_regular_files_with_what_restic_recorded():
    line = ('{"name":"f","type":"file","path":"/srv/f","uid":0,"gid":0,"size":12,'
            '"mode":420,"mtime":"2023-11-14T22:13:20.123456789+01:00",'
            '"atime":"2023-11-14T22:13:20+01:00","ctime":"2023-11-14T22:13:20+01:00",'
            '"struct_type":"node"}')
    node = drill_paths.parse_ls_line(line)
    assert node is not None and node.path == "/srv/f" and node.size == 12
    assert int(node.mtime.timestamp()) == 1699996400
    assert drill_paths.parse_ls_line(line.replace('"type":"file"', '"type":"dir"')) is None
    assert drill_paths.parse_ls_line('{"time":"2023-11-14T22:13:20Z","struct_type":'
                                     '"snapshot","paths":["/srv"]}') is None
    assert drill_paths.parse_ls_line("not json") is None


def test_the_reservoir_keeps_k_distinct_items_and_samples_uniformly():
    hits = [0] * 20
    for seed in range(2000):
        r = drill_paths.Reservoir(5, random.Random(seed))
        for i in range(20):
            r.offer(i)
        assert r.seen == 20 and len(set(r.items)) == 5
        for i in r.items:
            hits[i] += 1
    assert all(400 < h < 600 for h in hits), hits  # each item: 5/20 of 2000 = 500
    small = drill_paths.Reservoir(5, random.Random(1))
    for i in range(3):
        small.offer(i)
    assert small.items == [0, 1, 2]


SNAP_TIME = datetime(2023, 11, 15, tzinfo=UTC)
RECORDED = drill_paths.SnapNode(type="file", path="/srv/f", size=12, struct_type="node",
                                mtime=datetime(2023, 11, 14, 21, 13, 20, 500000, tzinfo=UTC))
MTIME = 1699996400  # RECORDED.mtime in whole seconds, before SNAP_TIME
CTIME_OLD = MTIME


def _src(sha=HASH_A, size=12, mtime=MTIME, ctime=CTIME_OLD, **kw):
    return drill_paths.SourceFile("ok", sha, size, mtime, ctime, **kw)


@pytest.mark.parametrize(("source", "restored_size", "status", "ok", "says"), [
    (_src(), 12, "identical", True, "identical on the host (12 bytes"),
    (_src(sha=HASH_B), 12, "mismatch", False, "CONTENT DIFFERS from the host although size"),
    (_src(sha=HASH_B, ctime=int(SNAP_TIME.timestamp()) + 5), 12, "mismatch", False,
     "rewritten with its mtime kept?"),
    (_src(sha=HASH_B, mtime=MTIME + 90), 12, "changed", True,
     "changed on the host since the backup: mtime 2023-11-14T21:14:50+00:00 (recorded "
     "2023-11-14T21:13:20+00:00)"),
    (_src(sha=HASH_B, size=40), 12, "changed", True, "size 40 (recorded 12)"),
    (_src(sha=HASH_B, changed_during=True), 12, "changed-during", True, "while the drill"),
    (drill_paths.SourceFile("gone"), 12, "deleted", True, "deleted on the host"),
    (drill_paths.SourceFile("error", error="stat failed: denied"), 12, "unreadable", False,
     "not verified: cannot hash it on the host (stat failed: denied)"),
    (_src(), 11, "size-mismatch", False, "restic dump gave 11 bytes, the snapshot records 12"),
])
def test_a_restored_file_is_judged_against_the_host_and_what_restic_recorded(
        source, restored_size, status, ok, says):
    verdict = drill_paths.judge_file(RECORDED, HASH_A, restored_size, source, SNAP_TIME)
    assert (verdict.status, verdict.ok) == (status, ok)
    assert says in verdict.detail


def test_an_mtime_newer_than_the_snapshot_means_changed_even_without_a_recorded_mtime():
    node = RECORDED.model_copy(update={"mtime": None})
    later = int(SNAP_TIME.timestamp()) + 60
    verdict = drill_paths.judge_file(node, HASH_A, 12, _src(sha=HASH_B, mtime=later), SNAP_TIME)
    assert verdict.status == "changed" and "newer than the snapshot" in verdict.detail


# -- guest drills: marker, sweep, reachability ------------------------------------------------

def _example_guest(name="db1"):
    return load_inventory(EXAMPLE).guest(name)


def test_scratch_copies_are_marked_in_the_restore_call_itself():
    created = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    options = drill.scratch_restore_options(_example_guest(), "local:backup/x.tar.zst", created)
    assert options["tags"] == drill.SCRATCH_TAG
    assert options["onboot"] == 0 and options["protection"] == 0
    assert drill.marker_created(options["description"]) == created
    for gtype, path in (("lxc", "/nodes/{node}/lxc"), ("qemu", "/nodes/{node}/qemu")):
        req = drill.scratch_restore_request(px, gtype, "pve3", 9900, "local:backup/x",
                                            storage="local-lvm", options=options)
        assert req.method == "POST" and req.template == path
        assert req.params["tags"] == "labkeeper-drill" and req.params["unique"] == 1
        assert req.params["description"] == options["description"]
        assert req.params["start"] == 0 and req.params["vmid"] == 9900


@pytest.mark.parametrize(("description", "tags", "decision"), [
    ("my own test VM", ["labkeeper-drill"], "unmarked"),
    ("x\nlabkeeper-drill-scratch created=2026-01-01T00:00:00Z", ["labkeeper-drill"], "destroy"),
    ("x\nlabkeeper-drill-scratch created=2026-01-01T11:00:00Z", ["labkeeper-drill"], "young"),
    ("x\nlabkeeper-drill-scratch created=2026-01-01T00:00:00Z",
     ["labkeeper-drill", "labkeeper-drill-kept"], "kept"),
])
def test_only_marked_stale_unkept_scratch_copies_are_swept(description, tags, decision):
    now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    assert drill.sweep_decision(description, tags, now=now, stale_after_s=6 * 3600)[0] == \
        decision


def test_ssh_and_probe_checks_need_a_bridge_and_the_copys_own_address():
    spec = GuestDrill(check="ssh")
    assert "drills.guests.bridge is not set" in drill.reach_problem(spec, None)
    assert "drill.address is not set" in drill.reach_problem(spec, "vmbr99")
    assert drill.reach_problem(spec.model_copy(update={"address": "10.99.0.30"}),
                               "vmbr99") is None
    http = GuestDrill(check="probe", probe=Probe(http={"url": "http://10.99.0.30/"}))
    assert drill.reach_problem(http, "vmbr99") is None
    tcp = GuestDrill(check="probe", probe=Probe(tcp={"port": 443}))
    assert "drill.address is not set" in drill.reach_problem(tcp, "vmbr99")
    tcp_host = GuestDrill(check="probe", probe=Probe(tcp={"host": "10.99.0.30", "port": 443}))
    assert drill.reach_problem(tcp_host, "vmbr99") is None
    assert drill.reach_problem(GuestDrill(), None) is None  # status needs nothing
    assert drill.check_label(tcp_host) == "probe tcp 10.99.0.30:443"


def test_a_guest_drill_refuses_a_container_probe():
    with pytest.raises(ValidationError, match="container probe"):
        GuestDrill(check="probe", probe=Probe(container={}))


def test_the_copys_ssh_target_is_the_guests_settings_at_the_drill_address():
    inv = load_inventory(EXAMPLE)
    target = drill.copy_ssh_target(inv, inv.guest("db1"), "10.99.0.30")
    assert target.host == "10.99.0.30" and target.name == "db1 (drill copy)"
    assert (target.user, target.port) == (inv.ssh_target("db1").user,
                                          inv.ssh_target("db1").port)

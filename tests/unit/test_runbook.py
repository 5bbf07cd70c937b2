"""Runbooks, the pure parts: files, errors with file:line:field, templating as data,
parameters against the inventory, dependency order, the record."""

from __future__ import annotations

from pathlib import Path

import pytest

from labkeeper import runbook as rb
from labkeeper.errors import ConfigError
from labkeeper.inventory import parse_inventory

INV = """
version: 1
lab: {name: t, timezone: UTC}
hosts: [{name: nas, address: 10.0.0.5}]
ssh: {key: "file:/k"}
proxmox:
  host: pve.example
  token_id: "a@pve!b"
  token_secret: "env:X"
  nodes: [{name: pve1}]
  storages:
    - {name: local, type: dir, content: [vztmpl, backup]}
    - {name: local-lvm, type: lvmthin, content: [images, rootdir], snapshots: true}
guests:
  - {name: db, vmid: 100, type: lxc, node: pve1, template: "local:vztmpl/d.tar.zst",
     resources: &r {cores: 1, memory_mb: 512, disk_gb: 4, storage: local-lvm},
     network: [{name: eth0, bridge: vmbr0, ip: 10.0.0.10/24}]}
  - {name: web, vmid: 101, type: lxc, node: pve1, template: "local:vztmpl/d.tar.zst",
     resources: *r, depends_on: [db]}
  - {name: proxy, vmid: 102, type: lxc, node: pve1, template: "local:vztmpl/d.tar.zst",
     resources: *r, depends_on: [web]}
repositories:
  - name: r
    url: "s3:https://s3.example/bkt/r"
    password: "env:P"
    s3: {endpoint: "https://s3.example", bucket: bkt, access_key_id: "env:A",
         secret_access_key: "env:S"}
databases: [{name: appdb, guest: db}]
"""


@pytest.fixture(scope="module")
def inv():
    return parse_inventory(INV, "lab.yaml")


def book(text: str) -> rb.Runbook:
    return rb.parse_runbook(text, "runbooks/x.yaml")


SIMPLE = """
version: 1
name: x
description: d
params:
  text: {type: string}
  n: {type: int, default: 3}
steps:
  - id: say
    ssh: {host: nas, argv: [printf, "%s", "{{ text }}"]}
"""


def test_every_shipped_runbook_validates():
    files = rb.runbook_files(rb.RUNBOOK_DIR)
    assert set(files) >= {"restore-database", "restore-guest", "rollback-app",
                          "add-new-service", "pre-maintenance", "post-maintenance"}
    for path in files.values():
        assert rb.load_runbook(path).steps


def test_unknown_key_in_a_step_is_reported_with_file_line_and_field():
    text = SIMPLE.replace("    ssh: {host", "    sshh: 1\n    ssh: {host")
    with pytest.raises(ConfigError) as err:
        book(text)
    problem = err.value.problems[0]
    assert problem.startswith("runbooks/x.yaml:10 steps[0].sshh:")
    assert "unknown key 'sshh'" in problem and "did you mean 'ssh'" in problem


def test_a_step_with_two_kinds_is_rejected_naming_them():
    text = SIMPLE + "    note: hello\n"
    with pytest.raises(ConfigError) as err:
        book(text)
    assert "exactly one of flow, ssh" in str(err.value) and "(got ssh, note)" in str(err.value)


def test_a_template_naming_nothing_is_reported_with_its_line():
    text = SIMPLE.replace("{{ text }}", "{{ txet }}")
    with pytest.raises(ConfigError) as err:
        book(text)
    assert "runbooks/x.yaml:9 steps[0]" in err.value.problems[0]
    assert "{{ txet }} names nothing" in err.value.problems[0]


def test_a_template_naming_a_later_step_is_rejected():
    text = SIMPLE + '  - id: two\n    note: "{{ steps.three.x }}"\n  - id: three\n    note: hi\n'
    with pytest.raises(ConfigError, match=r"steps\.three\.x"):
        book(text)


def test_on_failure_naming_an_unknown_compensation_is_rejected():
    text = SIMPLE + "    on_failure: {compensate: [undo]}\n"
    with pytest.raises(ConfigError, match="unknown compensation step"):
        book(text)


def test_file_name_must_match_the_runbook_name(tmp_path: Path):
    path = tmp_path / "other.yaml"
    path.write_text(SIMPLE)
    with pytest.raises(ConfigError, match="must equal the file name"):
        rb.load_runbook(path)


def test_a_value_with_shell_metacharacters_stays_one_argument():
    nasty = "a b; rm -rf / $(id) `id` 'q\" | cat > /etc/passwd"
    argv = rb.render_argv(["printf", "%s", "{{ text }}", "pre-{{ text }}"], {"text": nasty})
    assert argv == ("printf", "%s", nasty, f"pre-{nasty}")


@pytest.mark.parametrize("argv", [
    '[sh, -c, "echo {{ text }}"]',
    '[sudo, -u, app, bash, -ec, "rm -rf /srv/{{ text }}"]',
    '[/bin/sh, -o, pipefail, -c, "x={{ text }}"]',
    '[su, app, -c, "ls {{ text }}"]',
    '[python3, -c, "print({{ text }})"]',
    '[psql, -d, app, -c, "DELETE FROM t WHERE k = {{ text }}"]',
])
def test_a_template_inside_a_shell_or_code_string_is_refused_naming_the_field(argv):
    text = SIMPLE.replace('[printf, "%s", "{{ text }}"]', argv)
    with pytest.raises(ConfigError) as err:
        book(text)
    problem = err.value.problems[0]
    assert problem.startswith("runbooks/x.yaml:10 steps[0].ssh: argv[")
    assert "is code" in problem and "positional argument" in problem


def test_a_template_as_a_positional_argument_of_a_shell_script_is_accepted():
    text = SIMPLE.replace('[printf, "%s", "{{ text }}"]',
                          '[sh, -c, "printf %s \\"$1\\"", sh, "{{ text }}"]')
    step = book(text).steps[0]
    nasty = "x; touch /tmp/pwned"
    assert rb.render_argv(step.ssh.argv, {"text": nasty})[-1] == nasty


def test_render_argv_refuses_a_templated_script_even_without_the_model():
    with pytest.raises(rb.TemplateError, match=r"ssh.argv\[2\] is code"):
        rb.render_argv(["sh", "-c", "echo {{ text }}"], {"text": "x"})


def test_a_template_in_a_sql_check_query_is_refused_naming_the_field():
    text = SIMPLE + ("  - id: q\n    check: {sql: {database: appdb, "
                     "query: \"SELECT count(*) FROM t WHERE name = '{{ text }}'\"}}\n")
    with pytest.raises(ConfigError) as err:
        book(text)
    problem = err.value.problems[0]
    assert "steps[1].check.sql" in problem and "sql.query holds a {{ }} template" in problem


def test_a_whole_expression_keeps_its_type_and_partial_ones_become_text():
    ctx = {"dbs": ["a", "b"], "n": 3, "steps": {"r": {"restored": "x_restored_1"}}}
    assert rb.render({"databases": "{{ dbs }}", "count": "{{n}}", "msg": "n={{ n }}",
                      "name": "{{ steps.r.restored }}"}, ctx) == {
        "databases": ["a", "b"], "count": 3, "msg": "n=3", "name": "x_restored_1"}
    with pytest.raises(rb.TemplateError, match="nothing named 'nope'"):
        rb.render("{{ steps.r.nope }}", ctx)


def test_parameters_are_typed_and_defaulted(inv):
    b = book(SIMPLE)
    assert rb.bind_params(b, {"text": "hi", "n": "7"}, inv) == {"text": "hi", "n": 7}
    assert rb.bind_params(b, {"text": "hi"}, inv)["n"] == 3


def test_bad_parameters_are_all_named(inv):
    b = book(SIMPLE)
    with pytest.raises(ConfigError) as err:
        rb.bind_params(b, {"n": "seven", "txt": "x"}, inv)
    text = " ".join(err.value.problems)
    assert "parameter txt: unknown (did you mean 'text'?)" in text
    assert "parameter text: required" in text
    assert "parameter n: 'seven' is not an integer" in text


def test_an_inventory_typed_parameter_must_exist(inv):
    b = rb.find_runbook("restore-database", rb.RUNBOOK_DIR)
    with pytest.raises(ConfigError, match="no database 'apdb' in the inventory"):
        rb.bind_params(b, {"database": "apdb"}, inv)
    with pytest.raises(ConfigError, match="not 'latest' or a restic snapshot id"):
        rb.bind_params(b, {"database": "appdb", "snapshot": "abc;rm"}, inv)
    assert rb.bind_params(b, {"database": "appdb"}, inv) == {"database": "appdb",
                                                            "snapshot": "latest"}


def test_list_parameters_split_on_commas_and_each_item_is_checked(inv):
    b = rb.find_runbook("pre-maintenance", rb.RUNBOOK_DIR)
    assert rb.bind_params(b, {"guests": "web,db"}, inv) == {"guests": ["web", "db"]}
    with pytest.raises(ConfigError, match="no guest 'wbe'"):
        rb.bind_params(b, {"guests": "wbe"}, inv)


def test_guest_parameters_derive_vmid_node_databases(inv):
    b = rb.find_runbook("add-new-service", rb.RUNBOOK_DIR)
    derived = rb.derived_values(b, {"guest": "db"}, inv)
    assert derived["guest_vmid"] == 100 and derived["guest_node"] == "pve1"
    assert derived["guest_databases"] == ["appdb"] and derived["guest_apps"] == []


def test_start_order_puts_dependencies_first_and_stop_order_is_the_reverse(inv):
    assert rb.start_order(inv, ["proxy", "web", "db"]) == ["db", "web", "proxy"]
    assert rb.start_order(inv, ["proxy", "db"]) == ["proxy", "db"]  # web not chosen


def test_cli_params_need_name_equals_value():
    assert rb.parse_cli_params(["a=1", "b=x=y", "c="]) == {"a": "1", "b": "x=y", "c": ""}
    with pytest.raises(ConfigError, match="expected NAME=VALUE"):
        rb.parse_cli_params(["oops"])


def test_the_record_shows_each_step_with_outcome_and_time():
    b = book(SIMPLE)
    recs = [rb.StepRecord("say", "ssh", "on nas: printf", "ok", "exit 0", 0.25),
            rb.StepRecord("undo", "ssh", "cleanup | pipe", "failed", "boom", 1.0,
                          compensation=True)]
    md = rb.record_markdown(b, {"text": "hi"}, recs, outcome="failed", dry_run=False,
                            elapsed=1.5)
    assert "| ✅ | say | ssh | on nas: printf | 0.2 s | exit 0 |" in md
    assert "| ❌ | undo (compensation) | ssh | cleanup \\| pipe | 1.0 s | boom |" in md
    assert "- `text` = `hi`" in md and "**Outcome:** failed in 1.5 s" in md

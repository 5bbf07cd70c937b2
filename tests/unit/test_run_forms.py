"""The Run forms of the deployments (issue 21, part 2): every parameter titled and
described for a person, choices where a parameter names something, one form per runbook
with the runbook's own parameters, and no internal tuning knob on any form."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
from prefect.utilities.callables import parameter_schema

from deployments.forms import run_form
from deployments.serve import _flow_for, declared, load_deployments
from labkeeper import runbook as rb
from labkeeper.inventory import Settings, load_inventory

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = load_inventory(ROOT / "lab.example.yaml")

KNOBS = {"stall_timeout", "guest_poll", "approval_poll", "lock_timeout", "poll_max",
         "lock_retries", "lock_retry_delay", "guest_state_dir", "timeout", "poll"}
"""Internal waits and polls: inventory settings (settings.tuning), never form fields."""


def _forms(inv: Any = None) -> dict[str, dict[str, Any]]:
    """Deployment name -> the schema `labkeeper serve` gives its Run form."""
    return {d.name: d._parameter_openapi_schema.model_dump_for_openapi()
            for d in load_deployments(inv=inv)}


def _prefect_schema(decl: dict[str, Any]) -> dict[str, Any]:
    """What `prefect deploy` stores: Prefect's schema of the flow function."""
    return parameter_schema(_flow_for(decl["entrypoint"])).model_dump_for_openapi()


def _enum(prop: dict[str, Any]) -> list[str] | None:
    for sub in prop.get("anyOf") or [prop]:
        found = sub.get("enum") or sub.get("items", {}).get("enum")
        if found:
            return list(found)
    return None


@pytest.fixture(scope="module")
def forms() -> dict[str, dict[str, Any]]:
    return _forms(EXAMPLE)


def test_every_parameter_of_every_deployment_has_a_human_title_and_a_description(forms):
    assert set(forms) == {d["name"] for d in declared()}
    for name, schema in forms.items():
        for pname, prop in schema["properties"].items():
            where = f"{name}.{pname}"
            assert prop["title"] not in (pname, pname.replace("_", " ")), where
            assert len(prop.get("description") or "") >= 10, where


def test_prefect_deploy_alone_gets_every_description_from_the_flow_docstrings():
    """`prefect deploy --all` computes the schema itself: the descriptions must come
    from the flows (their ``Args:`` sections), not only from `labkeeper serve`."""
    for d in declared():
        for pname, prop in _prefect_schema(d)["properties"].items():
            assert prop.get("description"), f"{d['name']}.{pname} has no description"


def test_no_tuning_knob_is_a_parameter_of_any_deployment(forms):
    for name, schema in forms.items():
        assert not KNOBS & set(schema["properties"]), (name, KNOBS & set(schema["properties"]))


def test_the_tuning_knobs_live_in_the_inventory_settings_with_the_old_defaults():
    t = Settings().tuning
    assert (t.stall_timeout, t.update_lock_timeout, t.approval_poll, t.drill_guest_poll,
            t.vzdump_poll_max, t.vzdump_lock_retries, t.vzdump_lock_retry_delay,
            t.site_check_timeout) == (300, 10, 10, 0.5, 5, 2, 30, 3)
    assert str(Settings().provision.guest_state_dir) == "/var/lib/labkeeper"
    assert EXAMPLE.settings.tuning == t  # nothing to write for the defaults


def test_every_shipped_runbook_has_a_deployment_whose_form_is_the_runbooks_parameters(forms):
    decl = {d["name"]: d for d in declared()}
    shipped = rb.runbook_files(rb.RUNBOOK_DIR)
    assert shipped
    for name, path in shipped.items():
        book = rb.load_runbook(path)
        assert decl[name]["entrypoint"] == f"flows/runbook.py:{name.replace('-', '_')}"
        assert decl[name]["parameters"] == {"dry_run": True}  # a dry run unless unticked
        schema = forms[name]
        assert list(schema["properties"]) == [*book.params, "dry_run", "yes", "lab"]
        assert sorted(schema.get("required", [])) == sorted(
            n for n, p in book.params.items() if p.required)
        for pname, p in book.params.items():
            prop = schema["properties"][pname]
            assert prop["description"] == " ".join(p.description.split()), (name, pname)
            if not p.required:
                assert prop["default"] == p.default, (name, pname)


def test_runbook_forms_offer_the_labs_own_names_and_the_parameter_types():
    restore = _forms(EXAMPLE)["restore-database"]["properties"]
    assert _enum(restore["database"]) == [d.name for d in EXAMPLE.databases]
    assert restore["snapshot"]["type"] == "string" and _enum(restore["snapshot"]) is None
    guest = _forms(EXAMPLE)["restore-guest"]["properties"]
    assert guest["vmid"]["type"] == "integer" and guest["over_original"]["type"] == "boolean"
    stop = _forms(EXAMPLE)["pre-maintenance"]["properties"]["guests"]
    assert stop["type"] == "array" and _enum(stop) == [g.name for g in EXAMPLE.guests]


def test_the_generic_runbook_form_chooses_the_runbook_from_a_list():
    props = _forms()["runbook"]["properties"]
    assert _enum(props["name"]) == sorted(rb.runbook_files())


def test_with_an_inventory_fields_that_name_things_choose_among_the_labs(forms):
    assert _enum(forms["nightly-pg-backup"]["properties"]["databases"]) == \
        [d.name for d in EXAMPLE.databases]
    assert _enum(forms["weekly-vzdump"]["properties"]["job"]) == \
        [j.name for j in EXAMPLE.vzdump_jobs]
    assert _enum(forms["update-apps"]["properties"]["apps"]) == [a.name for a in EXAMPLE.apps]
    assert _enum(forms["update-apps"]["properties"]["resolve"]) == ["keep", "rollback"]
    assert _enum(forms["nightly-path-backup"]["properties"]["names"]) == \
        [p.name for p in EXAMPLE.path_backups]
    # without an inventory they stay free text (nothing to choose from yet)
    assert _enum(_forms()["nightly-pg-backup"]["properties"]["databases"]) is None


def test_a_lab_without_any_of_a_kind_leaves_the_field_free():
    from labkeeper.inventory import parse_inventory

    empty = parse_inventory("version: 1\nlab: {name: t}\n", "t.yaml")
    form = run_form(_flow_for("flows/runbook.py:restore_database"), empty)
    assert _enum(form["properties"]["database"]) is None


def test_a_runbooks_flow_takes_exactly_its_parameters_keyword_only(tmp_path: Path):
    from flows.runbook import runbook_as_flow

    path = tmp_path / "greet.yaml"
    path.write_text("""
version: 1
name: greet
description: Say hello.
params:
  who: {type: string, description: Whom to greet.}
  times: {type: int, default: 2, description: How often.}
  colour: {type: string, choices: [red, blue], default: red, description: Which colour.}
steps:
  - id: hello
    note: "hello {{ who }}"
""")
    fl = runbook_as_flow(path)
    sig = inspect.signature(fl.fn)
    assert list(sig.parameters) == ["who", "times", "colour", "dry_run", "yes", "lab"]
    assert all(p.kind is p.KEYWORD_ONLY for p in sig.parameters.values())
    props = parameter_schema(fl).model_dump_for_openapi()["properties"]
    assert props["colour"]["enum"] == ["red", "blue"] and props["times"]["default"] == 2
    assert props["who"]["description"] == "Whom to greet."
    assert fl.name == "runbook" and fl.description == "Say hello."


def test_a_runbook_parameter_named_like_a_run_option_is_refused(tmp_path: Path):
    from flows.runbook import runbook_as_flow
    from labkeeper.errors import ConfigError

    path = tmp_path / "clash.yaml"
    path.write_text("version: 1\nname: clash\ndescription: x\n"
                    "params: {lab: {type: string}}\nsteps: [{id: a, note: x}]\n")
    with pytest.raises(ConfigError, match="lab is taken"):
        runbook_as_flow(path)


def test_optional_fields_are_plain_fields_not_a_type_picker(forms):
    """Prefect's UI shows ``X | None`` as a "str | None" picker; the forms show X."""
    lab = forms["doctor"]["properties"]["lab"]
    assert lab["type"] == "string" and "anyOf" not in lab and "default" not in lab
    resolve = forms["update-apps"]["properties"]["resolve"]
    assert resolve["type"] == "string" and resolve["enum"] == ["keep", "rollback"]
    assert "lab" not in forms["doctor"].get("required", [])


def test_the_approval_form_says_what_is_asked_and_how_to_answer():
    from flows.runbook import Approval, approval_text

    text = approval_text("restore-database", "approve-swap", "Put x in place of y?")
    assert text.startswith("**Runbook restore-database, step approve-swap: your approval")
    assert "Put x in place of y?" in text and "without it to reject" in text
    fields = Approval.model_json_schema()["properties"]
    assert fields["approve"]["title"] == "Approve" and fields["comment"]["description"]


def test_every_default_parameter_is_one_the_labs_form_accepts():
    """prefect.yaml's `job: weekly-all` in a lab whose only vzdump job is `nightly`: the
    default is left out (the server would refuse the deployment: 422), the form asks."""
    import jsonschema

    one_node = load_inventory(ROOT / "examples" / "one-node.yaml")
    assert [j.name for j in one_node.vzdump_jobs] == ["nightly"]
    for inv in (EXAMPLE, one_node):
        for dep in load_deployments(inv=inv):
            schema = dep._parameter_openapi_schema.model_dump_for_openapi()
            schema.pop("required", None)  # defaults only: a run supplies the rest
            jsonschema.validate(dep.parameters, schema)  # what enforce_parameter_schema does
    by_name = {d.name: d for d in load_deployments(inv=one_node)}
    assert "job" not in by_name["weekly-vzdump"].parameters
    assert {d.name: d for d in load_deployments(inv=EXAMPLE)}[
        "weekly-vzdump"].parameters == {"job": "weekly-all"}

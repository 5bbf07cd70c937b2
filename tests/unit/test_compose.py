"""docker compose argv and the parsers, against real recorded `docker compose` output."""

from __future__ import annotations

import json

import pytest

from labkeeper import compose
from labkeeper.inventory import AppCompose
from tests.recorded import COMPOSE

FIXTURES = COMPOSE


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


CFG = AppCompose(dir="/opt/immich", project="immich", file="docker-compose.yml")


# ------------------------------------------------------------------------------- argv


def test_update_steps_pull_then_up_detached_removing_orphans():
    steps = compose.update_steps(CFG)
    base = ("docker", "compose", "--project-directory", "/opt/immich",
            "-f", "/opt/immich/docker-compose.yml", "-p", "immich")
    assert steps == [(*base, "pull", "--quiet"), (*base, "up", "-d", "--remove-orphans")]


def test_update_steps_without_pull_or_orphan_removal_and_with_git():
    cfg = AppCompose(dir="/opt/vw", git_url="https://git.home.arpa/me/vw.git", pull=False,
                     remove_orphans=False)
    steps = compose.update_steps(cfg)
    assert steps[0] == ("git", "-C", "/opt/vw", "pull", "--ff-only")
    assert steps[1] == ("docker", "compose", "--project-directory", "/opt/vw",
                        "-f", "/opt/vw/compose.yaml", "up", "-d")
    assert len(steps) == 2


def test_ps_and_images_ask_for_json_and_ps_includes_stopped_containers():
    assert compose.ps_argv(CFG)[-4:] == ("ps", "--all", "--format", "json")
    assert compose.images_argv(CFG)[-3:] == ("images", "--format", "json")


def test_rollback_up_uses_the_pin_override_and_never_pulls():
    argv = compose.rollback_up_argv(CFG)
    assert ("-f", f"/opt/immich/{compose.ROLLBACK_OVERRIDE}") == argv[6:8]
    assert argv[-2:] == ("--pull", "never") and "up" in argv


def test_pin_override_pins_each_service_to_its_image_id():
    text = compose.pin_override({"web": "sha256:aaa", "db": "sha256:bbb"})
    assert json.loads(text) == {"services": {"db": {"image": "sha256:bbb"},
                                             "web": {"image": "sha256:aaa"}}}
    with pytest.raises(ValueError):
        compose.pin_override({})


# ------------------------------------------------------------------------------- ps


def test_ps_before_2_21_is_one_json_array():
    cs = compose.parse_ps(fixture("ps-pre-2.21-array.docs-example.json"))
    assert [(c.service, c.state) for c in cs] == [("bar", "exited"), ("foo", "running")]
    assert cs[0].labels == {} and cs[0].image_id is None


def test_ps_from_2_21_is_one_object_per_line_with_labels_holding_the_image_id():
    cs = compose.parse_ps(fixture("ps-compose2.38.2.ndjson"))
    assert len(cs) >= 2
    pg = next(c for c in cs if c.service == "postgres")
    assert pg.health_state == "healthy" and pg.state == "running"
    assert pg.image_id == ("sha256:81bd698b4594e751a3269e4dcd3e03a4a0ec0daf7b72e7aa1abd43cce"
                           "9887542")
    assert pg.labels["com.docker.compose.version"] == "2.38.2"


def test_ps_labels_with_commas_inside_values_stay_whole():
    cs = compose.parse_ps(fixture("ps-compose5.1.4-healthy-unhealthy-restarting.ndjson"))
    api = next(c for c in cs if c.service == "api")
    assert api.labels["com.docker.compose.depends_on"] == \
        "redis:service_healthy:false,postgres:service_healthy:false"


def test_ps_health_states_healthy_unhealthy_restarting_and_starting():
    cs = compose.parse_ps(fixture("ps-compose5.1.4-healthy-unhealthy-restarting.ndjson"))
    states = {(c.health_state, c.state) for c in cs}
    assert ("healthy", "running") in states
    assert any(h == "unhealthy" for h, _ in states)
    assert any(s == "restarting" for _, s in states)
    starting = compose.parse_ps(fixture("ps-compose5.0.1-health-starting.ndjson"))
    assert [c.health_state for c in starting] == ["starting"]


def test_ps_health_falls_back_to_the_status_text():
    row = {"Name": "x-web-1", "Service": "web", "State": "running",
           "Status": "Up 2 minutes (health: starting)"}
    assert compose.parse_ps(json.dumps([row]))[0].health_state == "starting"
    row["Status"] = "Up 9 minutes (unhealthy)"
    assert compose.parse_ps(json.dumps(row))[0].health_state == "unhealthy"


@pytest.mark.parametrize("text", ["", "\n", "[]", "null"])
def test_ps_with_no_containers_is_empty(text):
    assert compose.parse_ps(text) == []


def test_ps_garbage_is_refused_with_the_line_number():
    with pytest.raises(compose.ComposeOutputError, match="line 2"):
        compose.parse_ps('{"Name": "a"}\nnot json\n')


# ------------------------------------------------------------------------------- images


def test_images_list_from_compose_5_with_container_names():
    rows = compose.parse_images(fixture("images-compose5.x.json"))
    assert rows[0].container == "z3-sim-9387ad5f-cookie-permissions-1"
    assert rows[0].id.startswith("sha256:28bd5fe8") and rows[0].reference == "alpine:3"
    assert {r.platform for r in rows} >= {"linux/amd64"}


def test_images_older_list_without_container_name_or_platform():
    text = json.dumps([{"ID": "sha256:abc", "Repository": "nginx", "Tag": "1.27",
                        "Size": 10}])
    (row,) = compose.parse_images(text)
    assert (row.container, row.reference, row.platform) == ("", "nginx:1.27", "")


def test_images_map_keyed_by_container_from_2_37_0():
    text = json.dumps({"app-web-1": {"ID": "sha256:abc", "Repository": "nginx", "Tag": "1"},
                       "app-db-1": {"ID": "sha256:def", "Repository": "postgres",
                                    "Tag": "16"}})
    rows = compose.parse_images(text)
    assert {(r.container, r.id) for r in rows} == {("app-web-1", "sha256:abc"),
                                                   ("app-db-1", "sha256:def")}


@pytest.mark.parametrize("text", ["null", "", "[]"])
def test_images_null_or_empty_yields_no_rows(text):
    assert compose.parse_images(text) == []


def test_service_images_prefer_labels_then_the_images_list():
    cs = compose.parse_ps(fixture("ps-pre-2.21-array.docs-example.json"))
    images = compose.parse_images(json.dumps([
        {"ID": "sha256:1111111111111111", "ContainerName": "example-foo-1",
         "Repository": "nginx", "Tag": "latest"}]))
    got = compose.service_images(cs, images)
    assert got["foo"].image_id == "sha256:1111111111111111"
    assert got["foo"].text() == "nginx:latest@111111111111"
    assert got["bar"].image_id == ""
    labelled = compose.service_images(compose.parse_ps(fixture("ps-compose2.38.2.ndjson")))
    assert labelled["postgres"].image_id.startswith("sha256:81bd698b")
    assert labelled["postgres"].image == "postgres:16-alpine"


# ------------------------------------------------------------------------------- health


def test_container_health_all_healthy_passes():
    cs = compose.parse_ps(fixture("ps-compose2.38.2.ndjson"))
    verdict = compose.container_health(cs)
    assert verdict.ok, verdict.detail


def test_container_health_names_the_unhealthy_and_restarting_containers():
    cs = compose.parse_ps(fixture("ps-compose5.1.4-healthy-unhealthy-restarting.ndjson"))
    verdict = compose.container_health(cs)
    assert not verdict.ok
    assert "unhealthy" in verdict.detail and "restarting" in verdict.detail


def test_container_health_starting_is_not_yet_healthy_but_waiting():
    cs = compose.parse_ps(fixture("ps-compose5.0.1-health-starting.ndjson"))
    verdict = compose.container_health(cs, ["web"])
    assert not verdict.ok and verdict.waiting and "starting" in verdict.detail


def test_container_health_of_a_named_service_without_container_fails():
    cs = compose.parse_ps(fixture("ps-compose2.38.2.ndjson"))
    verdict = compose.container_health(cs, ["postgres", "nope"])
    assert not verdict.ok and "nope: no container" in verdict.detail


def test_container_health_exited_named_service_fails_but_finished_init_is_ignored():
    cs = compose.parse_ps(fixture("ps-pre-2.21-array.docs-example.json"))
    assert compose.container_health(cs).ok  # bar exited 0 without healthcheck: an init job
    named = compose.container_health(cs, ["bar"])
    assert not named.ok and "exited" in named.detail
    assert not compose.container_health([]).ok

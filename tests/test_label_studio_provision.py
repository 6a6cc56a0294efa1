"""Label Studio provisioning against a real Label Studio (no mocks)."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

import httpx
import pytest

from labeling.label_config import (
    FROM_NAME,
    TO_NAME,
    build_label_config,
    class_colours,
    label_config_matches,
    parse_label_config_classes,
)
from labeling.provision import (
    LabelStudioError,
    check_token,
    client,
    ensure_project,
    obtain_token,
    provision,
    wait_until_ready,
)

CLASSES = ["scratch", "dent", "stain"]


# --- the test session's Label Studio (started and provisioned by `Stack.up`) --------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class RunningLabelStudio:
    url: str
    username: str
    password: str


@pytest.fixture(scope="module")
def label_studio(stack) -> RunningLabelStudio:
    s = stack.settings
    return RunningLabelStudio(
        s.label_studio, s.label_studio_username, s.label_studio_password.get_secret_value()
    )


@pytest.fixture(scope="module")
def access(label_studio: RunningLabelStudio, stack):
    got = provision(
        label_studio.url,
        label_studio.username,
        label_studio.password,
        stack.settings.label_studio_project,
        CLASSES,
    )
    # `up` provisioned this very project and token already: provisioning again changes nothing.
    assert got.token == stack.settings.label_studio_token.get_secret_value()
    return got


def _classes_of(url: str, token: str, project_id: int) -> list[str]:
    return parse_label_config_classes(client(url, token).projects.get(id=project_id).label_config)


def _projects_titled(url: str, token: str, title: str) -> list[int]:
    return [p.id for p in client(url, token).projects.list() if p.title == title]


# --- label config (no server) ---------------------------------------------------------------


def test_label_config_round_trip() -> None:
    names = ["scratch", "dent", "a&b <c>", 'quote"d', "naïve"]
    xml = build_label_config(names)
    assert parse_label_config_classes(xml) == names
    assert label_config_matches(xml, names)
    assert not label_config_matches(xml, names[:-1])
    assert not label_config_matches(xml, list(reversed(names)))
    assert f'name="{FROM_NAME}"' in xml and f'toName="{TO_NAME}"' in xml
    assert 'value="$image"' in xml
    assert "a&amp;b &lt;c&gt;" in xml
    # A config of before the per-box verdicts, notes and the sent-back header is brought up
    # to date by provisioning.
    for tag in ('<Choices name="box_verdict"', "<TextArea", 'value="$review"'):
        assert tag in xml
        start = xml.index(tag)
        end = xml.index(">", start) + 1
        older = xml[:start] + "<View>" + xml[end:] if tag == "<TextArea" else xml.replace(tag, "<X")
        assert not label_config_matches(older, names), tag


def test_label_colours_are_distinct() -> None:
    for count in (1, 3, 20, 21, 150):
        colours = class_colours(count)
        assert len(colours) == count == len(set(colours))
        assert all(len(c) == 7 and c.startswith("#") for c in colours)
    xml = build_label_config([f"c{i}" for i in range(40)])
    assert len(set(xml.split('background="')[1:])) == 40


@pytest.mark.parametrize("names", [[], ["a", "a"], ["a", " "]])
def test_label_config_rejects_bad_class_names(names: list[str]) -> None:
    with pytest.raises(ValueError):
        build_label_config(names)


def test_unreachable_url_fails_fast() -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    started = time.monotonic()
    with pytest.raises(LabelStudioError) as info:
        wait_until_ready(url, timeout=2)
    assert time.monotonic() - started < 10
    assert url in str(info.value) and "VISIONLOOP_LABEL_STUDIO_URL" in str(info.value)
    with pytest.raises(LabelStudioError) as info:
        provision(url, "a@example.com", "x", "p", CLASSES, timeout=2)
    assert url in str(info.value)


# --- against the real server ---------------------------------------------------------------


def test_provision_creates_project_with_class_names(label_studio, access) -> None:
    assert access.url == label_studio.url
    assert access.token and access.project_id > 0
    assert _classes_of(access.url, access.token, access.project_id) == CLASSES


def test_token_works_through_sdk(label_studio, access) -> None:
    ls = client(access.url, access.token)
    assert ls.users.whoami().email == label_studio.username
    assert access.project_id in [p.id for p in ls.projects.list()]
    # the raw header works too, i.e. legacy tokens really are enabled for the organization
    response = httpx.get(
        f"{access.url}/api/projects/{access.project_id}/",
        headers={"Authorization": f"Token {access.token}"},
        timeout=30,
    )
    assert response.status_code == 200, response.text


def test_provision_twice_gives_same_project(label_studio, access) -> None:
    again = provision(
        label_studio.url, label_studio.username, label_studio.password, "visionloop review", CLASSES
    )
    assert again == access
    assert _projects_titled(access.url, access.token, "visionloop review") == [access.project_id]


def test_configured_token_is_used_without_login(label_studio, access) -> None:
    # a wrong password proves the configured token is used and no login is attempted
    got = provision(label_studio.url, "", "wrong", "visionloop review", CLASSES, token=access.token)
    assert got == access


def test_changed_class_names_update_config(label_studio, access) -> None:
    title = "vl changed classes"
    first = ensure_project(access.url, access.token, title, ["scratch", "dent"])
    assert _classes_of(access.url, access.token, first) == ["scratch", "dent"]
    second = ensure_project(access.url, access.token, title, ["scratch", "dent", "crack"])
    assert second == first
    assert _classes_of(access.url, access.token, first) == ["scratch", "dent", "crack"]
    assert _projects_titled(access.url, access.token, title) == [first]


def test_dropping_a_label_in_use_is_refused(label_studio, access) -> None:
    title = "vl label in use"
    project_id = ensure_project(access.url, access.token, title, ["scratch", "dent"])
    ls = client(access.url, access.token)
    task = ls.tasks.create(project=project_id, data={"image": "http://example.com/a.jpg"})
    region = {
        "from_name": FROM_NAME,
        "to_name": TO_NAME,
        "type": "rectanglelabels",
        "original_width": 100,
        "original_height": 100,
        "value": {
            "x": 1,
            "y": 1,
            "width": 10,
            "height": 10,
            "rotation": 0,
            "rectanglelabels": ["dent"],
        },
    }
    ls.annotations.create(id=task.id, result=[region])
    with pytest.raises(LabelStudioError) as info:
        ensure_project(access.url, access.token, title, ["scratch"])
    assert "dent" in str(info.value) and "VISIONLOOP_CLASS_NAMES" in str(info.value)
    assert _classes_of(access.url, access.token, project_id) == ["scratch", "dent"]
    # adding a class next to the used one is fine
    ensure_project(access.url, access.token, title, ["scratch", "dent", "stain"])
    assert _classes_of(access.url, access.token, project_id) == ["scratch", "dent", "stain"]


def test_obtain_token_is_stable(label_studio, access) -> None:
    token = obtain_token(label_studio.url, label_studio.username, label_studio.password)
    assert token == access.token
    check_token(label_studio.url, token)


def test_wrong_token_is_rejected(label_studio, access) -> None:
    with pytest.raises(LabelStudioError) as info:
        check_token(label_studio.url, "0" * 40)
    assert "VISIONLOOP_LABEL_STUDIO_TOKEN" in str(info.value)
    with pytest.raises(LabelStudioError) as info:
        provision(
            label_studio.url,
            label_studio.username,
            label_studio.password,
            "visionloop review",
            CLASSES,
            token="not-a-token",
        )
    assert "VISIONLOOP_LABEL_STUDIO_TOKEN" in str(info.value)


def test_wrong_password_is_rejected(label_studio) -> None:
    with pytest.raises(LabelStudioError) as info:
        provision(
            label_studio.url, label_studio.username, "wrong-password", "visionloop review", CLASSES
        )
    assert "VISIONLOOP_LABEL_STUDIO_PASSWORD" in str(info.value)
    assert label_studio.password not in str(info.value)


def test_personal_access_token_is_accepted(label_studio, access) -> None:
    """A configured token may also be a personal access token (JWT refresh token)."""
    base = label_studio.url
    with httpx.Client(base_url=base, timeout=30, follow_redirects=False) as session:
        session.get("/user/login/")
        csrf = session.cookies["csrftoken"]
        login = session.post(
            "/user/login/",
            data={
                "csrfmiddlewaretoken": csrf,
                "email": label_studio.username,
                "password": label_studio.password,
            },
            headers={"Referer": f"{base}/user/login/"},
        )
        assert login.status_code == 302, login.text[:300]
        created = session.post(
            "/api/token/",
            headers={"X-CSRFToken": session.cookies["csrftoken"], "Referer": f"{base}/"},
        )
        assert created.status_code == 201, created.text
    pat = created.json()["token"]
    check_token(base, pat)
    got = provision(base, "", "", "visionloop review", CLASSES, token=pat)
    assert got.project_id == access.project_id and got.token == pat

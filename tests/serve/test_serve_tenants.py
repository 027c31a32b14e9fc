"""Every ``/api/`` route, enumerated from the app (a new route cannot be missed): 401 without
a key or with a bad one; with another tenant's key, 404 for every object of the first tenant
(never 403: its existence is not revealed) and listings without any of its ids."""

from __future__ import annotations

import pytest
from fastapi.routing import APIRoute

from hftlab.serve.app import create_app
from hftlab.serve.auth import create_key
from hftlab.serve.store import open_store
from tests.serve.serve_helpers import (
    auth,
    demo_rows,
    drain,
    jsonl,
    service_config,
    start_job,
    upload,
)

# routes that name no object of another tenant: what the other tenant may call, and gets only
# its own data back from
OWN_ONLY = {("GET", "/api/me"), ("GET", "/api/options"), ("GET", "/api/uploads"),
            ("GET", "/api/jobs"), ("POST", "/api/uploads")}


def api_routes(app) -> list[tuple[str, str]]:
    return sorted((method, route.path) for route in app.routes if isinstance(route, APIRoute)
                  and route.path.startswith("/api/") for method in route.methods)


def call(client, method: str, path: str, key: str | None, ids: dict[str, str]):
    url = path.format(**ids)
    headers = auth(key) if key is not None else {}
    if method == "POST" and path == "/api/uploads":
        return client.post(url, headers=headers,
                           files={"file": ("x.jsonl", jsonl(demo_rows(2)))})
    if method == "POST" and path == "/api/jobs":
        return client.post(url, headers=headers, json={
            "upload_id": ids["upload_id"], "task": "sst2", "defense": "sft", "seed": 0})
    if method == "POST":
        return client.post(url, headers=headers, json={"prompt": "hello", "max_new_tokens": 2})
    return client.request(method, url, headers=headers)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
    from fastapi.testclient import TestClient

    config = service_config(tmp_path_factory.mktemp("tenants") / "state", tiny_model_dir,
                            gate={"interval": "point", "max_hs_increase": 100,
                                  "harmful_eval": {"kind": "demo_harmful_prompts",
                                                   "offset": 130, "n": 6}})
    store = open_store(config)
    keys = {name: create_key(store, name) for name in ("acme", "globex")}
    app = create_app(config)
    client = TestClient(app)
    made = upload(client, keys["acme"], demo_rows(8))
    job = start_job(client, keys["acme"], made["id"])
    drain(config)
    assert client.get(f"/api/jobs/{job['id']}",
                      headers=auth(keys["acme"])).json()["status"] == "deployed"
    ids = {"upload_id": made["id"], "job_id": job["id"], "plot": "harmful_score.png"}
    return app, client, keys, ids


def test_serve_every_api_route_is_checked(world) -> None:
    app, *_ = world
    routes = api_routes(app)
    assert len(routes) >= 13
    for method, path in routes:
        has_object = "{" in path or (method, path) == ("POST", "/api/jobs")
        assert has_object or (method, path) in OWN_ONLY, (
            f"{method} {path}: new route; say here how tenants are kept apart on it")


def test_serve_every_route_needs_a_valid_key(world) -> None:
    app, client, keys, ids = world
    for method, path in api_routes(app):
        for key in (None, "hft_0_0", keys["acme"][:-2]):
            response = call(client, method, path, key, ids)
            assert response.status_code == 401, (method, path, key, response.status_code)


def test_serve_other_tenant_gets_404_for_every_object(world) -> None:
    app, client, keys, ids = world
    for method, path in api_routes(app):
        if (method, path) in OWN_ONLY:
            continue
        response = call(client, method, path, keys["globex"], ids)
        assert response.status_code == 404, (method, path, response.status_code)
    # the owner reaches each of them (a 404 above is the tenancy, not a wrong id)
    for method, path in api_routes(app):
        if (method, path) in OWN_ONLY or method == "DELETE":
            continue
        response = call(client, method, path, keys["acme"], ids)
        assert response.status_code in (200, 201), (method, path, response.status_code)


def test_serve_listings_show_only_the_callers_objects(world) -> None:
    app, client, keys, ids = world
    for method, path in api_routes(app):
        if (method, path) not in OWN_ONLY:
            continue
        response = call(client, method, path, keys["globex"], ids)
        assert response.status_code in (200, 201), (method, path)
        for value in (ids["upload_id"], ids["job_id"], "acme"):
            assert value not in response.text, (method, path)
    assert client.get("/api/me", headers=auth(keys["globex"])).json() == {"tenant": "globex"}
    # and the other tenant's DELETE left the owner's upload in place
    assert client.get(f"/api/uploads/{ids['upload_id']}",
                      headers=auth(keys["acme"])).status_code == 200

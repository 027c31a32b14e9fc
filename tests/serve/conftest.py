"""Fixtures of the service tests: a service config on the tiny model in a temporary state
folder, two tenants with keys, and an in-process client (helpers: serve_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hftlab.serve.auth import create_key
from hftlab.serve.config import ServiceConfig
from hftlab.serve.store import open_store
from tests.serve.serve_helpers import service_config


@pytest.fixture
def serve_config(tmp_path: Path, tiny_model_dir: Path) -> ServiceConfig:
    return service_config(tmp_path / "state", tiny_model_dir)


@pytest.fixture
def keys(serve_config: ServiceConfig) -> dict[str, str]:
    store = open_store(serve_config)
    return {name: create_key(store, name) for name in ("acme", "globex")}


@pytest.fixture
def client(serve_config: ServiceConfig):
    from fastapi.testclient import TestClient

    from hftlab.serve.app import create_app

    with TestClient(create_app(serve_config)) as test_client:
        yield test_client

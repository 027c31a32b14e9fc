"""``hftlab serve``: the API and web page (and, ``workers: N``, N worker processes);
``hftlab serve worker``: one worker; ``hftlab serve tenant add NAME``: a tenant's new API key,
printed once."""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from hftlab.errors import ConfigError

if TYPE_CHECKING:
    from hftlab.serve.config import ServiceConfig

TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
USAGE = "hftlab serve [worker | tenant add NAME] [--config FILE] [--host H] [--port N]"


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="the fine-tuning service: API, web page, workers "
                           f"({USAGE})")
    serve.add_argument("action", nargs="*", help="nothing: the server; 'worker': one "
                       "worker process; 'tenant add NAME': a new API key for NAME")
    serve.add_argument("--config", type=Path, help="service config YAML (default: every "
                       "default, state in ./runs/serve)")
    serve.add_argument("--host", help="address to listen on (default: the config's host)")
    serve.add_argument("--port", type=int, help="port (default: the config's port)")
    serve.add_argument("--workers", type=int, help="worker processes to start with the server "
                       "(default: the config's workers)")
    serve.add_argument("--exit-when-idle", action="store_true",
                       help="worker: stop when the queue is empty")
    serve.add_argument("-v", "--verbose", action="store_true")


def cmd_serve(args: argparse.Namespace) -> int:
    from hftlab.serve.config import load_service_config

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port),
                                   ("workers", args.workers)) if v is not None}
    config = load_service_config(args.config, overrides)
    action = list(args.action)
    if action == ["worker"]:
        from hftlab.serve.worker import run_worker

        logging.getLogger("hftlab").setLevel(logging.INFO)
        run_worker(config, exit_when_idle=args.exit_when_idle)
        return 0
    if len(action) == 3 and action[:2] == ["tenant", "add"]:
        return add_tenant(config, action[2])
    if action:
        raise ConfigError(f"unknown serve action {' '.join(action)!r}; usage: {USAGE}")
    return serve_forever(config, args.config)


def add_tenant(config: ServiceConfig, name: str) -> int:
    from hftlab.serve.auth import create_key
    from hftlab.serve.store import open_store

    if not TENANT_NAME.match(name):
        raise ConfigError(f"tenant name {name!r}: use letters, digits, '_', '.', '-' "
                          "(at most 63, starting with a letter or digit)")
    key = create_key(open_store(config), name)
    print(f"tenant {name}: API key (shown once, stored hashed):\n{key}")
    return 0


def serve_forever(config: ServiceConfig, config_path: Path | None) -> int:
    """Start the configured worker processes, then the server; stop the workers after it."""
    import uvicorn

    from hftlab.serve.app import create_app
    from hftlab.serve.worker import PARENT_ENV

    command = [sys.executable, "-m", "hftlab", "serve", "worker"]
    if config_path:
        command += ["--config", str(config_path)]
    env = {**os.environ, PARENT_ENV: str(os.getpid())}
    workers = [subprocess.Popen(command, env=env) for _ in range(config.workers)]
    try:
        uvicorn.run(create_app(config), host=config.host, port=config.port,
                    log_level="warning")
    finally:
        for process in workers:
            process.terminate()
        for process in workers:
            process.wait(timeout=30)
    return 0

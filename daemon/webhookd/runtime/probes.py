"""The daemon's own HTTP endpoints: /metrics for Prometheus, /healthz for liveness, /readyz for readiness.

Liveness asks only whether the process and its consume loop are alive: failing it when Kafka or Postgres is down
would turn an outage into a restart storm. Readiness asks whether the daemon consumes and Postgres answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from webhookd.runtime.metrics import Metrics


@dataclass(frozen=True)
class Probes:
    """What the endpoints ask the running service."""

    alive: Callable[[], bool]
    ready: Callable[[], Awaitable[bool]]


def build_app(metrics: Metrics, probes: Probes) -> web.Application:
    async def metrics_handler(_: web.Request) -> web.Response:
        body = await asyncio.to_thread(generate_latest, metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        alive = probes.alive()  # asked once: a second answer could contradict the first
        return web.Response(text="ok\n" if alive else "consume loop stalled\n", status=200 if alive else 503)

    async def readyz(_: web.Request) -> web.Response:
        ready = await probes.ready()
        return web.Response(text="ready\n" if ready else "not ready\n", status=200 if ready else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def start_server(app: web.Application, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner

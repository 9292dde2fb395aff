"""A hung receiver holds only its first few slots, and gives them back once found stalled: deliveries that would
queue behind it go to the retry table, the partition keeps moving, every other receiver keeps its pace (on its own
host or beside it on the same one, with a small budget or the whole budget per host), and the hung one gets
everything once it heals."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.daemon_tools import wait_ready
from tests.support import (
    Behaviour,
    DaemonProcess,
    Receiver,
    add_webhook,
    config_for,
    event,
    fetch,
    new_workspace,
    produce,
    running,
    settings_for,
    write_config,
)

# Rates compared side by side: `make test` runs these alone, after the others, never beside another test.
pytestmark = pytest.mark.alone

EVENTS = 300
HEALTHY = 5


class Hang:
    """Hangs every request until healed, then answers at once."""

    def __init__(self) -> None:
        self.healed = asyncio.Event()

    async def __call__(self, _request: web.Request, _body: bytes) -> web.StreamResponse:
        await self.healed.wait()
        return web.Response(text="ok")


async def test_a_hung_receiver_does_not_slow_the_others_and_gets_everything_after_it_heals(
    kafka: str, dsn: str, topic: str, receiver: Receiver
) -> None:
    ws = new_workspace()
    healthy = [Receiver() for _ in range(HEALTHY)]
    for r in healthy:
        await r.start()
    try:
        for r in healthy:
            await add_webhook(dsn, ws, r.url("/ok"), ["*.*"])
        await add_webhook(dsn, ws, receiver.url("/hung"), ["*.*"])
        hang = Hang()
        receiver.behaviours["/hung"] = hang
        settings = settings_for(
            kafka, dsn, topic,
            delivery={
                "per_host_concurrency": 4, "timeout_seconds": 30, "host_wait_seconds": 0.2,
                "host_busy_retry_seconds": 1, "retry_schedule": ["1s"],
            },
        )  # fmt: skip
        async with running(settings):
            started = time.monotonic()
            await produce(kafka, topic, [event("person.created", ws, id=f"e{i}") for i in range(EVENTS)])
            for r in healthy:
                await r.wait_for(lambda r=r: len(r.requests) >= EVENTS, 60, "the healthy deliveries")  # type: ignore[misc]
            healthy_took = time.monotonic() - started
            assert receiver.open_requests <= 4, "the hung host got more than its budget"
            # The healthy ones may all be done before the hung one counts as stalled (`host_wait_seconds`): its
            # deliveries are deferred from then on, so the table is watched for a while rather than read once.
            waited_until = time.monotonic() + 10
            while True:
                deferred = await fetch(dsn, "SELECT count(*) AS n FROM webhookd.deliveries WHERE status = 'pending'")
                if deferred[0]["n"] >= EVENTS // 2 or time.monotonic() > waited_until:
                    break
                await asyncio.sleep(0.05)
            hang.healed.set()
            await receiver.wait_for(
                lambda: {f"e{i}" for i in range(EVENTS)} <= {r.event_id for r in receiver.requests},
                90,
                "every delivery to the healed receiver",
            )
            healed_took = time.monotonic() - started
        print(
            f"\n{EVENTS} events x {HEALTHY} healthy receivers in {healthy_took:.1f}s beside a hung one "
            f"({deferred[0]['n']} of its deliveries deferred to the retry table); all {EVENTS} reached it "
            f"{healed_took - healthy_took:.1f}s after it healed"
        )
        assert deferred[0]["n"] >= EVENTS // 2, "the hung receiver's deliveries should wait in the retry table"
        assert all(len({q.event_id for q in r.requests}) == EVENTS for r in healthy)
    finally:
        for r in healthy:
            await r.stop()


FLEET = 50
HANGING = 5
FLEET_EVENTS = 40
# The healthy receivers take as long as real ones do and the daemon gets two slots per host, so that the fleet's rate
# is set by those slots and the receivers' pace, about a thousand deliveries a second, well inside what two cores can
# do. A hung receiver that held anything beyond its own host's slots shows up as a lower rate; a busy machine, which
# at full speed moved single runs by a fifth, barely does.
ANSWER_AFTER = 0.1
PER_HOST = 2


async def answer_after_a_while(_request: web.Request, _body: bytes) -> web.StreamResponse:
    await asyncio.sleep(ANSWER_AFTER)
    return web.Response(text="ok")


async def _start_daemon(config: dict[str, Any], stack: contextlib.ExitStack) -> None:
    """`webhookd run` as its own process, as in production, until `stack` closes: the receivers here would otherwise
    take their CPU from the daemon's one core, and the rates would measure this process, not the daemon."""
    tmp = tempfile.TemporaryDirectory(prefix="webhookd-isolation-")
    stack.callback(tmp.cleanup)
    daemon = DaemonProcess(write_config(Path(tmp.name) / "c.yaml", config), {}, Path(tmp.name) / "daemon.log")
    stack.callback(daemon.kill)
    daemon.start()
    await wait_ready(daemon, config["http"]["listen"])


async def _fleet_rate(
    kafka: str, topic: str, ws: str, prefix: str, fleet: list[Receiver], events: int = FLEET_EVENTS
) -> float:
    """Deliveries a second to the fleet, from producing `events` events until every receiver has all of them."""
    ids = {f"{prefix}{i}" for i in range(events)}
    # Fifty-five receivers share this process with the test. Left alone, the garbage collector
    # would scan a heap that grows from run to run and charge the later runs for it; what lives now is frozen out of
    # its reach, so that each run pays only for its own garbage.
    gc.collect()
    gc.freeze()
    target = sum(len(r.requests) for r in fleet) + len(fleet) * events
    started = time.monotonic()
    await produce(kafka, topic, [event("person.created", ws, id=i) for i in sorted(ids)])
    # Counting is cheap; checking every id on each arrival would take CPU from the daemon, in this same process, in
    # proportion to what the receivers have already seen, and so weigh more on the later run than the earlier.
    while sum(len(r.requests) for r in fleet) < target and time.monotonic() - started < 120:  # noqa: ASYNC110 (fifty receivers, no one event)
        await asyncio.sleep(0.005)
    for r in fleet:
        await r.wait_for(lambda r=r: ids <= {q.event_id for q in r.requests}, 120, f"{prefix} deliveries")  # type: ignore[misc]
    took = time.monotonic() - started
    for r in fleet:  # checked: forgotten, so that every run starts from the same heap
        r.requests.clear()
    return len(fleet) * events / took


async def test_fifty_healthy_receivers_keep_their_rate_while_five_hang_until_timeout(
    kafka: str, dsn: str, topic: str
) -> None:
    fleet: list[Receiver] = []
    hanging: list[Receiver] = []
    hang = Hang()
    stack = contextlib.ExitStack()
    try:
        for group, size in ((fleet, FLEET), (hanging, HANGING)):
            for _ in range(size):
                # Started one by one: a free port is only sure to stay free once something listens on it.
                group.append(r := Receiver())
                await r.start()
        calm, stormy = new_workspace(), new_workspace()
        for r in fleet:
            await add_webhook(dsn, calm, r.url("/calm"), ["*.*"])
            await add_webhook(dsn, stormy, r.url("/stormy"), ["*.*"])
            r.behaviours["/calm"] = r.behaviours["/stormy"] = answer_after_a_while
        for r in hanging:
            r.behaviours["/hung"] = hang
            await add_webhook(dsn, stormy, r.url("/hung"), ["*.*"])
        config = config_for(
            kafka, dsn, topic,
            delivery={
                "timeout_seconds": 3, "retry_schedule": ["1s"] * 20, "host_busy_retry_seconds": 1,
                # Exactly the slots of every host: whatever a hung host held beyond its own share would be missed by
                # the healthy ones. Pending room to spare, so that it never sets the pace.
                "per_host_concurrency": PER_HOST, "concurrency": (FLEET + HANGING) * PER_HOST,
                "max_pending_deliveries": 4000,
            },
            endpoints={
                "circuit_min_requests": 20, "circuit_consecutive_failures": 5,  # the defaults
                "circuit_cooldown_seconds": 1, "circuit_max_cooldown_seconds": 2,
            },
            logging={"level": "warning", "format": "json"},
        )  # fmt: skip
        await _start_daemon(config, stack)
        await _fleet_rate(kafka, topic, calm, "warm", fleet, events=4)  # connections and caches warm for both runs
        # The machine is shared: a run can only be slowed by what else happens meanwhile, never sped up, so each
        # side is the better of two runs.
        calm_runs = [await _fleet_rate(kafka, topic, calm, f"calm{n}-", fleet) for n in range(2)]
        calm_rate = max(calm_runs)
        # The first burst beside newly hung receivers pays for their first requests, which hold their hosts'
        # whole share until the timeout; from then on the breaker and the cut shares keep them out of the way.
        onset_rate = await _fleet_rate(kafka, topic, stormy, "onset", fleet, events=20)
        await asyncio.sleep(3.5)  # the first requests to the hung receivers time out
        stormy_runs = [await _fleet_rate(kafka, topic, stormy, f"stormy{n}-", fleet) for n in range(2)]
        stormy_rate = max(stormy_runs)
        print(
            f"\n{FLEET} healthy receivers: {calm_rate:.0f} deliveries/s alone (runs {calm_runs[0]:.0f}, "
            f"{calm_runs[1]:.0f}); beside {HANGING} that hang until the 3 s timeout, {onset_rate:.0f}/s in the "
            f"first burst ({onset_rate / calm_rate:.0%}) and {stormy_rate:.0f}/s after it "
            f"({stormy_rate / calm_rate:.0%}; runs {stormy_runs[0]:.0f}, {stormy_runs[1]:.0f})"
        )
        assert stormy_rate >= 0.9 * calm_rate
        healed_at = time.monotonic()
        hang.healed.set()
        ids = {f"onset{i}" for i in range(20)} | {f"stormy{n}-{i}" for n in range(2) for i in range(FLEET_EVENTS)}
        for r in hanging:
            await r.wait_for(lambda r=r: ids <= {q.event_id for q in r.requests}, 120, "the healed deliveries")  # type: ignore[misc]
        print(f"all {len(ids) * HANGING} deliveries of the hung receivers arrived "
              f"{time.monotonic() - healed_at:.1f} s after they healed")  # fmt: skip
    finally:
        stack.close()
        gc.unfreeze()
        for r in [*fleet, *hanging]:
            await r.stop()


# The configuration, as the README allows it: every host may take the whole budget.
BUDGET = 128
HUNG_TIMEOUT = 10
HEALTHY_ANSWER = 0.02
BURST = 400
RUNS = 2


class Healthy:
    """Answers after HEALTHY_ANSWER, counting its answers (cheaper than scanning the requests the test records)."""

    def __init__(self) -> None:
        self.answered = 0

    async def __call__(self, _request: web.Request, _body: bytes) -> web.StreamResponse:
        await asyncio.sleep(HEALTHY_ANSWER)
        self.answered += 1
        return web.Response(text="ok")


class Layout:
    """Fifty healthy endpoints and, for every stormy run, five new ones that hang until the run is over: on one host
    with a path each, or on a host:port each."""

    def __init__(self, one_host: bool) -> None:
        self.one_host = one_host
        self.receivers: list[Receiver] = []
        self.healthy = Healthy()
        self.hangs: list[Hang] = []
        self.healthy_urls: list[str] = []

    async def start(self) -> None:
        for _ in range(1 if self.one_host else FLEET + HANGING):
            # Started one by one: a free port is only sure to stay free once something listens on it.
            self.receivers.append(r := Receiver())
            await r.start()
        for i in range(FLEET):
            self.healthy_urls.append(self._url(i, f"/ok/{i}"))

    def hung_urls(self, run: int) -> list[str]:
        self.hangs.append(hang := Hang())
        return [self._url(FLEET + j, f"/hung/{run}/{j}", hang) for j in range(HANGING)]

    def _url(self, index: int, path: str, behaviour: Behaviour | None = None) -> str:
        receiver = self.receivers[0 if self.one_host else index]
        receiver.behaviours[path] = behaviour or self.healthy
        return receiver.url(path)

    async def stop(self) -> None:
        for hang in self.hangs:
            hang.healed.set()
        for r in self.receivers:
            await r.stop()


async def _healthy_rate(kafka: str, topic: str, ws: str, prefix: str, layout: Layout, events: int = BURST) -> float:
    """Deliveries a second to the fifty healthy endpoints, from producing `events` events until they have them all."""
    gc.collect()
    gc.freeze()  # as in _fleet_rate: each run pays only for its own garbage
    target = layout.healthy.answered + FLEET * events
    started = time.monotonic()
    await produce(kafka, topic, [event("person.created", ws, id=f"{prefix}{i}") for i in range(events)])
    while layout.healthy.answered < target:
        assert time.monotonic() - started < 120, f"{prefix}: {target - layout.healthy.answered} deliveries missing"
        await asyncio.sleep(0.005)
    took = time.monotonic() - started
    for r in layout.receivers:  # what they recorded is not checked here; forgotten so that every run starts alike
        r.requests.clear()
    return FLEET * events / took


@pytest.mark.parametrize("one_host", [True, False], ids=["one host, a path each", "a host:port each"])
async def test_fifty_healthy_endpoints_keep_their_rate_beside_five_hung_from_the_first_event_on_a_full_host_budget(
    kafka: str, dsn: str, topic: str, one_host: bool
) -> None:
    layout = Layout(one_host)
    stack = contextlib.ExitStack()
    try:
        await layout.start()
        calm = new_workspace()
        healthy_ids = [await add_webhook(dsn, calm, url, ["*.*"]) for url in layout.healthy_urls]
        stormy: list[str] = []
        for run in range(RUNS):
            # Each stormy run meets endpoints that hang from its first event: new ones, never answered before.
            stormy.append(ws := new_workspace())
            for url in layout.healthy_urls:
                healthy_ids.append(await add_webhook(dsn, ws, url, ["*.*"]))
            for url in layout.hung_urls(run):
                await add_webhook(dsn, ws, url, ["*.*"])
        config = config_for(
            kafka, dsn, topic,
            delivery={
                "concurrency": BUDGET, "per_host_concurrency": BUDGET, "timeout_seconds": HUNG_TIMEOUT,
                # What is deferred comes back after the runs, not during them.
                "retry_schedule": ["5m"], "host_busy_retry_seconds": 300,
            },
            endpoints={"circuit_min_requests": 20, "circuit_consecutive_failures": 5},  # the defaults
            logging={"level": "warning", "format": "json"},
        )  # fmt: skip
        await _start_daemon(config, stack)
        await _healthy_rate(kafka, topic, calm, "warm", layout, events=40)  # connections and caches warm
        # Taking turns, each side the best of its runs: a shared machine only ever slows a run down.
        calm_runs: list[float] = []
        stormy_runs: list[float] = []
        for run in range(RUNS):
            calm_runs.append(await _healthy_rate(kafka, topic, calm, f"calm{run}-", layout))
            stormy_runs.append(await _healthy_rate(kafka, topic, stormy[run], f"stormy{run}-", layout))
            # Healed once measured: what they held would otherwise weigh on the runs that follow, on either side.
            layout.hangs[run].healed.set()
        deferred = await fetch(
            dsn,
            "SELECT count(*) AS n FROM webhookd.deliveries WHERE webhook_id = ANY($1::uuid[])",
            healthy_ids,
        )
        ratio = max(stormy_runs) / max(calm_runs)
        print(
            f"\n{'one host' if one_host else 'a host:port each'}, budget {BUDGET} and {BUDGET} per host: "
            f"{FLEET} healthy endpoints at {max(calm_runs):.0f} deliveries/s alone (runs "
            f"{', '.join(f'{r:.0f}' for r in calm_runs)}), {max(stormy_runs):.0f}/s beside {HANGING} hung from the "
            f"first event (runs {', '.join(f'{r:.0f}' for r in stormy_runs)}): {ratio:.0%}; "
            f"{deferred[0]['n']} healthy deliveries deferred"
        )
        assert deferred[0]["n"] == 0, "healthy deliveries went to the retry table because others were slow"
        assert ratio >= 0.9
    finally:
        stack.close()
        gc.unfreeze()
        await layout.stop()

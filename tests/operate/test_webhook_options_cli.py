"""`webhookd webhooks show | set | unset` against a real Postgres: options merged and removed under a lock, every bad
change refused with its reason and nothing changed, and header values never printed."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from tests.support import add_webhook, config_for, fetch, new_workspace, webhookd_command, write_config
from webhookd.operate.webhook_commands import lock_options
from webhookd.routing.webhook_options import OptionsError, options_from_json

SECRET = "Bearer s3cr3t-t0ken-9f8e7d"


@dataclass
class Ops:
    config: str
    dsn: str
    webhook: str  # live, with a path and query that must not be shown

    async def run(self, *args: str) -> tuple[int, str]:
        return await webhookd_command("webhooks", *args, "--config", self.config)

    async def ok(self, *args: str) -> str:
        status, out = await self.run(*args)
        assert status == 0, out
        return out

    async def json(self, *args: str) -> Any:
        return orjson.loads(await self.ok(*args, "--json"))

    async def row(self, webhook: str | None = None) -> tuple[Any, Any] | None:
        """The stored options and their change time, or None without a row."""
        rows = await fetch(
            self.dsn,
            "SELECT options::text AS options, updated_at FROM webhookd.webhook_options WHERE webhook_id = $1::uuid",
            webhook or self.webhook,
        )
        return (orjson.loads(rows[0]["options"]), rows[0]["updated_at"]) if rows else None

    async def write_raw(self, options: str, webhook: str | None = None) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.execute(
                "INSERT INTO webhookd.webhook_options (webhook_id, options) VALUES ($1::uuid, $2::jsonb)",
                webhook or self.webhook,
                options,
            )
        finally:
            await conn.close()


@pytest.fixture
async def ops(dsn: str, tmp_path: Path) -> Ops:
    # Kafka is never contacted by these commands; the configuration only has to be valid.
    config = write_config(tmp_path / "webhookd.yaml", config_for("127.0.0.1:9", dsn, "unused"))
    webhook = await add_webhook(dsn, new_workspace(), "https://hooks.example.com/in/tok3n?key=abc", ["person.*"])
    return Ops(str(config), dsn, webhook)


async def test_set_then_show_masks_header_values_in_text_and_json(ops: Ops) -> None:
    out = await ops.ok(
        "set",
        ops.webhook,
        "--updated-fields",
        "stage,amount",
        "--where",
        "stage in [WON, LOST]",
        "--ordered",
        "--header",
        f"Authorization: {SECRET}",
    )
    assert "Authorization: ***" in out
    assert "updatedFields has any of: amount, stage" in out
    assert 'where stage in ["WON", "LOST"]' in out
    assert "within 2 seconds" in out

    shown = await ops.ok("show", ops.webhook)
    for text in (out, shown):
        assert SECRET not in text
        assert "s3cr3t" not in text
        assert "tok3n" not in text
        assert "key=abc" not in text
    assert "https://hooks.example.com" in shown
    assert "ordered:" in shown
    assert "yes" in shown
    assert "person.*" in shown
    assert "live" in shown

    data = await ops.json("show", ops.webhook)
    assert data["options"] == {
        "filter": {"updated_fields": ["amount", "stage"], "where": ['stage in ["WON", "LOST"]']},
        "ordered": True,
        "headers": {"Authorization": "***"},
    }
    assert data["state"] == "live"
    assert data["valid"] is True
    assert data["options_updated_at"]
    listing = await ops.ok("show")
    listed = await ops.json("show")
    assert [r["webhook_id"] for r in listed] == [ops.webhook]
    assert "Authorization" in listing
    assert "yes" in listing
    for text in (orjson.dumps(data).decode(), listing, orjson.dumps(listed).decode()):
        assert "s3cr3t" not in text
    stored = await ops.row()
    assert stored is not None
    assert stored[0]["headers"] == {"Authorization": SECRET}


async def test_set_merges_into_the_options_and_unset_removes_them(ops: Ops) -> None:
    await ops.ok("set", ops.webhook, "--updated-fields", "stage")
    await ops.ok("set", ops.webhook, "--where", "stage in [WON, LOST]")
    await ops.ok("set", ops.webhook, "--where", "amount.currencyCode = USD", "--header", "X-Team: sales")
    await ops.ok("set", ops.webhook, "--ordered", "--header", "X-Region: eu", "--updated-fields", "stage, closeDate")
    stored = await ops.row()
    assert stored is not None
    assert stored[0] == {
        "filter": {
            "updated_fields": ["closeDate", "stage"],
            "where": ['stage in ["WON", "LOST"]', 'amount.currencyCode = "USD"'],
        },
        "ordered": True,
        "headers": {"X-Team": "sales", "X-Region": "eu"},
    }
    # A header set again under another case replaces the first; --replace-where replaces the predicates.
    await ops.ok("set", ops.webhook, "--header", "x-team: marketing", "--where", "stage = WON", "--replace-where")
    data = await ops.json("show", ops.webhook)
    assert data["options"]["headers"] == {"X-Region": "***", "x-team": "***"}
    assert data["options"]["filter"]["where"] == ['stage = "WON"']

    await ops.ok("unset", ops.webhook, "--where", "--header", "X-REGION")
    data = await ops.json("show", ops.webhook)
    assert data["options"] == {
        "filter": {"updated_fields": ["closeDate", "stage"]},
        "ordered": True,
        "headers": {"x-team": "***"},
    }
    await ops.ok("unset", ops.webhook, "--ordered", "--header", "x-team")
    out = await ops.ok("unset", ops.webhook, "--updated-fields")
    assert "no options" in out
    assert await ops.row() is None  # the last option removed takes the row with it


async def test_header_from_env_reads_the_value_without_it_in_the_command(
    ops: Ops, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOOK_TOKEN", SECRET)
    out = await ops.ok("set", ops.webhook, "--header-from-env", "Authorization=HOOK_TOKEN")
    assert "Authorization: ***" in out
    assert "s3cr3t" not in out
    stored = await ops.row()
    assert stored is not None
    assert stored[0] == {"headers": {"Authorization": SECRET}}

    monkeypatch.delenv("HOOK_TOKEN")
    status, out = await ops.run("set", ops.webhook, "--header-from-env", "X-Other=HOOK_TOKEN")
    assert status == 2
    assert "HOOK_TOKEN" in out
    assert "not set" in out
    assert await ops.row() == stored


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--where", "stage inn [WON]"], "stage inn [WON]"),
        (["--where", "stage = WON", "--where", "name.first-name = x"], "first-name"),
        (["--updated-fields", "stage,bad field"], "bad field"),
        (["--header", "X-Twenty-Webhook-Signature: forged"], "X-Twenty-Webhook-Signature"),
        (["--header", "Host: evil.example"], "Host"),
        (["--header", "Content-Length: 1"], "Content-Length"),
        (["--header", "Content-Type: text/plain"], "Content-Type"),
        (["--header", "X-Api-Key: s3cr3t\r\nX-Injected: 1"], "X-Api-Key"),
        (["--header", "X-Api-Key: s3cr3t\nmore"], "line breaks"),
        (["--header", "Authorization Bearer s3cr3t"], "Name: value"),  # the colon forgotten
        (["--header", "User-Agent: curl/8.0"], "User-Agent"),
        (["--header-from-env", "Authorization=Bearer s3cr3t"], "--header-from-env #1"),  # a value, not a variable
    ],
)
async def test_a_bad_option_is_refused_with_its_reason_and_nothing_changes(
    ops: Ops, args: list[str], reason: str
) -> None:
    await ops.ok("set", ops.webhook, "--ordered", "--header", "X-Team: sales")
    before = await ops.row()
    status, out = await ops.run("set", ops.webhook, *args, "--unordered")
    assert status == 2, out
    assert reason in out
    assert "s3cr3t" not in out  # a refused value is not repeated: it may be a secret
    assert await ops.row() == before


async def test_an_unknown_webhook_is_refused(ops: Ops) -> None:
    unknown = "6f1c1e9e-8a7b-4c3d-9e2f-1a2b3c4d5e6f"
    status, out = await ops.run("set", unknown, "--ordered")
    assert status == 1
    assert f"no live webhook {unknown}" in out
    status, out = await ops.run("show", unknown)
    assert status == 1
    assert f"no webhook {unknown}" in out
    status, out = await ops.run("unset", unknown, "--all")
    assert status == 1
    assert f"no webhook {unknown}" in out
    status, out = await ops.run("show", "not-a-uuid")
    assert status == 2
    assert "not-a-uuid" in out
    assert await fetch(ops.dsn, "SELECT * FROM webhookd.webhook_options") == []


async def test_a_deleted_webhook_is_refused_but_its_options_still_show_and_unset(ops: Ops) -> None:
    deleted = await add_webhook(ops.dsn, new_workspace(), "https://gone.example/x", ["*.*"], deleted=True)
    status, out = await ops.run("set", deleted, "--ordered")
    assert status == 1
    assert f"no live webhook {deleted}" in out
    assert await ops.row(deleted) is None

    await ops.write_raw('{"ordered": true}', deleted)  # left from when it was live
    data = await ops.json("show", deleted)
    assert data["state"] == "deleted"
    assert data["deleted_at"]
    assert data["options"] == {"ordered": True}
    assert "deleted" in await ops.ok("show", deleted)
    assert (await ops.json("show"))[0]["state"] == "deleted"
    await ops.ok("unset", deleted, "--ordered")
    assert await ops.row(deleted) is None


async def test_set_or_unset_without_an_option_is_a_usage_error(ops: Ops) -> None:
    status, out = await ops.run("set", ops.webhook)
    assert status == 2
    assert "at least one option" in out
    status, out = await ops.run("unset", ops.webhook)
    assert status == 2
    assert "at least one option" in out
    assert await ops.row() is None


async def test_show_says_no_options_for_a_webhook_without_any(ops: Ops) -> None:
    out = await ops.ok("show", ops.webhook)
    assert "no options" in out
    data = await ops.json("show", ops.webhook)
    assert data["options"] == {}
    assert data["options_updated_at"] is None


async def test_unset_all_removes_the_row(ops: Ops) -> None:
    await ops.ok("set", ops.webhook, "--ordered", "--where", "stage = WON", "--header", "X-Team: sales")
    out = await ops.ok("unset", ops.webhook, "--all")
    assert "no options" in out
    assert await ops.row() is None


async def test_a_row_edited_by_hand_into_an_invalid_state_is_shown_with_a_warning(ops: Ops) -> None:
    await ops.write_raw('{"ordered": "yes", "headers": {"Authorization": "Bearer s3cr3t"}, "colour": "red"}')
    out = await ops.ok("show", ops.webhook)
    assert "ignored by running daemons" in out
    assert "unknown option(s) colour" in out  # the reason, from the validator
    assert "ordered" in out
    assert "headers.Authorization" in out
    assert "colour" in out
    assert "s3cr3t" not in out
    data = await ops.json("show", ops.webhook)
    assert data["valid"] is False
    assert data["options"] is None
    assert "colour" in data["problem"]
    assert sorted(data["stored_keys"]) == ["colour", "headers.Authorization", "ordered"]  # jsonb orders keys
    listing = await ops.ok("show")
    assert "INVALID" in listing
    assert "ignored by running daemons" in listing
    assert "s3cr3t" not in listing

    # A set must fix what is wrong to be accepted; removing the faulty parts is always possible.
    status, out = await ops.run("set", ops.webhook, "--where", "stage = WON")
    assert status == 2
    assert "colour" in out
    assert "s3cr3t" not in out
    await ops.ok("unset", ops.webhook, "--all")
    assert await ops.row() is None


async def test_a_set_waits_for_a_concurrent_change_and_keeps_it(ops: Ops) -> None:
    conn = await asyncpg.connect(ops.dsn)
    try:
        async with conn.transaction():
            # What another `set` holds while it merges: the webhook has no row yet, so only the lock can serialize.
            await lock_options(conn, ops.webhook)
            command = asyncio.create_task(ops.run("set", ops.webhook, "--header", "X-Team: sales"))
            await asyncio.sleep(0.5)
            assert not command.done(), "set did not wait for the lock"
            await conn.execute(
                "INSERT INTO webhookd.webhook_options (webhook_id, options) VALUES ($1::uuid, $2::jsonb)",
                ops.webhook,
                '{"ordered": true}',
            )
        status, out = await asyncio.wait_for(command, 10)
    finally:
        await conn.close()
    assert status == 0, out
    stored = await ops.row()
    assert stored is not None
    assert stored[0] == {"ordered": True, "headers": {"X-Team": "sales"}}


async def test_options_left_by_a_removed_webhook_show_and_unset(ops: Ops) -> None:
    removed = "0b6c6a54-2f0e-4a8c-9d41-7a7e3c1f2b90"  # no row in the subscriptions table any more
    await ops.write_raw('{"headers": {"X-Team": "sales"}}', removed)
    out = await ops.ok("show", removed)
    assert "not in the subscriptions table" in out
    assert "X-Team: ***" in out
    status, out = await ops.run("set", removed, "--ordered")
    assert status == 1
    assert f"no live webhook {removed}" in out
    out = await ops.ok("unset", removed, "--header", "X-Team")
    assert "within 2 seconds" in out
    assert await ops.row(removed) is None


async def test_a_stored_header_name_that_is_not_a_name_is_named_by_position_and_never_printed(ops: Ops) -> None:
    # A header line pasted whole as a name, secret included; jsonb puts the shorter key first, so it is header #2.
    await ops.write_raw('{"headers": {"X-Team": "sales", "Authorization: Bearer s3cr3t": "x"}}')
    out = await ops.ok("show", ops.webhook)
    assert "header #2: not a valid header name" in out
    assert "headers.X-Team" in out  # a valid name is still shown
    assert "headers.#2 (not a valid name)" in out
    data = await ops.json("show", ops.webhook)
    assert data["valid"] is False
    assert data["problem"].startswith("header #2: not a valid header name")
    assert data["stored_keys"] == ["headers.X-Team", "headers.#2 (not a valid name)"]
    listing, listed = await ops.ok("show"), await ops.json("show")
    assert "header #2" in listing
    status, refused = await ops.run("set", ops.webhook, "--ordered")
    assert status == 2
    assert "header #2" in refused
    for text in (out, orjson.dumps(data).decode(), listing, orjson.dumps(listed).decode(), refused):
        assert "s3cr3t" not in text
        assert "Bearer" not in text


async def test_a_stored_option_key_that_is_not_a_name_is_named_by_position_never_printed(ops: Ops) -> None:
    await ops.write_raw('{"ordered": true, "colour": "red", "Authorization: Bearer s3cr3t": 1}')
    data = await ops.json("show", ops.webhook)
    # jsonb orders keys by length: colour, ordered, then the long one, #3 in both the problem and the keys.
    assert "unknown option(s) colour, #3 (not a valid name, not shown);" in data["problem"]
    assert "#3 (not a valid name)" in data["stored_keys"]
    out = await ops.ok("show", ops.webhook)
    assert "colour" in out
    for text in (out, orjson.dumps(data).decode()):
        assert "s3cr3t" not in text


def test_the_daemons_reason_for_ignoring_a_row_never_quotes_an_invalid_header_name() -> None:
    # The text every daemon logs as `webhook_options_ignored`.
    with pytest.raises(OptionsError) as refused:
        options_from_json({"headers": {"X-Team": "sales", "Authorization: Bearer s3cr3t": "x"}})
    assert str(refused.value).startswith("header #2: not a valid header name")
    assert "s3cr3t" not in str(refused.value)
    with pytest.raises(OptionsError, match=r"^header #1: ") as refused:
        options_from_json({"headers": {"X-Team\r\nX-Injected": "sales"}})
    assert "X-Injected" not in str(refused.value)


async def test_unset_does_not_repeat_a_header_it_was_given_that_is_not_a_name(ops: Ops) -> None:
    await ops.ok("set", ops.webhook, "--header", "X-Team: sales")
    out = await ops.ok("unset", ops.webhook, "--header", "X-Other: s3cr3t", "--header", "X-Region")
    assert "not set, so not removed: header(s) --header #1 (not a valid name), X-Region" in out
    assert "s3cr3t" not in out


@pytest.mark.parametrize("name", ["User-Agent", "user-agent"])
async def test_user_agent_is_refused_because_webhookd_always_sends_its_own(ops: Ops, name: str) -> None:
    status, out = await ops.run("set", ops.webhook, "--header", f"{name}: curl/8.0")
    assert status == 2
    assert f"header {name!r}: webhookd sets it on every request (always webhookd/<version>" in out
    assert "nothing changed" in out
    assert await ops.row() is None
    with pytest.raises(OptionsError, match="User-Agent"):  # a row edited by hand is ignored by the daemons
        options_from_json({"headers": {"User-Agent": "curl/8.0"}})


@pytest.mark.parametrize(
    ("options", "why"),
    [
        ('{"ordered": true, "x": 1e400}', "number is infinity"),  # jsonb keeps it as 401 digits
        ('{"filter": ' + "[" * 1100 + "]" * 1100 + "}", "depth limit exceeded"),
    ],
)
async def test_a_row_the_daemons_json_reader_refuses_shows_as_invalid_and_only_unset_all_removes_it(
    ops: Ops, options: str, why: str
) -> None:
    await ops.write_raw(options)
    stored_sql = "SELECT options::text AS options FROM webhookd.webhook_options WHERE webhook_id = $1::uuid"
    stored = await fetch(ops.dsn, stored_sql, ops.webhook)
    out = await ops.ok("show", ops.webhook)
    assert "ignored by running daemons" in out
    assert f"the stored JSON cannot be read: {why}" in out
    assert "(the JSON cannot be read: not shown)" in out
    data = await ops.json("show", ops.webhook)
    assert (data["valid"], data["options"]) == (False, None)
    assert why in data["problem"]
    listing = await ops.ok("show")
    assert "INVALID" in listing
    assert why in listing
    assert (await ops.json("show"))[0]["valid"] is False

    # Merging onto nothing would drop what the row held unseen: set refuses and names the way out.
    status, out = await ops.run("set", ops.webhook, "--ordered")
    assert status == 2, out
    assert f"refused, nothing changed: the stored JSON cannot be read: {why}" in out
    assert f"webhookd webhooks unset {ops.webhook} --all" in out
    status, out = await ops.run("unset", ops.webhook, "--ordered")
    assert status == 2, out
    assert "only --all removes these options" in out
    for text in (out, listing):
        assert "Traceback" not in text
    assert await fetch(ops.dsn, stored_sql, ops.webhook) == stored

    out = await ops.ok("unset", ops.webhook, "--all")
    assert "no options" in out
    assert await ops.row() is None


@pytest.mark.parametrize("credentials", ["alice:pa55w0rd@", "alice@", ":pa55w0rd@"])
async def test_authorization_is_refused_for_a_target_url_that_carries_credentials(ops: Ops, credentials: str) -> None:
    webhook = await add_webhook(ops.dsn, new_workspace(), f"https://{credentials}hooks.example.com/in", ["*.*"])
    status, out = await ops.run("set", webhook, "--header", f"authorization: {SECRET}")
    assert status == 2, out
    assert "header 'authorization': the webhook's targetUrl already carries credentials" in out
    assert "remove them from the targetUrl, or leave authorization out of this webhook's headers" in out
    for secret in ("alice", "pa55w0rd", "s3cr3t"):
        assert secret not in out
    assert await ops.row(webhook) is None
    # Other headers are fine, and so is Authorization where the URL has no credentials.
    await ops.ok("set", webhook, "--header", "X-Api-Key: k")
    await ops.ok("set", ops.webhook, "--header", f"Authorization: {SECRET}")

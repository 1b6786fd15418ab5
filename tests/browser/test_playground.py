"""The playground in a real browser: a learner clicks through all four
call patterns and reads what the page shows. Every control is found by
its role and accessible name, as a screen reader would find it."""

import json
import os
import re

from playwright.sync_api import expect

from conftest import DEADLINE, PATIENCE_MS, Server


def open_method(page, server, name):
    page.goto(server.url)
    page.get_by_role("button", name=name, exact=True).click()
    expect(page.get_by_role("heading", level=2, name=re.compile(f"^{name}"))).to_be_visible()


def type_request(page, message):
    page.get_by_label("Request message (JSON)").fill(json.dumps(message))


def send(page, message=None):
    if message is not None:
        type_request(page, message)
    page.get_by_role("button", name="Send", exact=True).click()


def status(page):
    return page.locator("#status")


def timeline_rows(page):
    return page.locator("#timeline tr")


def test_add_user_shows_the_reply_every_event_and_the_grpcurl_command(page, server):
    open_method(page, server, "AddUser")
    # The prefilled example is valid as it is.
    send(page)
    expect(status(page)).to_have_text("OK")
    expect(page.locator("#responses")).to_contain_text('"firstName": "Ada"')
    expect(page.locator("#responses")).to_contain_text('"code": 200')
    # Headers, message, end; headers, message, trailers; status.
    expect(timeline_rows(page)).to_have_count(7)
    expect(timeline_rows(page).last).to_contain_text("status OK")
    command = page.locator("#grpcurl")
    expect(command).to_contain_text("grpcurl -plaintext -d '{")
    expect(command).to_contain_text('"first_name":"Ada"')
    expect(command).to_contain_text(f"{server.addr} grpcUser.UserService/AddUser")
    expect(page.get_by_role("button", name="Copy")).to_be_enabled()


def test_get_user_of_an_unknown_id_shows_not_found(page, server):
    open_method(page, server, "GetUser")
    editor = page.get_by_label("Request message (JSON)")
    editor.fill('{"id": "nobody-here"}')
    # From the keyboard: Ctrl+Enter sends.
    editor.press("Control+Enter")
    expect(status(page)).to_contain_text('NOT_FOUND: user "nobody-here" not found')
    expect(page.locator("#responses li")).to_have_count(0)


def test_bulk_add_users_sent_one_message_at_a_time_reports_the_bad_row(page, server):
    open_method(page, server, "BulkAddUsers")
    sent = page.locator("#timeline tr.out", has_text="message")
    for i, user in enumerate([{"first_name": "Ada"}, {"first_name": " "}, {"first_name": "Grace"}]):
        send(page, user)
        # Each goes out now, on the open stream.
        expect(sent).to_have_count(i + 1)
    expect(status(page)).to_have_text("open")
    page.get_by_role("button", name="End stream").click()
    expect(status(page)).to_have_text("OK")
    reply = page.locator("#responses")
    expect(reply).to_contain_text('"added": "2"')
    expect(reply).to_contain_text('"failed": "1"')
    expect(reply).to_contain_text('"index": "1"')
    expect(reply).to_contain_text("first_name")
    expect(page.locator("#grpcurl")).to_contain_text("-d @")


def test_list_users_shows_messages_arriving_counted_and_bounded(page, server, pb):
    user_pb2, user_pb2_grpc = pb
    with server.channel() as channel:
        stub = user_pb2_grpc.UserServiceStub(channel)
        users = (user_pb2.User(id=f"list-{i:04}", first_name="Lin") for i in range(500))
        assert stub.BulkAddUsers(users, timeout=DEADLINE).added == 500
    open_method(page, server, "ListUsers")
    send(page, {"after_id": "list-", "limit": 500})
    expect(status(page)).to_have_text("OK")
    expect(page.locator("#counter")).to_contain_text("500 messages")
    # 200 rows, the rest counted.
    expect(page.locator("#responses li")).to_have_count(200)
    expect(page.locator("#counter")).to_contain_text("300 more not shown")
    expect(page.locator("#counter")).to_contain_text("/s")


def test_sync_users_shows_acks_and_another_clients_changes_while_open(page, server, pb):
    user_pb2, user_pb2_grpc = pb
    open_method(page, server, "SyncUsers")
    expect(page.locator("#feed-status")).to_contain_text("watching")
    send(page, {"request_id": 1, "upsert": {"id": "sync-ada", "first_name": "Ada", "last_name": "Lovelace"}})
    expect(page.locator("#responses li", has_text="ack")).to_have_count(1)
    # Indented, as the editor shows a request.
    ack = page.locator("#responses li", has_text="ack").locator("pre").text_content()
    assert ack.startswith('{\n  "requestId": "1",\n  "seq": "'), ack
    # Another client (grpcio) writes: its Change appears on the open stream
    # and in the live feed.
    with server.channel() as channel:
        stub = user_pb2_grpc.UserServiceStub(channel)
        stub.AddUser(user_pb2.User(id="sync-grace", first_name="Grace", last_name="Hopper"), timeout=DEADLINE)
    expect(page.locator("#responses li", has_text="sync-grace")).to_have_count(1)
    expect(page.get_by_role("list", name="Changes")).to_contain_text("sync-grace")
    expect(status(page)).to_have_text("open")
    send(page, {"request_id": 2, "upsert": {"id": "sync-ada", "first_name": "Ada", "address": "London"}})
    expect(page.locator("#responses li", has_text="ack")).to_have_count(2)
    shot = os.environ.get("PLAYGROUND_SCREENSHOT")
    if shot:
        page.screenshot(path=shot)
    page.get_by_role("button", name="End stream").click()
    expect(status(page)).to_have_text("OK")


def test_cancel_ends_a_call_with_cancelled(page, server):
    open_method(page, server, "SyncUsers")
    send(page)
    expect(page.locator("#responses li", has_text="ack")).to_have_count(1)
    page.get_by_role("button", name="Cancel").click()
    expect(status(page)).to_contain_text("CANCELLED")
    expect(page.get_by_role("button", name="Cancel")).to_be_disabled()


def test_an_expired_deadline_shows_deadline_exceeded(page, server):
    open_method(page, server, "SyncUsers")
    page.get_by_label("Deadline (seconds)").fill("0.3")
    send(page)
    expect(status(page)).to_contain_text("DEADLINE_EXCEEDED")
    expect(page.locator("#timeline")).to_contain_text("status DEADLINE_EXCEEDED")
    expect(page.locator("#grpcurl")).to_contain_text("-max-time 0.3")


def test_a_request_that_does_not_fit_its_type_names_the_field_and_sends_nothing(page, server, pb):
    open_method(page, server, "AddUser")
    send(page, {"first_nme": "Ada"})
    expect(page.get_by_role("alert")).to_contain_text("first_nme: unknown field in grpcUser.User")
    expect(timeline_rows(page)).to_have_count(0)
    # Malformed JSON: caught on the page, nothing sent either.
    page.get_by_label("Request message (JSON)").fill('{"first_name": ')
    page.get_by_role("button", name="Send", exact=True).click()
    expect(page.get_by_role("alert")).to_contain_text("does not hold JSON")


def test_metadata_goes_with_the_call_and_into_the_command(page, server):
    open_method(page, server, "AddUser")
    page.get_by_role("button", name="Add metadata").click()
    page.get_by_label("Metadata name 1").fill("x-lesson")
    page.get_by_label("Metadata value 1").fill("one")
    send(page, {"first_name": "Meta"})
    expect(status(page)).to_have_text("OK")
    expect(page.locator("#grpcurl")).to_contain_text("-H 'x-lesson: one'")


def test_health_is_shown(page, server):
    page.goto(server.url)
    expect(page.get_by_role("status", name="Server health")).to_have_text("health: SERVING")


def test_a_token_protected_server_lists_its_methods_only_once_given_the_token(page, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    server = Server("--auth-token-file", str(token))
    try:
        page.goto(server.url)
        expect(page.get_by_role("heading", name="This server needs a bearer token")).to_be_visible()
        methods = page.get_by_role("navigation", name="Methods").get_by_role("button")
        # Health is open to all, as for any client; the methods are not.
        expect(page.get_by_role("status", name="Server health")).to_have_text("health: SERVING")
        expect(methods).to_have_count(0)
        expect(page.locator("#feed-status")).to_contain_text("give the token")
        # A wrong token: the reflection call's status, and the page asks again.
        field = page.get_by_role("textbox", name="Bearer token")
        field.fill("wrong-token")
        page.get_by_role("button", name="Use token").click()
        expect(page.locator("#token-error")).to_have_text("UNAUTHENTICATED: invalid bearer token")
        expect(field).to_be_focused()
        expect(methods).to_have_count(0)
        # The right one: the methods appear, and calls carry it.
        field.fill("s3cret-token")
        page.get_by_role("button", name="Use token").click()
        expect(page.get_by_role("heading", name="Token accepted: every call carries it")).to_be_visible()
        expect(page.locator("#token-error")).to_have_text("")
        page.get_by_role("button", name="AddUser", exact=True).click()
        send(page, {"first_name": "Ada"})
        expect(status(page)).to_have_text("OK")
        expect(page.locator("#grpcurl")).to_contain_text('-H "authorization: Bearer $(cat token)"')
        expect(page.locator("#feed-status")).to_contain_text("watching")
    finally:
        server.stop()


def test_usable_at_phone_width(browser, server):
    context = browser.new_context(viewport={"width": 390, "height": 844})
    page = context.new_page()
    page.set_default_timeout(PATIENCE_MS)
    try:
        open_method(page, server, "AddUser")
        send(page)
        expect(status(page)).to_have_text("OK")
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"the page is {width} px wide at 390"
    finally:
        context.close()

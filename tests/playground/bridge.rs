//! Calls through the bridge, as the page makes them: real calls into the
//! server, with every event the page shows.

use serde_json::{Value, json};
use test_support::{user_named, within};
use tokio_tungstenite::tungstenite::Message;
use user_service::{Config, auth::AuthToken, gauges::Limit, proto};

use super::ws::{Page, server, shape};

const ADD_USER: &str = "grpcUser.UserService/AddUser";
const GET_USER: &str = "grpcUser.UserService/GetUser";
const SYNC_USERS: &str = "grpcUser.UserService/SyncUsers";
const BULK_ADD_USERS: &str = "grpcUser.UserService/BulkAddUsers";

fn received_message(event: &Value) -> bool {
    event["type"] == "received" && event["part"] == "message"
}

#[tokio::test]
async fn a_unary_call_shows_every_part_of_the_call_and_stores_for_real() {
    let server = server(Config::default()).await;
    let mut page = Page::open(server.addr).await;
    page.start(1, ADD_USER, Some(json!({"id": "ada", "firstName": "Ada"})))
        .await;
    let events = page.until_status(1).await;
    assert_eq!(
        shape(&events),
        [
            "sent headers",
            "sent message",
            "sent end",
            "received headers",
            "received message",
            "received trailers",
            "status"
        ]
    );
    assert_eq!(events[0]["metadata"]["content-type"], "application/grpc");
    // Sizes on the wire: "ada" and "Ada" in protobuf (10 bytes), plus the
    // 5-byte gRPC prefix.
    assert_eq!(events[1]["size"], 15);
    assert_eq!(events[4]["message"]["user"]["firstName"], "Ada");
    assert_eq!(events[4]["message"]["user"]["version"], "1");
    assert_eq!(events[6]["code_name"], "OK");
    assert!(events[6]["t_ms"].as_f64().unwrap() >= events[0]["t_ms"].as_f64().unwrap());

    // Stored: another client reads it.
    let mut client = server.client().await;
    let ada = client
        .get_user(proto::GetUserRequest { id: "ada".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ada.first_name, "Ada");

    // An unknown id: Trailers-Only, NOT_FOUND.
    page.start(2, GET_USER, Some(json!({"id": "nobody"}))).await;
    let events = page.until_status(2).await;
    assert_eq!(
        shape(&events),
        [
            "sent headers",
            "sent message",
            "sent end",
            "received trailers",
            "status"
        ]
    );
    assert_eq!(events[4]["code"], 5);
    assert_eq!(events[4]["code_name"], "NOT_FOUND");
}

#[tokio::test]
async fn error_details_are_decoded() {
    let server = server(Config::default()).await;
    let mut page = Page::open(server.addr).await;
    page.start(1, ADD_USER, Some(json!({"first_name": "  "})))
        .await;
    let status = page.until_status(1).await.pop().unwrap();
    assert_eq!(status["code_name"], "INVALID_ARGUMENT");
    let detail = &status["details"][0];
    assert_eq!(detail["@type"], "type.googleapis.com/google.rpc.BadRequest");
    assert_eq!(detail["fieldViolations"][0]["field"], "first_name");
}

#[tokio::test]
async fn a_request_that_does_not_fit_its_type_names_the_field_and_sends_nothing() {
    let server = server(Config::default()).await;
    let mut page = Page::open(server.addr).await;
    for (message, field, says) in [
        (json!({"first_nme": "Ada"}), "first_nme", "unknown field"),
        (
            json!({"first_name": 5}),
            "first_name",
            "expected a string, got a number",
        ),
        (
            json!({"verified": "yes"}),
            "verified",
            "expected true or false",
        ),
        (
            json!({"first_name": "A", "version": -1}),
            "version",
            "out of range",
        ),
        (json!([1]), "", "expected a JSON object"),
    ] {
        page.start(1, ADD_USER, Some(message.clone())).await;
        let error = page.next().await;
        assert_eq!(error["type"], "error", "{message}");
        assert_eq!(error["id"], 1);
        assert_eq!(error["field"], field, "{error}");
        let text = error["error"].as_str().unwrap();
        assert!(
            text.contains(says) && text.starts_with("nothing sent"),
            "{text}"
        );
    }
    // A oneof with both alternatives, in a stream: the call stays open.
    page.start(2, SYNC_USERS, None).await;
    page.until(2, |e| e["part"] == "headers" && e["type"] == "received")
        .await;
    page.send(json!({"type": "send", "id": 2, "message": {"upsert": {"first_name": "A"}, "deleteId": "x"}}))
        .await;
    let error = page.next().await;
    assert_eq!(error["type"], "error");
    // Named by the field found second; the message names both.
    let text = error["error"].as_str().unwrap();
    assert!(
        text.contains("upsert") && text.contains("deleteId") && text.contains("oneof op"),
        "{text}"
    );
    // Nothing was sent, so nothing was stored; the stream still works.
    let mut client = server.client().await;
    assert!(test_support::list_all(&mut client).await.is_empty());
    page.send(json!({"type": "send", "id": 2, "message": {"requestId": 7, "upsert": {"first_name": "A"}}}))
        .await;
    let ack = page.until(2, received_message).await;
    assert_eq!(ack["message"]["ack"]["requestId"], "7");
}

#[tokio::test]
async fn a_bidi_stream_shows_acks_and_other_clients_changes_as_they_happen() {
    let server = server(Config::default()).await;
    let mut page = Page::open(server.addr).await;
    page.start(1, SYNC_USERS, None).await;
    page.until(1, |e| e["type"] == "received" && e["part"] == "headers")
        .await;
    page.send(json!({"type": "send", "id": 1, "message": {"requestId": 1, "upsert": {"id": "ada", "firstName": "Ada"}}}))
        .await;
    let sent = page
        .until(1, |e| e["type"] == "sent" && e["part"] == "message")
        .await;
    assert_eq!(sent["message"]["upsert"]["id"], "ada");
    let ack = page.until(1, received_message).await;
    assert_eq!(ack["message"]["ack"]["seq"], "1");
    let change = page.until(1, received_message).await;
    assert_eq!(change["message"]["change"]["kind"], "CREATED");

    // Another client's write reaches the open stream.
    let mut client = server.client().await;
    client.add_user(user_named("grace", "Grace")).await.unwrap();
    let change = page.until(1, received_message).await;
    assert_eq!(change["message"]["change"]["user"]["id"], "grace");
    assert_eq!(change["message"]["change"]["seq"], "2");

    // Half-close: the server ends the call with OK.
    page.send(json!({"type": "end", "id": 1})).await;
    let events = page.until_status(1).await;
    assert!(
        shape(&events).contains(&"sent end".to_owned()),
        "{events:?}"
    );
    assert_eq!(events.last().unwrap()["code_name"], "OK");
}

#[tokio::test]
async fn a_client_stream_sent_one_message_at_a_time_reports_each_row() {
    let server = server(Config::default()).await;
    let mut page = Page::open(server.addr).await;
    page.start(1, BULK_ADD_USERS, None).await;
    for user in [
        json!({"firstName": "Ada"}),
        json!({"firstName": ""}),
        json!({"firstName": "Grace"}),
    ] {
        page.send(json!({"type": "send", "id": 1, "message": user}))
            .await;
        page.until(1, |e| e["type"] == "sent" && e["part"] == "message")
            .await;
    }
    page.send(json!({"type": "end", "id": 1})).await;
    let events = page.until_status(1).await;
    let reply = events.iter().find(|e| received_message(e)).unwrap();
    assert_eq!(reply["message"]["added"], "2");
    assert_eq!(reply["message"]["failed"], "1");
    assert_eq!(reply["message"]["errors"][0]["index"], "1");
    assert_eq!(events.last().unwrap()["code_name"], "OK");
}

#[tokio::test]
async fn cancel_ends_a_call_with_cancelled_and_a_deadline_with_deadline_exceeded() {
    let server = server(Config::default()).await;
    let mut page = Page::open(server.addr).await;
    page.start(1, SYNC_USERS, None).await;
    page.until(1, |e| e["type"] == "received").await;
    page.send(json!({"type": "cancel", "id": 1})).await;
    let status = page.until_status(1).await.pop().unwrap();
    assert_eq!(status["code_name"], "CANCELLED");
    assert_eq!(status["local"], true);

    // A stream that would stay open, with a 200 ms deadline: the server
    // ends it.
    page.send(json!({"type": "start", "id": 2, "method": SYNC_USERS, "timeout_ms": 200}))
        .await;
    let events = page.until_status(2).await;
    assert_eq!(events[0]["metadata"]["grpc-timeout"], "200m");
    let status = events.last().unwrap();
    assert_eq!(status["code_name"], "DEADLINE_EXCEEDED");
    assert!(status.get("local").is_none(), "{status}");

    // The server counts no call still in flight.
    within("the calls to end", async {
        while server.gauges.in_flight_calls() > 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;
}

#[tokio::test]
async fn with_a_token_calls_without_it_are_unauthenticated_and_with_it_succeed() {
    let config = Config {
        auth_token: Some(AuthToken::new("s3cret").unwrap()),
        ..Config::default()
    };
    let server = server(config).await;
    let mut page = Page::open(server.addr).await;
    assert_eq!(page.hello["auth"], true);
    page.start(1, ADD_USER, Some(json!({"firstName": "Ada"})))
        .await;
    let status = page.until_status(1).await.pop().unwrap();
    assert_eq!(status["code_name"], "UNAUTHENTICATED");
    page.send(json!({
        "type": "start", "id": 2, "method": ADD_USER,
        "metadata": {"authorization": "Bearer s3cret"},
        "message": {"firstName": "Ada"},
    }))
    .await;
    let events = page.until_status(2).await;
    // The token is not echoed back.
    assert_eq!(events[0]["metadata"]["authorization"], "Bearer ••••••");
    assert_eq!(events.last().unwrap()["code_name"], "OK");
}

#[tokio::test]
async fn with_a_token_the_services_are_described_only_by_a_reflection_call_that_carries_it() {
    let config = Config {
        auth_token: Some(AuthToken::new("s3cret").unwrap()),
        ..Config::default()
    };
    let server = server(config).await;
    let mut page = Page::open(server.addr).await;
    // The hello says that a token is needed, and the limits; it describes
    // nothing.
    assert_eq!(page.hello["auth"], true);
    assert_eq!(page.hello["limits"]["calls_per_websocket"], 16);
    assert!(
        page.hello.get("catalogue").is_none(),
        "the hello describes the services"
    );

    // Nor does a request that does not fit its type: no field is named.
    page.start(1, ADD_USER, Some(json!({"first_nme": "Ada"})))
        .await;
    let error = page.next().await;
    assert_eq!(error["type"], "error");
    assert!(error.get("field").is_none(), "{error}");
    let text = error["error"].as_str().unwrap();
    assert!(
        text.starts_with("nothing sent") && !text.contains("first_name"),
        "{text}"
    );

    // Without the token, then with a wrong one: the reflection call is
    // refused by the server's own check, and its status is all the page
    // gets.
    let refused = server.gauges.refused(Limit::Auth);
    for (id, metadata, says) in [
        (2, json!({}), "missing bearer token"),
        (
            3,
            json!({"authorization": "Bearer s3cre"}),
            "invalid bearer token",
        ),
    ] {
        page.send(json!({"type": "describe", "id": id, "metadata": metadata}))
            .await;
        let status = page.next().await;
        assert_eq!(status["type"], "status", "{status}");
        assert_eq!(status["id"], id);
        assert_eq!(status["code"], 16);
        assert_eq!(status["code_name"], "UNAUTHENTICATED");
        assert_eq!(status["message"], says);
    }
    assert_eq!(server.gauges.refused(Limit::Auth), refused + 2);

    // With the token: the catalogue of the services reflection listed,
    // the same a page gets in its hello from a server without a token,
    // then the call's status.
    page.send(json!({
        "type": "describe", "id": 4,
        "metadata": {"authorization": "Bearer s3cret"},
    }))
    .await;
    let described = page.next().await;
    assert_eq!(described["type"], "catalogue", "{described}");
    assert_eq!(described["id"], 4);
    let catalogue = &described["catalogue"];
    let names: Vec<&str> = catalogue["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|service| service["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "grpcUser.UserService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection"
        ]
    );
    let open = super::ws::server(Config::default()).await;
    assert_eq!(*catalogue, Page::open(open.addr).await.hello["catalogue"]);
    let status = page.next().await;
    assert_eq!(status["type"], "status");
    assert_eq!(status["id"], 4);
    assert_eq!(status["code_name"], "OK");
    assert_eq!(server.gauges.refused(Limit::Auth), refused + 2);

    // Now a mistake is named by field.
    page.start(5, ADD_USER, Some(json!({"first_nme": "Ada"})))
        .await;
    let error = page.next().await;
    assert_eq!(error["field"], "first_nme", "{error}");
}

#[tokio::test]
async fn only_this_servers_methods_can_be_called() {
    let server = server(Config::default()).await;
    let mut page = Page::open(server.addr).await;
    for method in [
        "other.Service/Call",
        "grpcUser.UserService/Nothing",
        "//evil.example/x",
    ] {
        page.start(1, method, Some(json!({}))).await;
        let error = page.next().await;
        assert_eq!(error["type"], "error");
        assert!(
            error["error"].as_str().unwrap().contains("unknown method"),
            "{error}"
        );
    }
    // Health: a real call too.
    page.start(2, "grpc.health.v1.Health/Check", Some(json!({})))
        .await;
    let events = page.until_status(2).await;
    let reply = events.iter().find(|e| received_message(e)).unwrap();
    assert_eq!(reply["message"]["status"], "SERVING");
}

#[tokio::test]
async fn bad_commands_get_clear_errors_and_the_other_calls_go_on() {
    let server = server(Config::default()).await;
    let mut page = Page::open(server.addr).await;
    page.start(1, SYNC_USERS, None).await;
    page.until(1, |e| e["type"] == "received").await;
    for (bad, says) in [
        (Message::text("{not json"), "not JSON"),
        (
            Message::text(r#"{"type": "launch", "id": 9}"#),
            "not a command",
        ),
        (
            Message::text(r#"{"type": "send", "id": 9, "message": {}}"#),
            "no open call 9",
        ),
        (Message::binary(vec![0, 1, 2]), "binary messages"),
        (
            Message::text(r#"{"type": "describe", "id": 9, "metadata": {"X-Token": "1"}}"#),
            "lowercase",
        ),
        (
            Message::text(r#"{"type": "describe", "id": 1}"#),
            "call 1 is already open",
        ),
    ] {
        page.socket.send_message(bad).await;
        let error = page.next().await;
        assert_eq!(error["type"], "error");
        assert!(error["error"].as_str().unwrap().contains(says), "{error}");
    }
    page.send(json!({"type": "send", "id": 1, "message": {"requestId": 1, "deleteId": "nobody"}}))
        .await;
    let ack = page.until(1, received_message).await;
    assert_eq!(ack["message"]["ack"]["code"], 5);
}

trait SendMessage {
    async fn send_message(&mut self, message: Message);
}

impl SendMessage for super::ws::Socket {
    async fn send_message(&mut self, message: Message) {
        use futures::SinkExt as _;
        self.send(message).await.unwrap();
    }
}

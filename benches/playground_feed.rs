//! The time from an upsert's commit to its Change on the playground's
//! page, through the WebSocket bridge, at a steady rate of changes.
//!
//! A gRPC client sends SyncUsers upserts at `FEED_RATE` a second; its Ack,
//! sent once the change is committed, marks the commit. A page (a
//! WebSocket client, as the page's live feed) watches SyncUsers through
//! the bridge; each Change's arrival is matched to its Ack by seq. Prints
//! the percentiles of (Change on the page - Ack at the client), and of
//! (Change on the page - upsert sent). Run by `bench/playground.sh` against
//! a server at `PLAYGROUND_ADDR`.

use std::{collections::HashMap, time::Duration};

use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest as _, http::HeaderValue};
use user_service::proto::{
    SyncRequest, User, sync_request::Op, sync_response::Event,
    user_service_client::UserServiceClient,
};

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() {
    let Ok(addr) = std::env::var("PLAYGROUND_ADDR") else {
        eprintln!("set PLAYGROUND_ADDR to a server's address (bench/playground.sh does)");
        return;
    };
    let rate: u64 = env("FEED_RATE", 1000);
    let seconds: u64 = env("FEED_SECONDS", 10);
    let total = rate * seconds;

    // The page: its WebSocket, and the live feed's SyncUsers.
    let mut request = format!("ws://{addr}/ws").into_client_request().unwrap();
    request.headers_mut().insert(
        "origin",
        HeaderValue::from_str(&format!("http://{addr}")).unwrap(),
    );
    let (mut page, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let feed = json!({"type": "start", "id": 1, "method": "grpcUser.UserService/SyncUsers"});
    page.send(Message::text(feed.to_string())).await.unwrap();
    // Open once its response headers are in.
    while let Some(Ok(message)) = page.next().await {
        if let Message::Text(text) = message {
            let event: Value = serde_json::from_str(&text).unwrap();
            if event["type"] == "received" && event["part"] == "headers" {
                break;
            }
        }
    }

    let mut client = UserServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let (requests, stream) = tokio::sync::mpsc::channel(1024);
    let mut replies = client
        .sync_users(tokio_stream::wrappers::ReceiverStream::new(stream))
        .await
        .unwrap()
        .into_inner();

    let start = Instant::now();
    let writer = tokio::spawn(async move {
        let mut sent_at = HashMap::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1) / rate as u32);
        for i in 0..total {
            tick.tick().await;
            sent_at.insert(i + 1, Instant::now());
            let upsert = SyncRequest {
                request_id: i + 1,
                op: Some(Op::Upsert(User {
                    id: format!("feed-{}", i % 1000),
                    first_name: "Ada".into(),
                    ..Default::default()
                })),
                expected_version: 0,
            };
            requests.send(upsert).await.unwrap();
        }
        sent_at
    });
    // Acks at the client: request id -> (seq, when).
    let acks = tokio::spawn(async move {
        let mut acked = HashMap::new();
        while acked.len() < total as usize {
            let Some(reply) = replies.message().await.unwrap() else {
                break;
            };
            if let Some(Event::Ack(ack)) = reply.event {
                acked.insert(ack.seq, (ack.request_id, Instant::now()));
            }
        }
        acked
    });
    // Changes on the page, by seq.
    let mut seen = HashMap::new();
    while seen.len() < total as usize {
        let Some(Ok(message)) = page.next().await else {
            break;
        };
        let Message::Text(text) = message else {
            continue;
        };
        let event: Value = serde_json::from_str(&text).unwrap();
        if let Some(seq) = event["message"]["change"]["seq"]
            .as_str()
            .and_then(|seq| seq.parse::<u64>().ok())
        {
            seen.insert(seq, Instant::now());
        }
    }
    let elapsed = start.elapsed();
    let sent_at = writer.await.unwrap();
    let acked = acks.await.unwrap();
    let mut after_commit = Vec::new();
    let mut after_send = Vec::new();
    for (seq, on_page) in &seen {
        if let Some((request_id, acked_at)) = acked.get(seq) {
            after_commit.push(on_page.saturating_duration_since(*acked_at));
            after_send.push(on_page.duration_since(sent_at[request_id]));
        }
    }
    println!(
        "{} changes at {rate}/s over {:.1} s; {} seen on the page",
        total,
        elapsed.as_secs_f64(),
        seen.len()
    );
    for (what, mut times) in [
        (
            "commit (Ack at the client) to Change on the page",
            after_commit,
        ),
        ("upsert sent to Change on the page", after_send),
    ] {
        times.sort();
        let at = |p: f64| times[((times.len() - 1) as f64 * p) as usize];
        println!(
            "{what}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            at(0.50).as_secs_f64() * 1000.0,
            at(0.99).as_secs_f64() * 1000.0,
            at(1.0).as_secs_f64() * 1000.0
        );
    }
}

//! A WebSocket client that speaks the playground's protocol as its page
//! does, and starts servers for it.

use std::net::SocketAddr;

use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use test_support::{PATIENCE, TestServer};
use tokio::net::TcpStream;
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{self, Message, client::IntoClientRequest as _, http::HeaderValue},
};
use user_service::{Config, MemoryStore};

pub type Socket = WebSocketStream<TcpStream>;

/// A server with the playground on (the default) over a fresh memory store.
pub async fn server(config: Config) -> TestServer {
    TestServer::start_with(MemoryStore::new(1024), config).await
}

/// Opens the WebSocket of the page at `addr`, as a page from `origin`
/// would (`None`: no Origin header, as a client that is not a page).
pub async fn connect(addr: SocketAddr, origin: Option<&str>) -> Result<Socket, tungstenite::Error> {
    let mut request = format!("ws://{addr}/ws").into_client_request().unwrap();
    if let Some(origin) = origin {
        request
            .headers_mut()
            .insert("origin", HeaderValue::from_str(origin).unwrap());
    }
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (socket, _) = tokio_tungstenite::client_async(request, tcp).await?;
    Ok(socket)
}

/// A page's WebSocket, past its hello.
pub struct Page {
    pub socket: Socket,
    pub hello: Value,
}

impl Page {
    pub async fn open(addr: SocketAddr) -> Page {
        let socket = connect(addr, Some(&format!("http://{addr}")))
            .await
            .expect("the page's own origin is accepted");
        let mut page = Page {
            socket,
            hello: Value::Null,
        };
        page.hello = page.next().await;
        assert_eq!(page.hello["type"], "hello");
        page
    }

    pub async fn send(&mut self, command: Value) {
        self.socket
            .send(Message::text(command.to_string()))
            .await
            .expect("send a command");
    }

    /// The next event; fails on anything but a text message.
    pub async fn next(&mut self) -> Value {
        match self.message().await {
            Message::Text(text) => serde_json::from_str(&text).expect("events are JSON"),
            other => panic!("expected an event, got {other:?}"),
        }
    }

    /// The next WebSocket message, whatever it is.
    pub async fn message(&mut self) -> Message {
        let next = tokio::time::timeout(PATIENCE, self.socket.next());
        next.await
            .expect("an event in time")
            .expect("the WebSocket open")
            .expect("a WebSocket message")
    }

    /// Starts a call of `method` with `message`.
    pub async fn start(&mut self, id: u64, method: &str, message: Option<Value>) {
        let mut start = json!({ "type": "start", "id": id, "method": method });
        if let Some(message) = message {
            start["message"] = message;
        }
        self.send(start).await;
    }

    /// The events of call `id` up to its status (events of other calls
    /// are skipped).
    pub async fn until_status(&mut self, id: u64) -> Vec<Value> {
        let mut events = Vec::new();
        loop {
            let event = self.next().await;
            if event["id"] != id {
                continue;
            }
            let done = event["type"] == "status";
            events.push(event);
            if done {
                return events;
            }
        }
    }

    /// The next event of call `id` that `matches`, skipping the others.
    pub async fn until(&mut self, id: u64, matches: impl Fn(&Value) -> bool) -> Value {
        loop {
            let event = self.next().await;
            if event["id"] == id && matches(&event) {
                return event;
            }
            assert!(
                !(event["id"] == id && event["type"] == "status"),
                "the call ended first: {event}"
            );
        }
    }
}

/// The `(type, part)` of each event, for comparing sequences.
pub fn shape(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| match e["part"].as_str() {
            Some(part) => format!("{} {part}", e["type"].as_str().unwrap()),
            None => e["type"].as_str().unwrap().to_owned(),
        })
        .collect()
}

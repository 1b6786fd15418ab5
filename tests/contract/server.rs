//! The server around the service: health, reflection, concurrency, shutdown.

use std::{collections::HashSet, time::Duration};

use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::{v1, v1alpha};
use user_service::{
    Config,
    proto::{self, SyncRequest},
};

use test_support::{Backend, FEED_CAPACITY, list_all, request_stream, user, within};

test_support::for_each_backend!(
    health_reports_serving,
    reflection_lists_the_service_in_both_versions,
    concurrent_writers_lose_nothing,
    shutdown_ends_open_streams_and_returns,
);

async fn health_reports_serving(backend: Backend) {
    let server = backend.start().await;
    let mut health = HealthClient::new(server.channel().await);
    for service in ["", "grpcUser.UserService"] {
        let reply = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.status(), ServingStatus::Serving, "{service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.Such".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
}

async fn reflection_lists_the_service_in_both_versions(backend: Backend) {
    let server = backend.start().await;

    let mut client =
        v1::server_reflection_client::ServerReflectionClient::new(server.channel().await);
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut replies = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.message().await.unwrap().unwrap();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        reply.message_response
    else {
        panic!("unexpected reply {reply:?}")
    };
    let names: HashSet<String> = list.service.into_iter().map(|s| s.name).collect();
    for service in ["grpcUser.UserService", "grpc.health.v1.Health"] {
        assert!(names.contains(service), "{service} not in {names:?}");
    }

    let mut client =
        v1alpha::server_reflection_client::ServerReflectionClient::new(server.channel().await);
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                "grpcUser.UserService".into(),
            ),
        ),
    };
    let mut replies = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.message().await.unwrap().unwrap();
    let Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(files)) =
        reply.message_response
    else {
        panic!("unexpected reply {reply:?}")
    };
    assert!(!files.file_descriptor_proto.is_empty());
}

async fn concurrent_writers_lose_nothing(backend: Backend) {
    const WRITERS: usize = 32;
    const EACH: usize = 50;
    let server = backend.start().await;
    let mut watcher = server.client().await;
    let (_keep_open, requests) = request_stream::<SyncRequest>();
    let mut changes = watcher.sync_users(requests).await.unwrap().into_inner();

    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let mut client = server.client().await;
        writers.push(tokio::spawn(async move {
            for i in 0..EACH {
                client.add_user(user(&format!("w{w}-{i}"))).await.unwrap();
            }
        }));
    }
    for writer in writers {
        within("a writer", writer).await.unwrap();
    }

    let mut client = server.client().await;
    let users = list_all(&mut client).await;
    assert_eq!(users.len(), WRITERS * EACH);
    let names: HashSet<&str> = users.iter().map(|u| u.first_name.as_str()).collect();
    assert_eq!(names.len(), WRITERS * EACH, "every write stored once");
    // The feed saw every commit, with a gapless seq.
    for seq in 1..=(WRITERS * EACH) as u64 {
        let response = within("a change", changes.message())
            .await
            .unwrap()
            .unwrap();
        let Some(proto::sync_response::Event::Change(change)) = response.event else {
            panic!("a change expected");
        };
        assert_eq!(change.seq, seq);
    }
}

async fn shutdown_ends_open_streams_and_returns(backend: Backend) {
    // A grace period far longer than the test's patience: the server must
    // stop because its calls ended, not because it gave up on them.
    let config = Config {
        shutdown_grace: Duration::from_secs(600),
        ..Config::default()
    };
    let mut server = backend.start_with_config(FEED_CAPACITY, config).await;
    // Every backend runs with the config it was given (the SQLite one once
    // ran with the default 10 s and could pass for the wrong reason).
    assert_eq!(server.shutdown_grace, Duration::from_secs(600));
    let mut client = server.client().await;
    let rows: Vec<proto::User> = (0..5000).map(|i| user(&format!("u{i}"))).collect();
    client
        .bulk_add_users(tokio_stream::iter(rows))
        .await
        .unwrap();

    // A listing stalled by flow control, an idle SyncUsers stream and an
    // import whose client has not finished: all three must end.
    let mut reader = server.small_window_client().await;
    let mut listing = reader
        .list_users(proto::ListUsersRequest::default())
        .await
        .unwrap()
        .into_inner();
    within("the first user", listing.message())
        .await
        .unwrap()
        .unwrap();
    let (_keep_open, requests) = request_stream::<SyncRequest>();
    let mut sync = client.sync_users(requests).await.unwrap().into_inner();
    let (bulk_tx, rows) = request_stream::<proto::User>();
    bulk_tx.send(user("in flight")).await.unwrap();
    let mut bulk_client = server.client().await;
    let bulk = tokio::spawn(async move { bulk_client.bulk_add_users(rows).await });
    // And the other services' streams, which tonic would keep open: a
    // health Watch and a reflection stream whose client has not finished.
    let mut health = HealthClient::new(server.channel().await);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "grpcUser.UserService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = within("the first health status", watch.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);
    let mut reflection =
        v1::server_reflection_client::ServerReflectionClient::new(server.channel().await);
    let (reflection_tx, reflection_requests) = request_stream();
    reflection_tx
        .send(v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            )),
        })
        .await
        .unwrap();
    let mut reflection = reflection
        .server_reflection_info(reflection_requests)
        .await
        .unwrap()
        .into_inner();
    within("a reflection reply", reflection.message())
        .await
        .unwrap()
        .unwrap();

    server.begin_shutdown();

    // Messages already on their way may come first (the Change of the row
    // in flight, users in the listing's window); then the status.
    let mut listed = 1;
    let status = loop {
        match within("the listing to end", listing.message()).await {
            Ok(Some(_)) => listed += 1,
            Ok(None) => panic!("the listing ended with OK after {listed} users"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::Unavailable);
    assert!(listed < 5000, "the listing was cut short, not completed");
    let status = loop {
        match within("the sync stream to end", sync.message()).await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the sync stream ended with OK"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::Unavailable);
    let status = within("the bulk call to end", bulk)
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    // Watchers learn that the service stopped serving, then the stream ends.
    let last = within("NOT_SERVING", watch.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(last.status(), ServingStatus::NotServing);
    let status = within("the health watch to end", watch.message())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    let status = within("the reflection stream to end", reflection.message())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    drop((bulk_tx, reflection_tx));
    // `run` returns well within its grace period (the streams ended on their own).
    within("the server to stop", server.stop()).await.unwrap();
}

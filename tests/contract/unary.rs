//! AddUser and GetUser.

use tonic::Code;
use tonic_types::StatusExt;
use user_service::{proto, service::USER_SAVED};

use test_support::{Backend, user, user_with_id};

test_support::for_each_backend!(
    add_user_returns_the_stored_user,
    add_user_ignores_a_client_version,
    add_user_keeps_a_client_id_and_rejects_it_twice,
    server_ids_are_uuid_v7_in_creation_order,
    invalid_users_are_rejected_with_the_field_named,
    get_user_returns_what_was_stored,
    get_user_errors,
);

async fn add_user_returns_the_stored_user(backend: Backend) {
    let server = backend.start().await;
    let mut client = server.client().await;
    let reply = client.add_user(user("John")).await.unwrap().into_inner();
    assert_eq!(reply.code, 200);
    assert_eq!(reply.message, USER_SAVED);
    let stored = reply.user.expect("the stored user");
    assert_eq!(stored.first_name, "John");
    assert_eq!(stored.last_name, "Doe");
    assert_eq!(stored.address, "1 Long Street, Springfield");
    assert_eq!(stored.version, 1);
    assert!(!stored.id.is_empty());
}

async fn add_user_ignores_a_client_version(backend: Backend) {
    let server = backend.start().await;
    let mut client = server.client().await;
    let sent = proto::User {
        version: 42,
        ..user("John")
    };
    let stored = client
        .add_user(sent)
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(stored.version, 1);
}

async fn add_user_keeps_a_client_id_and_rejects_it_twice(backend: Backend) {
    let server = backend.start().await;
    let mut client = server.client().await;
    let stored = client
        .add_user(user_with_id("import-0001"))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(stored.id, "import-0001");

    let again = client
        .add_user(user_with_id("import-0001"))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists);
    assert!(
        again.message().contains("import-0001"),
        "{}",
        again.message()
    );
}

async fn server_ids_are_uuid_v7_in_creation_order(backend: Backend) {
    let server = backend.start().await;
    let mut client = server.client().await;
    let mut previous = String::new();
    for _ in 0..200 {
        let id = client
            .add_user(user("A"))
            .await
            .unwrap()
            .into_inner()
            .user
            .unwrap()
            .id;
        let uuid = uuid::Uuid::parse_str(&id).expect("a UUID");
        assert_eq!(uuid.get_version_num(), 7);
        assert_eq!(id, uuid.hyphenated().to_string(), "lowercase hyphenated");
        assert!(id > previous, "{id} should sort after {previous}");
        previous = id;
    }
}

async fn invalid_users_are_rejected_with_the_field_named(backend: Backend) {
    let server = backend.start().await;
    let mut client = server.client().await;
    let long = "x".repeat(257);
    let cases = [
        ("first_name", user("")),
        ("first_name", user("   ")),
        ("first_name", user(&long)),
        (
            "last_name",
            proto::User {
                last_name: long.clone(),
                ..user("A")
            },
        ),
        (
            "address",
            proto::User {
                address: long.clone(),
                ..user("A")
            },
        ),
        ("id", user_with_id("has space")),
        ("id", user_with_id(&"a".repeat(65))),
        ("id", user_with_id("slash/id")),
    ];
    for (field, bad) in cases {
        let status = client.add_user(bad).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(
            status.message().contains(field),
            "{field}: {}",
            status.message()
        );
        let detail = status
            .get_details_bad_request()
            .expect("a BadRequest detail");
        assert_eq!(detail.field_violations.len(), 1);
        assert_eq!(detail.field_violations[0].field, field);
    }
    // Nothing was stored.
    assert!(test_support::list_all(&mut client).await.is_empty());
}

async fn get_user_returns_what_was_stored(backend: Backend) {
    let server = backend.start().await;
    let mut client = server.client().await;
    let sent = proto::User {
        verified: true,
        ..user("Grace")
    };
    let stored = client
        .add_user(sent)
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    let got = client
        .get_user(proto::GetUserRequest {
            id: stored.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, stored);
    assert!(got.verified);
}

async fn get_user_errors(backend: Backend) {
    let server = backend.start().await;
    let mut client = server.client().await;
    let unknown = client
        .get_user(proto::GetUserRequest {
            id: "nobody".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    let empty = client
        .get_user(proto::GetUserRequest { id: String::new() })
        .await
        .unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);
    assert_eq!(
        empty.get_details_bad_request().unwrap().field_violations[0].field,
        "id"
    );

    let malformed = client
        .get_user(proto::GetUserRequest {
            id: "no/such id".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(malformed.code(), Code::InvalidArgument);
}

//! Request decoding and validation from arbitrary bytes: nothing panics,
//! whatever validation accepts satisfies the rules, and an accepted user
//! can be stored and read back intact. The same fields as a row read back
//! from a store decode to that user exactly when validation accepts them.

#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use user_service::{
    proto,
    store::stored::{self, Columns},
    user::{NewUser, User},
    validate,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(user) = proto::User::decode(data) {
        check_user(NewUser::from(user));
    }
    if let Ok(request) = proto::SyncRequest::decode(data) {
        match request.op {
            Some(proto::sync_request::Op::Upsert(user)) => check_user(NewUser::from(user)),
            Some(proto::sync_request::Op::DeleteId(id)) => check_id(&id),
            None => {}
        }
    }
    if let Ok(request) = proto::ListUsersRequest::decode(data) {
        check_id(&request.after_id);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        check_id(text);
    }
});

fn check_user(user: NewUser) {
    check_stored(&user);
    match validate::new_user(&user) {
        Ok(()) => {
            assert!(!user.first_name.trim().is_empty());
            for field in [&user.first_name, &user.last_name, &user.address] {
                assert!(field.len() <= 256);
            }
            if !user.id.is_empty() {
                check_id(&user.id);
            }
            let stored = User::new(&user.id, &user, 1);
            assert_eq!(stored.id(), user.id);
            assert_eq!(stored.first_name(), user.first_name);
            assert_eq!(stored.last_name(), user.last_name);
            assert_eq!(stored.address(), user.address);
            assert_eq!(stored.verified(), user.verified);
        }
        // What a client would see: a status with a BadRequest detail.
        Err(invalid) => {
            let status = tonic::Status::from(invalid);
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
        }
    }
}

/// `user` as a stored row: decoded (never a panic, whatever its fields)
/// exactly when it has an id and validation accepts it.
fn check_stored(user: &NewUser) {
    let columns = Columns {
        text: [&user.id, &user.first_name, &user.last_name, &user.address],
        verified: user.verified,
        version: 1,
    };
    let valid = !user.id.is_empty() && validate::new_user(user).is_ok();
    match stored::user(columns) {
        Ok(decoded) => {
            assert!(valid, "{user:?}");
            assert_eq!(decoded, User::new(&user.id, user, 1));
        }
        Err(_) => assert!(!valid, "{user:?}"),
    }
}

fn check_id(id: &str) {
    let valid = !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    assert_eq!(validate::id("id", id).is_ok(), valid, "{id:?}");
}

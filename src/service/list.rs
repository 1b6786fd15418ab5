//! ListUsers, server streaming: one request in, a stream of users out.

use std::pin::Pin;

use futures::{Stream, StreamExt, TryStreamExt, stream};
use tonic::Status;

use crate::{
    proto,
    store::{ListFilter, Store},
    validate,
};

/// Users fetched from the store per page. A listing holds at most one page in
/// memory, however large the store, and the store is locked once per page:
/// big enough to amortise that, small enough to keep each lock hold short.
const USERS_PER_PAGE: usize = 256;

/// The response stream of one ListUsers call.
///
/// tonic polls it, and it fetches the next page only when the previous one
/// has been sent: a client that reads slowly makes the server wait instead of
/// buffer, and a client that goes away drops the stream and with it all work.
pub type UserListing = Pin<Box<dyn Stream<Item = Result<proto::User, Status>> + Send>>;

/// Checks the request and returns the listing, which starts when first polled.
pub fn listing<S: Store>(
    store: S,
    request: proto::ListUsersRequest,
) -> Result<UserListing, Status> {
    let filter = ListFilter {
        verified: request.verified,
    };
    let after = match request.after_id {
        id if id.is_empty() => None,
        id => {
            validate::id("after_id", &id)?;
            Some(id)
        }
    };
    let limit = match request.limit {
        0 => usize::MAX,
        n => n as usize,
    };
    let page_size = USERS_PER_PAGE.min(limit);

    // The state between pages is only the cursor: `Some(after)` while there
    // is more to read (`after` is `None` at the start), `None` at the end.
    let pages = stream::try_unfold(Some(after), move |cursor| {
        let store = store.clone();
        async move {
            let Some(after) = cursor else {
                return Ok(None);
            };
            let page = store.list_page(filter, after.as_deref(), page_size).await?;
            let next = page.next_after.map(Some);
            Ok::<_, Status>(Some((page.users, next)))
        }
    });

    let users = pages
        .map_ok(|page| stream::iter(page.into_iter().map(|user| Ok(proto::User::from(&user)))))
        .try_flatten()
        .take(limit);
    Ok(Box::pin(users))
}

//! Listing pages, the same in every backend.
//!
//! A listing is a sequence of pages, each one short read resuming strictly
//! after an id. A backend reads users in ascending id order after that id
//! and offers each to a [`PageScan`], which keeps those that match the
//! filter and decides where the page ends:
//!
//! - at `max` matching users, or after [`MAX_SCAN_PER_PAGE`] users looked
//!   at, matching or not: a filter that matches few users makes short (even
//!   empty) pages rather than one long scan that holds a lock or a
//!   transaction;
//! - [`Page::next_after`] is the last id looked at when more users follow,
//!   and `None` exactly when the table ends within the page, so that a
//!   listing never needs one more, empty, page to learn that it is over.
//!   The backend reads one user more than the page may look at to tell;
//! - before a stored user that cannot be read (see [`super::stored`]): the
//!   users before it make the page, and the next page, which starts with
//!   it, fails with its error. A listing then returns every user before
//!   the damaged one, and ends with an error that names it, after which a
//!   client can go on after its id.

use crate::user::User;

/// Most users one listing page looks at, matching or not (and so most users
/// it returns, whatever the caller asks): bounds the memory and the time of
/// one page, a lock hold or a query.
pub const MAX_SCAN_PER_PAGE: usize = 4096;

/// Which users a listing returns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ListFilter {
    /// `Some(v)`: only users whose `verified` equals `v`.
    pub verified: Option<bool>,
}

impl ListFilter {
    pub fn matches(&self, user: &User) -> bool {
        self.matches_verified(user.verified())
    }

    fn matches_verified(&self, verified: bool) -> bool {
        self.verified.is_none_or(|v| v == verified)
    }
}

/// One page of a listing.
#[derive(Debug, Default)]
pub struct Page {
    /// Matching users in ascending id order.
    pub users: Vec<User>,
    /// Where the next page starts (strictly after this id), or `None` when the
    /// listing has reached the end. It can be past the last user returned:
    /// users the filter skipped are not scanned again.
    pub next_after: Option<String>,
}

/// One page being read: offer it users in ascending id order until
/// [`PageScan::offer`] says the page is complete or the table ends, then
/// [`PageScan::finish`].
#[derive(Debug)]
pub struct PageScan {
    filter: ListFilter,
    max: usize,
    /// How many users the page may look at.
    scan: usize,
    scanned: usize,
    users: Vec<User>,
    /// The id of the last user the page looks at, matching or not, once it
    /// is complete: copied once a page, not once a user.
    last_id: String,
    /// Whether a user was offered past the page's end.
    more: bool,
    /// Whether the page ended before a user that could not be built.
    cut: bool,
}

impl PageScan {
    pub fn new(filter: ListFilter, max: usize) -> Self {
        let max = max.min(MAX_SCAN_PER_PAGE);
        PageScan {
            filter,
            max,
            // Unfiltered, every user looked at is returned: look at no more
            // than asked for.
            scan: if filter.verified.is_none() {
                max
            } else {
                MAX_SCAN_PER_PAGE
            },
            scanned: 0,
            users: Vec::with_capacity(max),
            last_id: String::new(),
            more: false,
            cut: false,
        }
    }

    /// How many users a backend needs to read at most to fill the page and
    /// learn whether the table goes on: one past what the page may look at.
    pub fn read_limit(&self) -> usize {
        self.scan + 1
    }

    /// Offers the next user, by its id and `verified` flag; `user` builds it
    /// (only called when it matches). Returns `false` when the page was
    /// already complete: the user offered is the first of the next page, and
    /// the backend stops reading.
    ///
    /// When `user` fails (a row that cannot be read), the page ends before
    /// it if it holds users already (`false`: the backend stops reading);
    /// a page that would start with it fails with the error.
    pub fn offer<E>(
        &mut self,
        id: &str,
        verified: bool,
        user: impl FnOnce() -> Result<User, E>,
    ) -> Result<bool, E> {
        if self.is_complete() {
            self.more = true;
            return Ok(false);
        }
        if self.filter.matches_verified(verified) {
            match user() {
                Ok(user) => self.users.push(user),
                Err(_) if !self.users.is_empty() => {
                    self.cut = true;
                    return Ok(false);
                }
                Err(err) => return Err(err),
            }
        }
        self.scanned += 1;
        if self.is_complete() {
            self.last_id.push_str(id);
        }
        Ok(true)
    }

    fn is_complete(&self) -> bool {
        self.users.len() == self.max || self.scanned == self.scan
    }

    /// The page, once the backend has stopped offering (the scan said so, or
    /// the table ended).
    pub fn finish(self) -> Page {
        let next_after = match self.cut {
            // Resumes after the last user returned: the users the filter
            // skipped since are looked at again, the damaged one first.
            true => self.users.last().map(|user| user.id().to_owned()),
            false => (self.more && self.scanned > 0).then_some(self.last_id),
        };
        Page {
            users: self.users,
            next_after,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{
        store::{Store, StoreExt, tests::named},
        user::NewUser,
    };

    fn ids(page: &Page) -> Vec<&str> {
        page.users.iter().map(|u| u.id()).collect()
    }

    /// The end of the table, as every store must report it: a page that
    /// reaches the last user says the listing is over, whether it ends on a
    /// full page, on the scan bound, or short; a page that stops before it
    /// says where to resume. Run by each backend's tests.
    pub(crate) async fn a_page_ends_exactly_at_the_end_of_the_table(store: impl Store) {
        let users = (0..MAX_SCAN_PER_PAGE)
            .map(|i| NewUser {
                verified: i == 0,
                ..named(&format!("u{i:05}"), "N")
            })
            .collect();
        assert!(store.create_many(users).await.iter().all(Result::is_ok));
        let all = ListFilter::default();
        let verified = ListFilter {
            verified: Some(true),
        };
        let last = format!("u{:05}", MAX_SCAN_PER_PAGE - 1);
        let before_last = format!("u{:05}", MAX_SCAN_PER_PAGE - 2);

        // Full pages: one that stops before the last user, one that takes it.
        let page = store.list_page(all, None, 2).await.unwrap();
        assert_eq!(ids(&page), ["u00000", "u00001"]);
        assert_eq!(page.next_after.as_deref(), Some("u00001"));
        let page = store.list_page(all, Some(&before_last), 1).await.unwrap();
        assert_eq!(ids(&page), [last.as_str()]);
        assert_eq!(page.next_after, None, "a full page that ends the table");
        // Short: fewer users left than asked for.
        let page = store.list_page(all, Some(&before_last), 10).await.unwrap();
        assert_eq!(ids(&page), [last.as_str()]);
        assert_eq!(page.next_after, None);
        // The scan bound falls on the last user: the whole table looked at.
        let page = store.list_page(verified, None, 10).await.unwrap();
        assert_eq!(ids(&page), ["u00000"]);
        assert_eq!(page.next_after, None, "scan bound at the end of the table");
        // One more user: the same page now says where to resume.
        store.create(named("v", "V")).await.unwrap();
        let page = store.list_page(verified, None, 10).await.unwrap();
        assert_eq!(ids(&page), ["u00000"]);
        assert_eq!(page.next_after.as_deref(), Some(last.as_str()));
        let page = store.list_page(all, Some(&before_last), 1).await.unwrap();
        assert_eq!(page.next_after.as_deref(), Some(last.as_str()));
        // After the last id: empty, and over.
        let page = store.list_page(all, Some("v"), 10).await.unwrap();
        assert!(page.users.is_empty());
        assert_eq!(page.next_after, None);
    }

    #[test]
    fn a_page_ends_before_a_user_that_cannot_be_built() {
        let user = |id: &str| Ok::<_, &str>(User::new(id, &NewUser::default(), 1));
        let verified = ListFilter {
            verified: Some(true),
        };
        let mut scan = PageScan::new(verified, 10);
        assert_eq!(scan.offer("a", true, || user("a")), Ok(true));
        assert_eq!(scan.offer("b", false, || user("b")), Ok(true));
        assert_eq!(scan.offer("c", true, || Err("damaged")), Ok(false));
        let page = scan.finish();
        assert_eq!(ids(&page), ["a"]);
        assert_eq!(page.next_after.as_deref(), Some("a"), "resumes before it");
        // The next page starts with it (after the one the filter skips), and
        // fails with its error.
        let mut scan = PageScan::new(verified, 10);
        assert_eq!(scan.offer("b", false, || user("b")), Ok(true));
        assert_eq!(scan.offer("c", true, || Err("damaged")), Err("damaged"));
    }

    #[test]
    fn a_scan_stops_at_max_matching_or_the_scan_bound() {
        let user = |id: &str| Ok::<_, ()>(User::new(id, &NewUser::default(), 1));
        let mut scan = PageScan::new(ListFilter::default(), 2);
        assert_eq!(scan.read_limit(), 3);
        assert_eq!(scan.offer("a", false, || user("a")), Ok(true));
        assert_eq!(scan.offer("b", false, || user("b")), Ok(true));
        assert_eq!(scan.offer("c", false, || user("c")), Ok(false));
        let page = scan.finish();
        assert_eq!(ids(&page), ["a", "b"]);
        assert_eq!(page.next_after.as_deref(), Some("b"));

        let verified = ListFilter {
            verified: Some(true),
        };
        let mut scan = PageScan::new(verified, 1);
        assert_eq!(scan.read_limit(), MAX_SCAN_PER_PAGE + 1);
        let mut built = 0;
        for i in 0..MAX_SCAN_PER_PAGE {
            let id = format!("{i:05}");
            let offered = scan.offer(&id, false, || {
                built += 1;
                user(&id)
            });
            assert_eq!(offered, Ok(true));
        }
        assert_eq!(built, 0, "users the filter skips are never built");
        assert_eq!(scan.offer("x", true, || user("x")), Ok(false));
        let page = scan.finish();
        assert!(page.users.is_empty());
        assert_eq!(
            page.next_after,
            Some(format!("{:05}", MAX_SCAN_PER_PAGE - 1))
        );
    }
}

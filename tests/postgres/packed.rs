//! The changelog as a test reads it with SQL: each row a commit's changes,
//! packed as protobuf (the messages below, as `src/store/postgres/packed.rs`
//! documents them), decoded here with prost on its own, so that a test also
//! checks the format.

use prost::Message;
use tokio_postgres::Client;

#[derive(Clone, PartialEq, prost::Message)]
pub struct ChangeBatch {
    #[prost(message, repeated, tag = "1")]
    pub changes: Vec<Change>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Change {
    #[prost(int32, tag = "1")]
    pub kind: i32,
    #[prost(string, tag = "2")]
    pub id: String,
    #[prost(string, tag = "3")]
    pub first_name: String,
    #[prost(string, tag = "4")]
    pub last_name: String,
    #[prost(string, tag = "5")]
    pub address: String,
    #[prost(bool, tag = "6")]
    pub verified: bool,
    #[prost(int64, tag = "7")]
    pub version: i64,
}

/// Every change the changelog holds, with its seq, in seq order; each row's
/// count of changes checked against its range.
pub async fn changelog(db: &Client) -> Vec<(i64, Change)> {
    let rows = db
        .query(
            "SELECT first_seq, last_seq, changes FROM user_change_batches ORDER BY last_seq",
            &[],
        )
        .await
        .unwrap();
    let mut changes = Vec::new();
    for row in rows {
        let (first, last): (i64, i64) = (row.get(0), row.get(1));
        let batch = ChangeBatch::decode(row.get::<_, &[u8]>(2)).unwrap();
        assert_eq!(
            batch.changes.len() as i64,
            last - first + 1,
            "{first}..={last}"
        );
        changes.extend((first..).zip(batch.changes));
    }
    changes
}

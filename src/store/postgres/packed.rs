//! The changes of one commit packed into one changelog row, as protobuf.
//!
//! A row of `user_change_batches` holds the changes of one write
//! transaction, seqs `first_seq..=last_seq`, in its `changes` column: the
//! protobuf encoding of
//!
//! ```proto
//! message ChangeBatch { repeated Change changes = 1; }
//! message Change {
//!   int32 kind = 1;        // 1 created, 2 updated, 3 deleted
//!   string id = 2;
//!   string first_name = 3;
//!   string last_name = 4;
//!   string address = 5;
//!   bool verified = 6;
//!   int64 version = 7;     // the user's version after the change
//! }
//! ```
//!
//! The change with seq `first_seq + i` is the `i`th. A seq is not stored:
//! the row's range says it, and the count of changes must match it.
//!
//! Encoded and decoded by hand with prost's wire-format helpers rather than
//! through generated structs: the writer encodes straight from the users it
//! holds and the tailer decodes into borrowed text, with no `String` per
//! field on either side. Because a batch is a concatenation of its
//! changes' fields, [`element`] encodes one change as the field it is in
//! a batch: the statement that stores creates (see `apply`) keeps those of
//! the users whose ids were free and concatenates them (`string_agg`), in
//! the same round trip.
//!
//! Data read back from disk is input (another program may have written the
//! row): decoding is fallible and a row that breaks the format, or a user
//! that breaks the API's limits, is an error naming the seq.

use bytes::{Buf, BufMut};
use prost::encoding::{
    WireType, decode_key, decode_varint, encode_key, encode_varint, encoded_len_varint,
};

use super::rows::{kind_code, kind_of};
use crate::{
    store::stored::{self, Columns},
    user::{Change, ChangeKind, User},
};

/// `ChangeBatch.changes`.
const CHANGES: u32 = 1;

/// Encodes the change of `kind` leaving `user` as one `ChangeBatch.changes`
/// field (key, length, then the `Change`), appended to `buf`.
pub(super) fn element(kind: ChangeKind, user: &User, buf: &mut Vec<u8>) {
    element_of(
        kind_code(kind),
        [
            user.id(),
            user.first_name(),
            user.last_name(),
            user.address(),
        ],
        user.verified(),
        user.version(),
        buf,
    );
}

/// [`element`] from the columns of a change as the changelog of schema
/// version 2 held them (the migration's).
pub(super) fn element_of(
    kind: i16,
    text: [&str; 4],
    verified: bool,
    version: u64,
    buf: &mut Vec<u8>,
) {
    let kind = kind as u64;
    let mut len = 1 + encoded_len_varint(kind);
    for value in text.iter().filter(|value| !value.is_empty()) {
        len += 1 + encoded_len_varint(value.len() as u64) + value.len();
    }
    if verified {
        len += 2;
    }
    len += 1 + encoded_len_varint(version);
    encode_key(CHANGES, WireType::LengthDelimited, buf);
    encode_varint(len as u64, buf);
    encode_key(1, WireType::Varint, buf);
    encode_varint(kind, buf);
    for (tag, value) in (2..).zip(text) {
        // proto3 leaves out a field at its default value.
        if !value.is_empty() {
            encode_key(tag, WireType::LengthDelimited, buf);
            encode_varint(value.len() as u64, buf);
            buf.put_slice(value.as_bytes());
        }
    }
    if verified {
        encode_key(6, WireType::Varint, buf);
        encode_varint(1, buf);
    }
    encode_key(7, WireType::Varint, buf);
    encode_varint(version, buf);
}

/// Encodes `changes` as one `ChangeBatch`.
pub(super) fn batch<'a>(changes: impl IntoIterator<Item = (ChangeKind, &'a User)>) -> Vec<u8> {
    let mut buf = Vec::new();
    for (kind, user) in changes {
        element(kind, user, &mut buf);
    }
    buf
}

/// A change of a batch that cannot be read: its seq, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Unreadable {
    pub seq: u64,
    pub detail: String,
}

/// Decodes the batch `packed` of seqs `first..=last`, handing each change
/// to `each` in order; stops at the first that cannot be read, with its
/// seq (the changes before it have been handed on).
pub(super) fn unpack(
    mut packed: &[u8],
    first: u64,
    last: u64,
    mut each: impl FnMut(Change),
) -> Result<(), Unreadable> {
    let mut seq = first;
    let fail = |seq: u64, detail: String| Unreadable { seq, detail };
    while packed.has_remaining() {
        let field = next_field(&mut packed).map_err(|detail| fail(seq, detail))?;
        let Field::Bytes(CHANGES, change) = field else {
            continue;
        };
        if seq > last {
            return Err(fail(
                last,
                format!("the batch {first}..={last} holds more changes than its seqs"),
            ));
        }
        let change = change_of(change, seq).map_err(|detail| fail(seq, detail))?;
        each(change);
        seq += 1;
    }
    if seq <= last {
        return Err(fail(
            seq,
            format!("the batch {first}..={last} ends before change {seq}"),
        ));
    }
    Ok(())
}

/// One field of a message, its payload borrowed.
enum Field<'a> {
    Varint(u32, u64),
    Bytes(u32, &'a [u8]),
    /// A fixed-width field: read past, no field of ours is one.
    Other,
}

fn next_field<'a>(buf: &mut &'a [u8]) -> Result<Field<'a>, String> {
    let (tag, wire_type) = decode_key(buf).map_err(|err| err.to_string())?;
    let fixed = |buf: &mut &[u8], n: usize| {
        if buf.remaining() < n {
            return Err("truncated".to_owned());
        }
        buf.advance(n);
        Ok(Field::Other)
    };
    match wire_type {
        WireType::Varint => Ok(Field::Varint(
            tag,
            decode_varint(buf).map_err(|err| err.to_string())?,
        )),
        WireType::LengthDelimited => {
            let len = decode_varint(buf).map_err(|err| err.to_string())?;
            let len = usize::try_from(len)
                .ok()
                .filter(|&len| len <= buf.len())
                .ok_or_else(|| "truncated".to_owned())?;
            let (payload, rest) = buf.split_at(len);
            *buf = rest;
            Ok(Field::Bytes(tag, payload))
        }
        WireType::ThirtyTwoBit => fixed(buf, 4),
        WireType::SixtyFourBit => fixed(buf, 8),
        WireType::StartGroup | WireType::EndGroup => Err("groups are not used".to_owned()),
    }
}

/// The change `seq` from its encoded `Change`, held to the API's limits.
fn change_of(mut buf: &[u8], seq: u64) -> Result<Change, String> {
    let mut code = 0u64;
    let mut text = [""; 4];
    let mut verified = false;
    let mut version = 0u64;
    while buf.has_remaining() {
        match next_field(&mut buf)? {
            Field::Varint(1, value) => code = value,
            Field::Varint(6, value) => verified = value != 0,
            Field::Varint(7, value) => version = value,
            Field::Bytes(tag @ 2..=5, bytes) => {
                text[tag as usize - 2] = std::str::from_utf8(bytes)
                    .map_err(|err| format!("{}: {err}", TEXT_NAMES[tag as usize - 2]))?;
            }
            _ => {}
        }
    }
    let kind = i16::try_from(code)
        .ok()
        .and_then(kind_of)
        .ok_or_else(|| format!("kind: no kind of change has code {code}"))?;
    let user = stored::user(Columns {
        text,
        verified,
        version: version as i64,
    })?;
    Ok(Change { seq, kind, user })
}

const TEXT_NAMES: [&str; 4] = ["id", "first_name", "last_name", "address"];

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    /// The format, as prost would generate it from the module doc's
    /// messages.
    #[derive(Clone, PartialEq, prost::Message)]
    struct ChangeBatch {
        #[prost(message, repeated, tag = "1")]
        changes: Vec<ProtoChange>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    struct ProtoChange {
        #[prost(int32, tag = "1")]
        kind: i32,
        #[prost(string, tag = "2")]
        id: String,
        #[prost(string, tag = "3")]
        first_name: String,
        #[prost(string, tag = "4")]
        last_name: String,
        #[prost(string, tag = "5")]
        address: String,
        #[prost(bool, tag = "6")]
        verified: bool,
        #[prost(int64, tag = "7")]
        version: i64,
    }

    fn user(id: &str, first: &str, last: &str, verified: bool, version: u64) -> User {
        User::from_fields([id, first, last, ""], verified, version).unwrap()
    }

    fn changes() -> Vec<(ChangeKind, User)> {
        vec![
            (ChangeKind::Created, user("a", "Ann", "", false, 1)),
            (
                ChangeKind::Updated,
                user("b", "Bé", &"x".repeat(200), true, 300),
            ),
            (
                ChangeKind::Deleted,
                user("c", "Cy", "Z", true, u32::MAX.into()),
            ),
        ]
    }

    #[test]
    fn a_batch_is_the_protobuf_of_its_changes() {
        let changes = changes();
        let packed = batch(changes.iter().map(|(kind, user)| (*kind, user)));
        let decoded = ChangeBatch::decode(packed.as_slice()).unwrap();
        let expected: Vec<ProtoChange> = changes
            .iter()
            .map(|(kind, u)| ProtoChange {
                kind: kind_code(*kind).into(),
                id: u.id().into(),
                first_name: u.first_name().into(),
                last_name: u.last_name().into(),
                address: u.address().into(),
                verified: u.verified(),
                version: u.version() as i64,
            })
            .collect();
        assert_eq!(decoded.changes, expected);
        // And byte for byte what prost writes.
        assert_eq!(ChangeBatch { changes: expected }.encode_to_vec(), packed);
    }

    #[test]
    fn a_batch_unpacks_to_its_changes_with_their_seqs() {
        let changes = changes();
        let packed = batch(changes.iter().map(|(kind, user)| (*kind, user)));
        let mut out = Vec::new();
        unpack(&packed, 10, 12, |change| out.push(change)).unwrap();
        let expected: Vec<Change> = changes
            .into_iter()
            .zip(10..)
            .map(|((kind, user), seq)| Change { seq, kind, user })
            .collect();
        assert_eq!(out, expected);
    }

    #[test]
    fn a_batch_that_breaks_the_format_or_the_limits_names_the_change() {
        let changes = changes();
        let packed = batch(changes.iter().map(|(kind, user)| (*kind, user)));
        let unpacked = |bytes: &[u8], first, last| {
            let mut seqs = Vec::new();
            let result = unpack(bytes, first, last, |change| seqs.push(change.seq));
            (seqs, result.map_err(|err| err.seq))
        };
        assert_eq!(unpacked(&packed, 1, 4), (vec![1, 2, 3], Err(4)));
        assert_eq!(unpacked(&packed, 1, 2), (vec![1, 2], Err(2)));
        assert_eq!(unpacked(&packed[..packed.len() - 1], 1, 3).1, Err(3));
        let bad = ProtoChange {
            kind: 1,
            id: "no spaces".into(),
            first_name: "N".into(),
            version: 1,
            ..ProtoChange::default()
        };
        let mut packed = packed.clone();
        packed.extend(
            ChangeBatch {
                changes: vec![bad.clone()],
            }
            .encode_to_vec(),
        );
        assert_eq!(unpacked(&packed, 1, 4), (vec![1, 2, 3], Err(4)));
        let unknown_kind = ProtoChange {
            kind: 9,
            id: "d".into(),
            ..bad
        };
        let packed = ChangeBatch {
            changes: vec![unknown_kind],
        }
        .encode_to_vec();
        let err = unpack(&packed, 5, 5, |_| {}).unwrap_err();
        assert_eq!(err.seq, 5);
        assert!(err.detail.contains("code 9"), "{}", err.detail);
    }
}

//! Histograms in `--json`, losslessly: HdrHistogram's own serialized form
//! (V2, deflated, then base64: the `HISTF...` strings of HdrHistogram's
//! interval logs, which its tools in every language read), so that
//! `user-load merge` and any other program can add the runs of several
//! machines and take percentiles of the sum, which averaging percentiles
//! cannot give.

use base64::{Engine, engine::general_purpose::STANDARD};
use hdrhistogram::{
    Counter, Histogram,
    serialization::{Deserializer, Serializer, V2DeflateSerializer},
};
use serde::Deserialize;

/// `h` as base64 of its V2 deflated serialization.
pub fn encode<T: Counter>(h: &Histogram<T>) -> String {
    let mut bytes = Vec::new();
    // Writing to a Vec fails only for a histogram too large to describe,
    // which the bounds of ours rule out.
    match V2DeflateSerializer::new().serialize(h, &mut bytes) {
        Ok(_) => STANDARD.encode(bytes),
        Err(err) => format!("unserializable: {err:?}"),
    }
}

/// The histogram `encode` wrote.
pub fn decode<T: Counter>(text: &str) -> Result<Histogram<T>, String> {
    let bytes = STANDARD
        .decode(text.trim())
        .map_err(|err| format!("not base64: {err}"))?;
    Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|err| format!("not an HdrHistogram: {err:?}"))
}

/// `#[serde(with = "hdr::optional")]` for an `Option<Histogram<_>>`.
pub mod optional {
    use super::*;

    pub fn serialize<S: serde::Serializer, T: Counter>(
        h: &Option<Histogram<T>>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match h {
            Some(h) => serializer.serialize_some(&encode(h)),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>, T: Counter>(
        deserializer: D,
    ) -> Result<Option<Histogram<T>>, D::Error> {
        Option::<String>::deserialize(deserializer)?
            .map(|text| decode(&text).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// `#[serde(with = "hdr::required")]` for a `Histogram<_>`.
pub mod required {
    use super::*;

    pub fn serialize<S: serde::Serializer, T: Counter>(
        h: &Histogram<T>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&encode(h))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>, T: Counter>(
        deserializer: D,
    ) -> Result<Histogram<T>, D::Error> {
        let text = String::deserialize(deserializer)?;
        decode(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_survives_the_round_trip_exactly() {
        let mut h = crate::stats::histogram();
        for us in [1, 17, 250, 251, 9_999, 1_000_000, 3_600_000_000] {
            h.record_n(us, us % 7 + 1).unwrap();
        }
        let back: Histogram<u64> = decode(&encode(&h)).unwrap();
        assert_eq!(back, h);
        assert!(encode(&h).starts_with("HISTF"), "{}", encode(&h));
        assert!(decode::<u64>("not a histogram").is_err());
    }
}

//! Counting the gRPC messages of a body as its bytes go by, for the
//! metrics (per method) and the access log (per call).

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use prometheus_client::metrics::counter::Counter;

/// Where one direction of a call's messages is counted: the method's
/// metric, the call's own count (for its access log line), or both.
#[derive(Debug)]
pub(super) struct Messages {
    framing: Framing,
    metric: Option<Counter>,
    call: Option<Arc<AtomicU64>>,
}

impl Messages {
    /// `None` when there is nowhere to count.
    pub(super) fn new(metric: Option<Counter>, call: Option<Arc<AtomicU64>>) -> Option<Self> {
        (metric.is_some() || call.is_some()).then(|| Messages {
            framing: Framing::default(),
            metric,
            call,
        })
    }

    /// Counts the messages that `data`, the body's next bytes, completes.
    pub(super) fn count(&mut self, data: &[u8]) {
        let complete = self.framing.complete(data);
        if complete == 0 {
            return;
        }
        if let Some(metric) = &self.metric {
            metric.inc_by(complete);
        }
        if let Some(call) = &self.call {
            call.fetch_add(complete, Ordering::Relaxed);
        }
    }
}

/// Finds the ends of gRPC messages in a body's bytes: each is a 5-byte
/// prefix (a flag and a big-endian length), then that many bytes. A message
/// counts once it is complete; messages may span data frames.
#[derive(Debug, Default)]
struct Framing {
    /// Bytes of the current prefix read so far, and the prefix.
    prefix_read: usize,
    prefix: [u8; 5],
    /// Bytes of the current message still to come.
    remaining: usize,
}

impl Framing {
    /// How many messages end in `data`.
    fn complete(&mut self, mut data: &[u8]) -> u64 {
        let mut complete = 0;
        while !data.is_empty() {
            if self.remaining > 0 {
                let take = self.remaining.min(data.len());
                self.remaining -= take;
                data = &data[take..];
                if self.remaining == 0 {
                    complete += 1;
                }
                continue;
            }
            let take = (5 - self.prefix_read).min(data.len());
            self.prefix[self.prefix_read..self.prefix_read + take].copy_from_slice(&data[..take]);
            self.prefix_read += take;
            data = &data[take..];
            if self.prefix_read == 5 {
                self.prefix_read = 0;
                let len = u32::from_be_bytes(self.prefix[1..5].try_into().expect("4 bytes"));
                self.remaining = len as usize;
                if self.remaining == 0 {
                    complete += 1;
                }
            }
        }
        complete
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(len: usize) -> Vec<u8> {
        let mut bytes = vec![0];
        bytes.extend_from_slice(&(len as u32).to_be_bytes());
        bytes.resize(5 + len, b'x');
        bytes
    }

    #[test]
    fn counts_whole_messages_across_frames() {
        let metric = Counter::default();
        let call = Arc::new(AtomicU64::new(0));
        let mut messages = Messages::new(Some(metric.clone()), Some(call.clone())).unwrap();
        let mut stream = Vec::new();
        for len in [0, 1, 70, 20_000, 3] {
            stream.extend(message(len));
        }
        // Cut into chunks that split prefixes and bodies.
        for chunk in stream.chunks(7) {
            messages.count(chunk);
        }
        assert_eq!(metric.get(), 5);
        assert_eq!(call.load(Ordering::Relaxed), 5);
        // A message cut short is not counted.
        messages.count(&message(10)[..8]);
        assert_eq!(metric.get(), 5);
        assert!(Messages::new(None, None).is_none());
    }
}

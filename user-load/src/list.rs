//! list: full ListUsers scans, each worker starting its next scan when the
//! last one ends. Measured: each scan from request to last user, the time
//! to its first user, and users received per second over the run.

use std::time::Instant;

use prost::{
    DecodeError, Message,
    bytes::{Buf, BufMut},
    encoding::{DecodeContext, WireType, key_len, skip_field, string},
};
use tokio::task::JoinSet;
use tonic::{client::Grpc, codegen::http::uri::PathAndQuery};
use tonic_prost::ProstCodec;
use user_service::proto;

use crate::{
    connect::Transport,
    workers::{Ctx, Outcome, Totals},
};

/// A listed user as the generator reads it: the id (to check the order)
/// and the size on the wire. Every other field is skipped, not decoded:
/// decoding a whole `proto::User` (four strings, each allocated and checked
/// as UTF-8) cost the generator as much CPU as the server spent producing
/// the listing, so the scan measured the generator instead of the server.
#[derive(Debug, Default)]
struct Listed {
    id: String,
    wire_len: usize,
}

/// `User.id`'s field number in `proto/user.proto`.
const ID_TAG: u32 = 5;

impl Message for Listed {
    /// A decode-only view: the generator never sends one.
    fn encode_raw(&self, _buf: &mut impl BufMut) {}

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        let before = buf.remaining();
        if tag == ID_TAG {
            string::merge(wire_type, &mut self.id, buf, ctx)?;
        } else {
            skip_field(wire_type, tag, buf, ctx)?;
        }
        self.wire_len += key_len(tag) + before - buf.remaining();
        Ok(())
    }

    /// Nothing is encoded (see `encode_raw`).
    fn encoded_len(&self) -> usize {
        0
    }

    fn clear(&mut self) {
        *self = Listed::default();
    }
}

/// One ListUsers call on `channel`, decoding each user as a [`Listed`].
async fn list_users(
    channel: Transport,
    request: proto::ListUsersRequest,
) -> Result<tonic::Streaming<Listed>, tonic::Status> {
    let mut grpc =
        Grpc::new(channel).max_decoding_message_size(user_service::server::MAX_MESSAGE_SIZE);
    grpc.ready()
        .await
        .map_err(|err| tonic::Status::unavailable(format!("connection not ready: {err}")))?;
    let path = PathAndQuery::from_static("/grpcUser.UserService/ListUsers");
    let codec = ProstCodec::<proto::ListUsersRequest, Listed>::default();
    let response = grpc
        .server_streaming(tonic::Request::new(request), path, codec)
        .await?;
    Ok(response.into_inner())
}

/// Users between updates of the timeline during a scan.
const REPORT_EVERY: u64 = 4096;

pub async fn run(ctx: &Ctx, totals: &mut Totals) {
    let mut workers = JoinSet::new();
    for i in 0..ctx.plan.concurrency {
        let channel = ctx.channel(i);
        let (budget, live, timeline) = (ctx.budget.clone(), ctx.live.clone(), ctx.timeline.clone());
        let (timeout, limit, check_order) = (ctx.plan.timeout, ctx.plan.limit, ctx.plan.verify);
        let mut recorder = ctx.recorder();
        let (target, targets) = (ctx.target(i), ctx.targets.clone());
        workers.spawn(async move {
            let mut order_violations = 0;
            while targets.wait_up(target).await && budget.claim().is_some() {
                let start = Instant::now();
                let mut first_user = None;
                let request = proto::ListUsersRequest {
                    verified: None,
                    after_id: String::new(),
                    limit,
                };
                let (mut users, mut bytes, mut out_of_order, mut unreported) =
                    (0u64, 0u64, 0u64, 0u64);
                let scan = async {
                    let mut stream = list_users(channel.clone(), request).await?;
                    let mut last: Option<Listed> = None;
                    while let Some(user) = stream.message().await? {
                        first_user.get_or_insert_with(|| start.elapsed());
                        users += 1;
                        unreported += 1;
                        if unreported == REPORT_EVERY {
                            timeline.add_users(unreported);
                            unreported = 0;
                        }
                        bytes += user.wire_len as u64;
                        if check_order {
                            if last.as_ref().is_some_and(|last| last.id >= user.id) {
                                out_of_order += 1;
                            }
                            last = Some(user);
                        }
                    }
                    Ok::<_, tonic::Status>(())
                };
                let result = tokio::time::timeout(timeout, scan).await;
                let latency = start.elapsed();
                timeline.add_users(unreported);
                if let Some(first) = first_user {
                    recorder.secondary(|s| &mut s.first_user, first);
                }
                // Users read before a scan failed were still carried.
                recorder.stats.users += users;
                recorder.stats.bytes += bytes;
                match result {
                    Ok(Ok(())) => {
                        recorder.call(latency, tonic::Code::Ok);
                        order_violations += out_of_order;
                        if limit > 0 && users > u64::from(limit) {
                            recorder.error(format!("a scan returned {users} users, limit {limit}"));
                        }
                    }
                    Ok(Err(status)) => {
                        recorder.stream_failed(latency, &status);
                        targets.stream_failed(target, &status).await;
                    }
                    Err(_) => recorder.stream_failed(
                        latency,
                        &tonic::Status::deadline_exceeded("scan not finished within --timeout"),
                    ),
                }
                live.done(1);
            }
            let mut outcome = Outcome::of(recorder.finish());
            outcome.order_violations = order_violations;
            (target, outcome)
        });
    }
    totals.gather(workers).await;
}

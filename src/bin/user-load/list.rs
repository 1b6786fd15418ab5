//! list: full ListUsers scans, each worker starting its next scan when the
//! last one ends. Latency is per scan.

use std::{sync::atomic::Ordering, time::Instant};

use prost::Message;
use tokio::task::JoinSet;
use user_service::proto;

use crate::run::{Ctx, Outcome};

pub async fn run(ctx: &Ctx) -> Outcome {
    let mut workers = JoinSet::new();
    for i in 0..ctx.concurrency {
        let mut client = ctx.client(i);
        let budget = ctx.budget.clone();
        let progress = ctx.progress.clone();
        let (timeout, limit, check_order) = (ctx.timeout, ctx.args.limit, ctx.args.verify);
        workers.spawn(async move {
            let mut outcome = Outcome::default();
            while budget.claim().is_some() {
                let start = Instant::now();
                let request = proto::ListUsersRequest {
                    verified: None,
                    after_id: String::new(),
                    limit,
                };
                let scan = async {
                    let mut stream = client.list_users(request).await?.into_inner();
                    let (mut users, mut bytes, mut out_of_order) = (0u64, 0u64, 0u64);
                    let mut last: Option<proto::User> = None;
                    while let Some(user) = stream.message().await? {
                        users += 1;
                        bytes += user.encoded_len() as u64;
                        if check_order {
                            if last.as_ref().is_some_and(|last| last.id >= user.id) {
                                out_of_order += 1;
                            }
                            last = Some(user);
                        }
                    }
                    Ok::<_, tonic::Status>((users, bytes, out_of_order))
                };
                let result = tokio::time::timeout(timeout, scan).await;
                let latency = start.elapsed();
                let stats = &mut outcome.stats;
                match result {
                    Ok(Ok((users, bytes, out_of_order))) => {
                        stats.call(latency, tonic::Code::Ok);
                        stats.users += users;
                        stats.bytes += bytes;
                        outcome.order_violations += out_of_order;
                        if limit > 0 && users > u64::from(limit) {
                            stats.error(format!("scan returned {users} users, limit {limit}"));
                        }
                    }
                    Ok(Err(status)) => stats.failed(latency, &status),
                    Err(_) => {
                        stats.call(latency, tonic::Code::DeadlineExceeded);
                        stats.error("DeadlineExceeded: scan not finished within --timeout");
                    }
                }
                progress.fetch_add(1, Ordering::Relaxed);
            }
            outcome
        });
    }
    let mut outcome = Outcome::default();
    while let Some(result) = workers.join_next().await {
        match result {
            Ok(worker) => outcome.merge(worker),
            Err(err) => outcome.stats.error(format!("worker failed: {err}")),
        }
    }
    outcome
}

//! add and get: unary calls, in a closed loop (each worker starts its next
//! call when the last one returns) or an open loop (`--rps`: calls start on
//! a schedule, whatever the latency, and latency counts from when each call
//! was due, so a slow server cannot hide its queueing).

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use prost::Message;
use tokio::task::JoinSet;
use user_service::{proto, service::USER_SAVED};

use crate::run::{Client, Ctx, Outcome, Source};

#[derive(Clone)]
pub enum Kind {
    Add,
    /// Reads users picked at random from these ids.
    Get(Arc<Vec<String>>),
}

pub async fn run(ctx: &Ctx, kind: Kind) -> Outcome {
    let mut workers = JoinSet::new();
    // Open loop: a pacer hands out (unit, due time) tickets; the queue is as
    // deep as there are workers, and when it is full the pacer waits and the
    // tickets' due times fall behind: that lateness is counted as latency.
    let tickets = ctx.args.rps.map(|rps| {
        let (tx, rx) = async_channel::bounded::<(u64, Instant)>(ctx.concurrency);
        let budget = ctx.budget.clone();
        workers.spawn(async move {
            let interval = Duration::from_secs_f64(1.0 / rps as f64);
            let start = tokio::time::Instant::now();
            for i in 0u32.. {
                let due = start + interval * i;
                tokio::select! {
                    () = tokio::time::sleep_until(due) => {}
                    () = budget.done() => break,
                }
                let Some(n) = budget.claim() else { break };
                if tx.send((n, due.into_std())).await.is_err() {
                    break;
                }
            }
            Outcome::default()
        });
        rx
    });
    for i in 0..ctx.concurrency {
        let mut worker = Worker {
            client: ctx.client(i),
            kind: kind.clone(),
            source: ctx.source.clone(),
            timeout: ctx.timeout,
            id_prefix: ctx.id_prefix.clone(),
            outcome: Outcome::default(),
        };
        let budget = ctx.budget.clone();
        let progress = ctx.progress.clone();
        let tickets = tickets.clone();
        workers.spawn(async move {
            loop {
                let (n, due) = match &tickets {
                    Some(tickets) => match tickets.recv().await {
                        Ok(ticket) => ticket,
                        Err(_) => break,
                    },
                    None => match budget.claim() {
                        Some(n) => (n, Instant::now()),
                        None => break,
                    },
                };
                if !worker.call(n, due).await {
                    break;
                }
                progress.fetch_add(1, Ordering::Relaxed);
            }
            worker.outcome
        });
    }
    drop(tickets);
    Outcome::gather(workers).await
}

struct Worker {
    client: Client,
    kind: Kind,
    source: Source,
    timeout: Duration,
    id_prefix: Option<String>,
    outcome: Outcome,
}

impl Worker {
    /// Makes call `n`, due at `due`. `false` when there is nothing left to
    /// send (the data file ended).
    async fn call(&mut self, n: u64, due: Instant) -> bool {
        let stats = &mut self.outcome.stats;
        match &self.kind {
            Kind::Add => {
                let Some(mut user) = self.source.next(n).await else {
                    return false;
                };
                if let Some(prefix) = &self.id_prefix
                    && user.id.is_empty()
                {
                    user.id = format!("{prefix}-{n:010}");
                }
                let bytes = user.encoded_len() as u64;
                let mut request = tonic::Request::new(user);
                request.set_timeout(self.timeout);
                let result =
                    tokio::time::timeout(self.timeout, self.client.add_user(request)).await;
                let latency = due.elapsed();
                match result {
                    Ok(Ok(reply)) => {
                        let reply = reply.into_inner();
                        stats.call(latency, tonic::Code::Ok);
                        stats.users += 1;
                        stats.bytes += bytes;
                        if reply.code != 200 || reply.message != USER_SAVED {
                            stats.error(format!(
                                "unexpected AddUser reply: {} {:?}",
                                reply.code, reply.message
                            ));
                        }
                        if self.id_prefix.is_some()
                            && let Some(stored) = reply.user
                        {
                            self.outcome.stored_ids.push(stored.id);
                        }
                    }
                    Ok(Err(status)) => stats.failed(latency, &status),
                    Err(_) => timed_out(stats, latency),
                }
            }
            Kind::Get(ids) => {
                let id = ids[fastrand::usize(..ids.len().max(1))].clone();
                let mut request = tonic::Request::new(proto::GetUserRequest { id: id.clone() });
                request.set_timeout(self.timeout);
                let result =
                    tokio::time::timeout(self.timeout, self.client.get_user(request)).await;
                let latency = due.elapsed();
                match result {
                    Ok(Ok(reply)) => {
                        let user = reply.into_inner();
                        stats.call(latency, tonic::Code::Ok);
                        stats.users += 1;
                        stats.bytes += user.encoded_len() as u64;
                        if user.id != id {
                            stats.error(format!("GetUser({id:?}) returned {:?}", user.id));
                        }
                    }
                    Ok(Err(status)) => stats.failed(latency, &status),
                    Err(_) => timed_out(stats, latency),
                }
            }
        }
        true
    }
}

fn timed_out(stats: &mut crate::stats::Stats, latency: Duration) {
    stats.call(latency, tonic::Code::DeadlineExceeded);
    stats.error("DeadlineExceeded: no reply within --timeout");
}

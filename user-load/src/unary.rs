//! add and get: unary calls, in a closed loop (each worker starts its next
//! call when the last one returns) or an open loop (`--rps`: calls start on
//! a schedule, whatever the latency, and latency counts from when each call
//! was due, so a slow server cannot hide its queueing).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use prost::Message;
use tokio::task::JoinSet;
use user_service::{proto, service::USER_SAVED};

use crate::{
    budget,
    connect::Client,
    record::Recorder,
    source::Source,
    workers::{Ctx, Outcome, Totals},
};

#[derive(Clone)]
pub enum Kind {
    Add,
    /// Reads users picked at random from these ids.
    Get(Arc<Vec<String>>),
}

pub async fn run(ctx: &Ctx, kind: Kind, totals: &mut Totals) {
    let mut workers = JoinSet::new();
    let concurrency = ctx.plan.concurrency;
    let tickets = ctx.tickets(concurrency);
    for i in 0..concurrency {
        let mut worker = Worker {
            client: ctx.client(i),
            kind: kind.clone(),
            source: ctx.source.clone(),
            timeout: ctx.plan.timeout,
            id_prefix: ctx.id_prefix.clone(),
            recorder: ctx.recorder(),
            stored_ids: Vec::new(),
        };
        let (budget, live, tickets, target) = (
            ctx.budget.clone(),
            ctx.live.clone(),
            tickets.clone(),
            ctx.target(i),
        );
        workers.spawn(async move {
            loop {
                let Some((n, due)) = budget::next_ticket(tickets.as_ref(), &budget).await else {
                    break;
                };
                if !worker.call(n, due).await {
                    break;
                }
                live.done(1);
            }
            let mut outcome = Outcome::of(worker.recorder.finish());
            outcome.stored_ids = worker.stored_ids;
            (target, outcome)
        });
    }
    drop(tickets);
    totals.gather(workers).await;
}

struct Worker {
    client: Client,
    kind: Kind,
    source: Source,
    timeout: Duration,
    id_prefix: Option<String>,
    recorder: Recorder,
    stored_ids: Vec<String>,
}

impl Worker {
    /// Makes call `n`, due at `due`. `false` when there is nothing left to
    /// send (the data file ended).
    async fn call(&mut self, n: u64, due: Instant) -> bool {
        let recorder = &mut self.recorder;
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
                        recorder.call(latency, tonic::Code::Ok);
                        recorder.users(1, bytes);
                        if reply.code != 200 || reply.message != USER_SAVED {
                            recorder.error(format!(
                                "unexpected AddUser reply: {} {:?}",
                                reply.code, reply.message
                            ));
                        }
                        if self.id_prefix.is_some()
                            && let Some(stored) = reply.user
                        {
                            self.stored_ids.push(stored.id);
                        }
                    }
                    Ok(Err(status)) => recorder.failed(latency, &status),
                    Err(_) => recorder.timed_out(latency, "no AddUser reply"),
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
                        recorder.call(latency, tonic::Code::Ok);
                        recorder.users(1, user.encoded_len() as u64);
                        if user.id != id {
                            recorder.error(format!("GetUser({id:?}) returned {:?}", user.id));
                        }
                    }
                    Ok(Err(status)) => recorder.failed(latency, &status),
                    Err(_) => recorder.timed_out(latency, "no GetUser reply"),
                }
            }
        }
        true
    }
}

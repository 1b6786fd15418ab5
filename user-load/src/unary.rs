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
    stats::is_transport_failure,
    workers::{Ctx, Outcome, Stored, Totals},
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
            open_loop: tickets.is_some(),
        };
        let (budget, live, tickets, target, targets) = (
            ctx.budget.clone(),
            ctx.live.clone(),
            tickets.clone(),
            ctx.target(i),
            ctx.targets.clone(),
        );
        workers.spawn(async move {
            // A worker whose target is down takes no ticket: the others
            // keep the rate.
            while targets.wait_up(target).await {
                let Some((n, due)) = budget::next_ticket(tickets.as_ref(), &budget).await else {
                    break;
                };
                match worker.call(n, due).await {
                    Ok(()) => live.done(1),
                    Err(Ended::Data) => break,
                    Err(Ended::Connection(status)) => targets.failed(target, &status),
                }
            }
            let mut outcome = Outcome::of(worker.recorder.finish());
            outcome.stored.push(Stored::each(worker.stored_ids));
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
    /// Calls start when due: how late each starts is recorded.
    open_loop: bool,
}

/// Why a worker's call did not go as a call should.
enum Ended {
    /// Nothing left to send: the data file ended.
    Data,
    /// The connection failed: the target may be down.
    Connection(tonic::Status),
}

impl Worker {
    /// Makes call `n`, due at `due`.
    async fn call(&mut self, n: u64, due: Instant) -> Result<(), Ended> {
        let recorder = &mut self.recorder;
        match &self.kind {
            Kind::Add => {
                let Some(mut user) = self.source.next(n).await else {
                    return Err(Ended::Data);
                };
                if let Some(prefix) = &self.id_prefix
                    && user.id.is_empty()
                {
                    user.id = format!("{prefix}-{n:010}");
                }
                let bytes = user.encoded_len() as u64;
                let mut request = tonic::Request::new(user);
                request.set_timeout(self.timeout);
                if self.open_loop {
                    recorder.late(due.elapsed());
                }
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
                    Ok(Err(status)) => return failed(recorder, latency, status),
                    Err(_) => recorder.timed_out(latency, "no AddUser reply"),
                }
            }
            Kind::Get(ids) => {
                let id = ids[fastrand::usize(..ids.len().max(1))].clone();
                let mut request = tonic::Request::new(proto::GetUserRequest { id: id.clone() });
                request.set_timeout(self.timeout);
                if self.open_loop {
                    recorder.late(due.elapsed());
                }
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
                    Ok(Err(status)) => return failed(recorder, latency, status),
                    Err(_) => recorder.timed_out(latency, "no GetUser reply"),
                }
            }
        }
        Ok(())
    }
}

/// Records a call that failed with `status`; a connection failure ends it
/// differently, for the worker to mark its target down.
fn failed(recorder: &mut Recorder, latency: Duration, status: tonic::Status) -> Result<(), Ended> {
    recorder.failed(latency, &status);
    if is_transport_failure(&status) {
        return Err(Ended::Connection(status));
    }
    Ok(())
}

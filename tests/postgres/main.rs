//! The PostgreSQL store through real `user-service` binaries, several at a
//! time on one database, as replicas behind a load balancer would run:
//! one gapless change feed across them, a replica killed in the middle of
//! its writes, the database restarted or its connections cut, the changelog
//! pruned, rows written with psql, and schemas the binary must refuse.
//!
//! Each test works in a schema of its own in the test database (see
//! `test_support::postgres`); those that restart the database or cut it off get a
//! throwaway cluster of their own.

mod changelog;
mod crash;
mod outage;
mod packed;
mod replica;
mod replicas;
mod schema;
mod settings;
mod shell;
mod tls;
mod upgrade;

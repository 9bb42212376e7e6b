//! Integration tests against real PostgreSQL clusters (15, or 18 with
//! `PGRELAY_PG_MAJOR=18`) and a real
//! Kafka-protocol broker, driving the real `pgrelay` binary.

mod apply;
mod breaker;
mod capture;
mod checker;
mod convergence;
mod dashboard;
mod dr;
mod errors;
mod failover;
mod faults;
mod lifecycle;
mod merge;
mod origin;
mod repair;
mod rules;
mod security;
mod sidecar;
mod stamp;
mod status_page;
mod support;
mod tls;
mod upgrade;
mod verify;

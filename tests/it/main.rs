//! Integration tests against real PostgreSQL 15 clusters and a real
//! Kafka-protocol broker, driving the real `pgrelay` binary.

mod apply;
mod breaker;
mod capture;
mod checker;
mod convergence;
mod dashboard;
mod errors;
mod failover;
mod faults;
mod merge;
mod repair;
mod rules;
mod security;
mod sidecar;
mod status_page;
mod support;
mod tls;

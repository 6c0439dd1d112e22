//! bgagent: an on-instance deployment agent for zero-downtime blue/green and in-place
//! deployments of Magento 2 and other PHP applications with AWS CodeDeploy.
//!
//! See docs/ARCHITECTURE.md for the module map.

pub mod appdir;
pub mod archive;
pub mod cache;
pub mod cleanup;
pub mod cli;
pub mod client;
pub mod config;
pub mod cron;
pub mod daemon;
pub mod dbschema;
pub mod drain;
pub mod events;
pub mod fsutil;
pub mod health;
pub mod lifecycle;
pub mod logstream;
pub mod maintenance;
pub mod opcache;
pub mod params;
pub mod peer;
pub mod perms;
pub mod process;
pub mod procs;
pub mod progress;
pub mod protocol;
pub mod readiness;
pub mod release;
pub mod render;
pub mod schema;
pub mod secret;
pub mod services;
pub mod state;
pub mod status;
pub mod text;
pub mod warmup;

//! bgagent: an on-instance deployment agent for zero-downtime blue/green and in-place
//! deployments of Magento 2 and other PHP applications with AWS CodeDeploy.
//!
//! See docs/ARCHITECTURE.md for the module map.

pub mod config;
pub mod fsutil;
pub mod perms;
pub mod release;

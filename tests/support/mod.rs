#![allow(dead_code)]

pub mod envoy;
pub mod gateway;
pub mod netns;
pub mod nfqueue;
pub mod process;
pub mod scripted;

//! Test support, not the production API: the rigs the integration tests, the benchmarks and
//! `netwarden demo` drive the agent with. [`sandbox`]: a throw-away network namespace driven
//! with the real iproute2; [`listen`]: an independent rtnetlink listener that sees the kernel's
//! notifications the way any other process would; [`commit_clock`]: commit-to-commit timing of
//! nf_tables transactions, for the chain and nftables benchmarks; [`lines`]: a child's output
//! kept line by line.

pub mod commit_clock;
pub mod lines;
pub mod listen;
pub mod sandbox;

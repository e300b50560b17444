//! NetworkPolicy (`networking.k8s.io/v1`) for the pods of one node.
//!
//! In: policies, pods and namespaces as the API server has them, and which pods are this node's.
//! Out: a [`program::Program`]: the nftables sets, maps and chains that enforce the policies on
//! this node's forward hook, which `weft-sys` writes in one atomic batch, and which
//! [`program::Program::evaluate`] runs in userspace (tests, and finding live flows a change
//! now denies).

pub mod compile;
pub mod model;
pub mod program;
#[cfg(test)]
mod tests;

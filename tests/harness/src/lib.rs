//! weft test harness (placeholder until written)

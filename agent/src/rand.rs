//! Random numbers from the system's secure generator (aws-lc-rs, the TLS provider): seeds for
//! the fast per-thread generators, retry jitter. Nothing here makes keys or tokens; those come
//! from the CA and the key generator.

/// 64 random bits from the system's secure generator.
pub fn secure_u64() -> u64 {
    let mut buf = [0u8; 8];
    aws_lc_rs::rand::fill(&mut buf).expect("invariant: the system RNG is available");
    u64::from_le_bytes(buf)
}

//! The agent's two proxy sides: [`inbound`] (tunnels from other agents to local services) and
//! [`outbound`] (local upstream listeners to remote agents).

pub mod inbound;
pub mod outbound;

/// A small xorshift generator for load-balancing choices (not for secrets).
pub(crate) fn rng() -> impl FnMut() -> u64 {
    let seed = u64::from_le_bytes(meshgate_ca::pki::random_bytes::<8>()) | 1;
    let mut x = seed;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

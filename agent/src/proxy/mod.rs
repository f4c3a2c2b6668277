//! The agent's two proxy sides: [`inbound`] (tunnels from other agents to local services) and
//! [`outbound`] (local upstream listeners to remote agents).

pub mod inbound;
pub mod outbound;

/// A small xorshift generator for load-balancing choices (not for secrets).
pub(crate) fn rng() -> impl FnMut() -> u64 {
    let seed = crate::rand::secure_u64() | 1;
    let mut x = seed;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

//! meshgate gateway mode: edge policy (routes, JWT, API keys, rate limits, CORS, transforms,
//! transcoding) layered on the agent's data plane.
//!
//! It depends on `meshgate-agent` and never the reverse, and it holds no socket code: listeners,
//! TLS and tunnels live in `meshgate-agent`. The edge filters arrive with the gateway issues.

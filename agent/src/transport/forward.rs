//! Byte splicing between two streams with correct half-close: when one side finishes sending,
//! the other side's write half is shut down and the reverse direction keeps flowing.

use tokio::io::{AsyncRead, AsyncWrite};

/// Buffer per direction; large enough for bulk transfers over the tunnel.
const BUF: usize = 64 * 1024;

/// Copies both ways until both directions are done. Returns (bytes a->b, bytes b->a).
pub async fn splice<A, B>(a: &mut A, b: &mut B) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional_with_sizes(a, b, BUF, BUF).await
}

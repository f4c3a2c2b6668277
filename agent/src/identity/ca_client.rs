//! Connections to the CA: TLS 1.3 with a SPIFFE server verifier (pinned root at join, the live
//! bundle afterwards), HTTP/2 for gRPC, and error text that names the real cause.

use std::{sync::Arc, time::Duration};

use hyper_util::rt::TokioIo;
use meshgate_proto::ca::v1::certificate_authority_client::CertificateAuthorityClient;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint, Uri};

use super::IdentityError;

/// A gRPC client for the CA.
pub type CaClient = CertificateAuthorityClient<Channel>;

/// Splits `https://host:port` (scheme optional, port default 15012).
pub(crate) fn parse_address(addr: &str) -> Result<(String, u16), IdentityError> {
    let rest = addr.strip_prefix("https://").unwrap_or(addr);
    if let Some((scheme, _)) = rest.split_once("://") {
        return Err(IdentityError::Config(format!(
            "CA address {addr:?} uses {scheme}://: the CA speaks gRPC over TLS only, so write https://HOST:PORT (default port 15012)"
        )));
    }
    if rest.trim().is_empty() {
        return Err(IdentityError::Config(
            "CA address is empty: write https://HOST:PORT of `meshgate ca serve`".into(),
        ));
    }
    let rest = rest.trim_end_matches('/');
    let uri: Uri = format!("https://{rest}")
        .parse()
        .map_err(|e| IdentityError::Config(format!("CA address {addr:?}: {e}")))?;
    let host = uri
        .host()
        .ok_or_else(|| IdentityError::Config(format!("CA address {addr:?} has no host")))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    Ok((host, uri.port_u16().unwrap_or(15012)))
}

/// Connects to the CA at `addr` (`https://HOST:PORT`) with `tls`; ALPN h2 is set here.
pub async fn connect(addr: &str, tls: ClientConfig) -> Result<CaClient, IdentityError> {
    let (host, port) = parse_address(addr)?;
    let mut tls = tls;
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let server_name = ServerName::try_from(host.clone())
        .map_err(|e| IdentityError::Config(format!("CA host {host:?}: {e}")))?;
    let endpoint = Endpoint::from_shared(format!("http://{}", authority(&host, port)))
        .map_err(|e| IdentityError::Config(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let (connector, server_name, host) =
                (connector.clone(), server_name.clone(), host.clone());
            async move {
                let tcp = TcpStream::connect((host.as_str(), port)).await?;
                tcp.set_nodelay(true)?;
                let tls = connector.connect(server_name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|e| IdentityError::CaUnreachable {
            address: addr.to_owned(),
            transient: is_transient(&e),
            reason: error_chain(&e),
        })?;
    Ok(CertificateAuthorityClient::new(channel))
}

fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The TLS error inside `e`, if one of its causes is (or wraps) a rustls error.
fn tls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(t) = e.downcast_ref::<rustls::Error>() {
        return Some(t);
    }
    // an io::Error's source() skips the error it wraps: look inside it
    e.downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

/// A TLS failure that reached us only as text (hyper and h2 turn some I/O errors into
/// strings): the alert a peer sent, in words.
fn tls_text(msg: &str) -> Option<String> {
    let alert = msg.split("received fatal alert: ").nth(1)?;
    let alert = alert.split_whitespace().next().unwrap_or(alert);
    Some(match alert {
        "CertificateExpired" => "the peer refused our certificate: it has expired".into(),
        "BadCertificate" | "CertificateUnknown" | "UnknownCA" => {
            "the peer refused our certificate".into()
        }
        "CertificateRequired" => "the peer requires a client certificate".into(),
        other => format!("the peer ended the TLS handshake ({other})"),
    })
}

/// Whether a connection failure may go away by itself (refused, reset, timed out, name not
/// resolved yet) rather than being a certificate or protocol problem that retrying cannot fix.
pub(crate) fn is_transient(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if tls_error(err).is_some() || tls_text(&err.to_string()).is_some() {
            return false;
        }
        cur = err.source();
    }
    true
}

/// "outer: inner: innermost", skipping repeats, generic wrappers ("transport error",
/// "client error (Connect)") and rustls' `Debug` forms: what a person needs to read.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = Some(e);
    while let Some(err) = cur {
        let text = err.to_string();
        let is_tls = tls_error(err).is_some() || tls_text(&text).is_some();
        let msg = match (tls_error(err), tls_text(&text)) {
            (Some(t), _) => meshgate_ca::verify::describe_tls_error(t),
            (None, Some(alert)) => alert,
            // tonic's Status prints its source in Debug form; its message is what it says
            (None, None) => match err.downcast_ref::<tonic::Status>() {
                Some(status) => status.message().to_owned(),
                // "Connection refused (os error 111)": the number says nothing more
                None => match text.find(" (os error ") {
                    Some(i) if text.ends_with(')') => text[..i].to_owned(),
                    _ => text,
                },
            },
        };
        let generic = matches!(
            msg.as_str(),
            "transport error" | "client error (Connect)" | "error trying to connect" | ""
        );
        if !generic && parts.last().is_none_or(|l| !l.contains(&msg)) {
            parts.push(msg);
        }
        if is_tls {
            break;
        }
        cur = err.source();
    }
    if parts.is_empty() {
        return e.to_string();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        for (input, host, port) in [
            ("https://127.0.0.1:15012", "127.0.0.1", 15012),
            ("ca.example:9000", "ca.example", 9000),
            ("https://ca.example", "ca.example", 15012),
            ("https://[::1]:15012/", "::1", 15012),
        ] {
            assert_eq!(parse_address(input).expect(input), (host.to_owned(), port));
        }
        let e = parse_address("http://ca:1").expect_err("http").to_string();
        assert!(
            e.contains("https://HOST:PORT") && e.contains("http://"),
            "{e}"
        );
        assert!(parse_address("").is_err());
    }

    #[test]
    fn error_chains_read_like_sentences() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(is_transient(&refused));
        let tls = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidYet),
        );
        assert!(!is_transient(&tls));
        let text = error_chain(&tls);
        assert!(
            text.contains("not valid yet") && text.contains("clock"),
            "{text}"
        );
        assert!(!text.contains("NotValidYet"), "{text}");
        let alert = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "received fatal alert: CertificateExpired",
        );
        assert!(!is_transient(&alert));
        assert_eq!(
            error_chain(&alert),
            "the peer refused our certificate: it has expired"
        );
        let status = tonic::Status::from_error(Box::new(alert));
        let text = error_chain(&status);
        assert!(
            !text.contains("Custom {") && !text.contains("tonic::"),
            "{text}"
        );
    }
}

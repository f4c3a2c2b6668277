//! gRPC status <-> HTTP status, as tables: the google.rpc.Code mapping for answers of a gRPC
//! service (`google/rpc/code.proto`), and gRPC's "HTTP to gRPC status code mapping" for
//! answers that are not gRPC at all (a proxy's 503 in front of the service). Also the decoding
//! of `grpc-message` (percent-encoded UTF-8). Pure.

use http::StatusCode;

/// The google.rpc.Code names, by number.
pub const CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The HTTP status for gRPC status `code` (google/rpc/code.proto); unknown codes are 500.
pub fn http_status(code: i32) -> StatusCode {
    let n = match code {
        0 => 200,
        1 => 499,
        2 => 500,
        3 => 400,
        4 => 504,
        5 => 404,
        6 => 409,
        7 => 403,
        8 => 429,
        9 => 400,
        10 => 409,
        11 => 400,
        12 => 501,
        13 => 500,
        14 => 503,
        15 => 500,
        16 => 401,
        _ => 500,
    };
    StatusCode::from_u16(n).expect("invariant: the table holds valid statuses")
}

/// The gRPC code a client should assume when a gRPC call got HTTP `status` without a
/// `grpc-status` (gRPC's http-grpc-status-mapping.md).
pub fn code_for_http(status: StatusCode) -> i32 {
    match status.as_u16() {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502..=504 => 14,
        _ => 2,
    }
}

/// `grpc-message` decoded: percent-escapes turned back into bytes, read as UTF-8 (invalid
/// sequences replaced, never dropped); a malformed escape is kept as written.
pub fn decode_grpc_message(raw: &[u8]) -> String {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    while i < raw.len() {
        if raw[i] == b'%'
            && let (Some(h), Some(l)) = (
                raw.get(i + 1).copied().and_then(hex),
                raw.get(i + 2).copied().and_then(hex),
            )
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(raw[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_grpc_code_has_its_http_status() {
        let table = [
            (0, 200),
            (1, 499),
            (2, 500),
            (3, 400),
            (4, 504),
            (5, 404),
            (6, 409),
            (7, 403),
            (8, 429),
            (9, 400),
            (10, 409),
            (11, 400),
            (12, 501),
            (13, 500),
            (14, 503),
            (15, 500),
            (16, 401),
            (17, 500),
            (-1, 500),
        ];
        for (code, http) in table {
            assert_eq!(http_status(code).as_u16(), http, "code {code}");
        }
        assert_eq!(CODE_NAMES[5], "NOT_FOUND");
        assert_eq!(CODE_NAMES[16], "UNAUTHENTICATED");
    }

    #[test]
    fn http_answers_without_grpc_status_map_to_codes() {
        for (http, code) in [
            (400, 13),
            (401, 16),
            (403, 7),
            (404, 12),
            (429, 14),
            (502, 14),
            (503, 14),
            (504, 14),
            (500, 2),
            (418, 2),
        ] {
            assert_eq!(
                code_for_http(StatusCode::from_u16(http).expect("status")),
                code,
                "{http}"
            );
        }
    }

    #[test]
    fn grpc_messages_are_percent_decoded_keeping_non_ascii() {
        assert_eq!(decode_grpc_message(b"caf%C3%A9 100%25"), "café 100%");
        assert_eq!(decode_grpc_message(b"plain"), "plain");
        assert_eq!(decode_grpc_message(b"bad %zz escape %"), "bad %zz escape %");
        assert_eq!(decode_grpc_message(b"%E2%9C%93 done"), "✓ done");
        assert_eq!(decode_grpc_message(b"%FF"), "\u{FFFD}");
    }
}

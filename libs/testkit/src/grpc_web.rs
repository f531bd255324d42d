//! A minimal gRPC-web client (binary `application/grpc-web+proto`), written
//! from the protocol description so that tests do not trust the server's
//! own library to check it.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The answer to a unary gRPC-web call.
#[derive(Debug)]
pub struct GrpcWebReply {
    /// The HTTP status (200 for any gRPC outcome).
    pub http_status: u16,
    /// The response message bytes, if any.
    pub message: Option<Bytes>,
    /// `grpc-status` (from the trailer frame or the headers).
    pub grpc_status: Option<i32>,
    /// `grpc-message`.
    pub grpc_message: Option<String>,
}

/// Calls `path` (`/package.Service/Method`) on `base_url` with an encoded
/// request message, over HTTP/1.1 as a browser would.
pub async fn unary(
    base_url: &str,
    path: &str,
    request: &[u8],
    headers: &[(&str, &str)],
) -> anyhow::Result<GrpcWebReply> {
    let mut body = BytesMut::with_capacity(5 + request.len());
    body.put_u8(0);
    body.put_u32(u32::try_from(request.len())?);
    body.put_slice(request);
    let mut call = reqwest::Client::builder()
        .http1_only()
        .build()?
        .post(format!("{base_url}{path}"))
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .body(body.freeze());
    for (k, v) in headers {
        call = call.header(*k, *v);
    }
    let response = call.send().await?;
    let http_status = response.status().as_u16();
    let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let mut grpc_status = header("grpc-status").and_then(|s| s.parse().ok());
    let mut grpc_message = header("grpc-message");
    let mut bytes = response.bytes().await?;
    let mut message = None;
    while bytes.remaining() >= 5 {
        let flags = bytes.get_u8();
        let len = bytes.get_u32() as usize;
        anyhow::ensure!(bytes.remaining() >= len, "truncated gRPC-web frame");
        let frame = bytes.split_to(len);
        if flags & 0x80 != 0 {
            for line in String::from_utf8_lossy(&frame).split("\r\n") {
                if let Some((k, v)) = line.split_once(':') {
                    match k.trim().to_ascii_lowercase().as_str() {
                        "grpc-status" => grpc_status = v.trim().parse().ok(),
                        "grpc-message" => grpc_message = Some(v.trim().to_owned()),
                        _ => {}
                    }
                }
            }
        } else {
            message = Some(frame);
        }
    }
    Ok(GrpcWebReply { http_status, message, grpc_status, grpc_message })
}

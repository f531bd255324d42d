//! A real Vault-API server for tests: RustyVault (`rvault`), started on a
//! free loopback port with file storage in a temporary directory, then
//! initialised and unsealed. It serves KV v1 at `secret/`.
//!
//! The binary is found in `SOCLE_RVAULT`, on `PATH`, or in `.tools/bin/`
//! (`cargo xtask test` installs it there when missing).
//!
//! One gap is bridged: RustyVault's responses lack the `request_id` member
//! that HashiCorp Vault always sends and that `vaultrs` requires. Clients
//! therefore talk to a small pass-through proxy that adds an empty
//! `request_id` to JSON responses and changes nothing else; everything
//! behind it (tokens, policies' absence, KV storage) is RustyVault's.

use std::{path::PathBuf, process::Stdio, time::Duration};

use anyhow::Context;

/// A running `rvault`, killed on drop.
pub struct Vault {
    /// `http://127.0.0.1:<port>` of the compatibility proxy (give this to clients).
    pub address: String,
    /// `http://127.0.0.1:<port>` of RustyVault itself.
    pub server_address: String,
    /// The root token.
    pub token: String,
    child: tokio::process::Child,
    _dir: tempfile::TempDir,
}

/// Where the `rvault` binary is.
pub fn binary() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("SOCLE_RVAULT") {
        return Some(PathBuf::from(path));
    }
    let local = crate::workspace_root().join(".tools/bin/rvault");
    if local.exists() {
        return Some(local);
    }
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|p| p.join("rvault")).find(|p| p.exists()))
}

impl Vault {
    /// Starts, initialises and unseals a server.
    pub async fn start() -> anyhow::Result<Self> {
        let binary = binary().context("rvault not found: run `cargo xtask test`, which installs it into .tools/bin")?;
        let dir = tempfile::tempdir()?;
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
            probe.local_addr()?.port()
        };
        let config = dir.path().join("vault.hcl");
        std::fs::write(
            &config,
            format!(
                "storage \"file\" {{\n  path = \"{}\"\n}}\nlistener \"tcp\" {{\n  address = \"127.0.0.1:{port}\"\n  tls_disable = true\n}}\napi_addr = \"http://127.0.0.1:{port}\"\nlog_level = \"warn\"\npid_file = \"{}\"\n",
                dir.path().join("data").display(),
                dir.path().join("rvault.pid").display(),
            ),
        )?;
        let child = tokio::process::Command::new(&binary)
            .arg("server")
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let address = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        let init: serde_json::Value = loop {
            let attempt = http
                .put(format!("{address}/v1/sys/init"))
                .json(&serde_json::json!({ "secret_shares": 1, "secret_threshold": 1 }))
                .send()
                .await;
            if let Ok(response) = attempt {
                break response.error_for_status()?.json().await?;
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("rvault did not start on port {port}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let key = init["keys"][0].as_str().context("no unseal key")?.to_owned();
        let token = init["root_token"].as_str().context("no root token")?.to_owned();
        http.put(format!("{address}/v1/sys/unseal"))
            .json(&serde_json::json!({ "key": key }))
            .send()
            .await?
            .error_for_status()?;
        let proxy = spawn_proxy(address.clone()).await?;
        Ok(Vault { address: proxy, server_address: address, token, child, _dir: dir })
    }

    /// Writes a KV v1 secret at `secret/<path>`.
    pub async fn put(&self, path: &str, values: serde_json::Value) -> anyhow::Result<()> {
        reqwest::Client::new()
            .post(format!("{}/v1/secret/{path}", self.server_address))
            .header("X-Vault-Token", &self.token)
            .json(&values)
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }
}

impl Drop for Vault {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

async fn spawn_proxy(upstream: String) -> anyhow::Result<String> {
    use axum::{body::Body, extract::Request, response::Response};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = format!("http://{}", listener.local_addr()?);
    let http = reqwest::Client::new();
    let app = axum::Router::new().fallback(move |request: Request| {
        let http = http.clone();
        let upstream = upstream.clone();
        async move {
            let (parts, body) = request.into_parts();
            let body = axum::body::to_bytes(body, 16 * 1024 * 1024).await.unwrap_or_default();
            let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
            let mut forward = http.request(parts.method.clone(), format!("{upstream}{path}")).body(body);
            for (name, value) in &parts.headers {
                if name != "host" && name != "content-length" {
                    forward = forward.header(name, value);
                }
            }
            let reply = match forward.send().await {
                Ok(reply) => reply,
                Err(_) => return Response::builder().status(502).body(Body::empty()).unwrap(),
            };
            let status = reply.status();
            let bytes = reply.bytes().await.unwrap_or_default();
            let bytes = match serde_json::from_slice::<serde_json::Value>(&bytes) {
                Ok(serde_json::Value::Object(mut map)) if status.is_success() => {
                    map.entry("request_id").or_insert_with(|| serde_json::Value::String(String::new()));
                    serde_json::to_vec(&map).unwrap_or_default().into()
                }
                _ => bytes,
            };
            Response::builder()
                .status(status.as_u16())
                .header("content-type", "application/json")
                .body(Body::from(bytes))
                .unwrap()
        }
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(address)
}

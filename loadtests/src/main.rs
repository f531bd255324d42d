//! `cargo xtask bench auth`: sign-in throughput against the raw argon2id
//! hashing rate measured in the same run, and `CheckAccess` latency with a
//! warm cache. Real services, real PostgreSQL (the test kit's), loopback only;
//! every loop is bounded in time.
//!
//! `cargo xtask bench audit`: see [`audit`]; `cargo xtask bench relay`: see [`relay`];
//! `cargo xtask bench crm`: see [`crm`].

mod audit;
mod crm;
mod relay;

use std::time::{Duration, Instant};

use argon2::{Argon2, password_hash::PasswordHasher};
use socle_proto::socle::{
    identity::v1::{
        AcceptInvitationRequest, CreateUserRequest, InvitationDelivery, LoginRequest, User,
        auth_service_client::AuthServiceClient, user_service_client::UserServiceClient,
    },
    tenancy::v1::{CheckAccessRequest, GrantScope, access_service_client::AccessServiceClient},
    r#type::v1::{ActorKind, ActorRef},
};
use socle_testkit::{Service, spawn_service};

const RUN: Duration = Duration::from_secs(10);
const PASSWORD: &str = "cheval agrafe batterie correcte";

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Raw argon2id hashes per second on every core, for `RUN`.
fn hash_rate(threads: usize) -> f64 {
    let started = Instant::now();
    let counts: Vec<u64> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut n = 0;
                    while started.elapsed() < RUN {
                        Argon2::default().hash_password(PASSWORD.as_bytes()).expect("hash");
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    counts.iter().sum::<u64>() as f64 / started.elapsed().as_secs_f64()
}

async fn auth() -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    println!("auth benchmark: {cores} cores, {}s per measure", RUN.as_secs());

    let raw = hash_rate(cores);
    println!("  raw argon2id hashing      {raw:8.1} hashes/s ({cores} threads)");

    let identity = spawn_service(Service::Identity).await?;
    let channel = tonic::transport::Endpoint::from_shared(identity.url())?.connect().await?;
    let mut users = UserServiceClient::new(channel.clone());
    let invited = users
        .create_user(CreateUserRequest {
            request_id: uuid::Uuid::new_v4().to_string(),
            user: Some(User {
                email: "bench@socle.test".into(),
                entity_id: uuid::Uuid::new_v4().to_string(),
                display_name: "Bench".into(),
                ..Default::default()
            }),
            invitation_delivery: InvitationDelivery::ReturnLink as i32,
        })
        .await?
        .into_inner();
    let token = invited.invitation_url.split("#token=").nth(1).unwrap_or_default().to_owned();
    AuthServiceClient::new(channel.clone())
        .accept_invitation(AcceptInvitationRequest { invitation_token: token, password: PASSWORD.into() })
        .await?;

    // Logins from many addresses (so brute-force limits never apply), 8 in
    // flight per core, so that database waits never leave the hashing pool
    // idle: it is the bottleneck, as it should be.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..cores * 8 {
        let mut client = AuthServiceClient::new(channel.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while started.elapsed() < RUN {
                let mut request = tonic::Request::new(LoginRequest {
                    email: "bench@socle.test".into(),
                    password: PASSWORD.into(),
                    ..Default::default()
                });
                request.metadata_mut().insert("x-forwarded-for", format!("10.0.{worker}.1").parse().expect("address"));
                client.login(request).await.expect("login");
                n += 1;
            }
            n
        }));
    }
    let mut logins = 0;
    for task in tasks {
        logins += task.await?;
    }
    let login_rate = logins as f64 / started.elapsed().as_secs_f64();
    println!("  logins through gRPC       {login_rate:8.1} logins/s");
    println!("  ratio logins / raw hashes {:8.2}   (aim ≥ 0.90)", login_rate / raw);

    // CheckAccess with a warm cache: the same question again and again.
    let tenancy = spawn_service(Service::Tenancy).await?;
    let db = socle_db::Database::connect(
        &socle_config::SecretString::from(tenancy.database.app_url_with_password()),
        2,
        Duration::from_secs(5),
    )
    .await?;
    let root = socle_tenancy::ensure_root(&db, "National", "NATIONAL", "national")
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let user = uuid::Uuid::new_v4();
    socle_tenancy::bootstrap_grant(&db, 1, user, "staff", uuid::Uuid::parse_str(&root.id)?, GrantScope::Subtree)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut access = AccessServiceClient::new(tonic::transport::Endpoint::from_shared(tenancy.url())?.connect().await?);
    let question = CheckAccessRequest {
        principal: Some(ActorRef { kind: ActorKind::User as i32, id: user.to_string(), display_name: String::new() }),
        permission: "crm.organizations.read".into(),
        entity_id: root.id.clone(),
    };
    for _ in 0..200 {
        access.check_access(question.clone()).await?;
    }
    let mut latencies = Vec::new();
    let started = Instant::now();
    while started.elapsed() < RUN && latencies.len() < 50_000 {
        let t = Instant::now();
        let reply = access.check_access(question.clone()).await?.into_inner();
        latencies.push(t.elapsed());
        anyhow::ensure!(reply.allowed, "the benchmark grant must allow");
    }
    latencies.sort();
    println!(
        "  CheckAccess (warm)        p50 {:?}  p99 {:?}  ({} calls, sequential)",
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        latencies.len()
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match std::env::args().nth(1).as_deref() {
        Some("auth") => auth().await,
        Some("audit") => audit::audit().await,
        Some("relay") => relay::relay().await,
        Some("crm") => crm::crm().await,
        _ => anyhow::bail!("usage: socle-loadtests auth|audit|relay|crm"),
    }
}

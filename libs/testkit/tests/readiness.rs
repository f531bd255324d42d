//! Readiness follows the database: a service whose database refuses it
//! reports NOT_SERVING, and SERVING again once the database is back.

use std::time::Duration;

use diesel_async::SimpleAsyncConnection;
use socle_testkit::{Service, pg_admin_url, spawn_service_with};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

async fn status(url: &str) -> i32 {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned()).unwrap().connect().await.unwrap();
    HealthClient::new(channel)
        .check(HealthCheckRequest { service: "socle.crm.v1.OrganizationService".into() })
        .await
        .unwrap()
        .into_inner()
        .status
}

async fn wait_for(url: &str, expected: ServingStatus) {
    for _ in 0..200 {
        if status(url).await == expected as i32 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{url} never reported {expected:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn health_follows_the_database() {
    let crm = spawn_service_with(Service::Crm, |c| {
        c.server.readiness_probe_ms = 50;
        c.database.acquire_timeout_ms = 300;
    })
    .await
    .unwrap();
    assert_eq!(status(&crm.url()).await, ServingStatus::Serving as i32);

    let role = crm.database.app_role.clone();
    let mut admin = socle_db::admin::connect(&pg_admin_url()).await.unwrap();
    admin
        .batch_execute(&format!(
            "ALTER ROLE {role} NOLOGIN;
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}';"
        ))
        .await
        .unwrap();
    wait_for(&crm.url(), ServingStatus::NotServing).await;

    admin.batch_execute(&format!("ALTER ROLE {role} LOGIN;")).await.unwrap();
    wait_for(&crm.url(), ServingStatus::Serving).await;
}

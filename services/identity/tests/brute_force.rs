//! Brute-force protection, over gRPC against the real service (the client
//! address is what the edge states in `x-forwarded-for`).

use diesel_async::SimpleAsyncConnection;
use socle_proto::socle::identity::v1::{
    AcceptInvitationRequest, CreateUserRequest, InvitationDelivery, LoginRequest, User,
    auth_service_client::AuthServiceClient, user_service_client::UserServiceClient,
};
use socle_testkit::{RunningService, Service, spawn_service};
use tonic::transport::Channel;
use tonic_types::StatusExt;

const PASSWORD: &str = "cheval agrafe batterie correcte";

struct Fixture {
    identity: RunningService,
    auth: AuthServiceClient<Channel>,
}

async fn fixture(emails: &[&str]) -> Fixture {
    let identity = spawn_service(Service::Identity).await.unwrap();
    let channel = tonic::transport::Endpoint::from_shared(identity.url()).unwrap().connect().await.unwrap();
    let mut users = UserServiceClient::new(channel.clone());
    let mut auth = AuthServiceClient::new(channel);
    for email in emails {
        let invited = users
            .create_user(CreateUserRequest {
                request_id: uuid::Uuid::new_v4().to_string(),
                user: Some(User {
                    email: (*email).into(),
                    entity_id: uuid::Uuid::new_v4().to_string(),
                    display_name: "Test".into(),
                    ..Default::default()
                }),
                invitation_delivery: InvitationDelivery::ReturnLink as i32,
            })
            .await
            .unwrap()
            .into_inner();
        let token = invited.invitation_url.split("#token=").nth(1).unwrap().to_owned();
        auth.accept_invitation(AcceptInvitationRequest { invitation_token: token, password: PASSWORD.into() })
            .await
            .unwrap();
    }
    Fixture { identity, auth }
}

impl Fixture {
    async fn login(&mut self, email: &str, password: &str, from: &str) -> Result<(), tonic::Status> {
        let mut request =
            tonic::Request::new(LoginRequest { email: email.into(), password: password.into(), ..Default::default() });
        request.metadata_mut().insert("x-forwarded-for", from.parse().unwrap());
        self.auth.login(request).await.map(|_| ())
    }

    /// Time passes: every running lock is over.
    async fn expire_locks(&self) {
        let mut admin = socle_db::admin::connect(&self.identity.database.owner_url).await.unwrap();
        admin.batch_execute("UPDATE login_throttle SET locked_until = now() - interval '1 second'").await.unwrap();
    }
}

fn retry_after(status: &tonic::Status) -> u64 {
    status.get_error_details().retry_info().and_then(|r| r.retry_delay).map(|d| d.as_secs()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn failures_from_one_address_lock_that_address_out_with_growing_delays() {
    let mut f = fixture(&["claire@exemple.fr"]).await;
    for _ in 0..5 {
        let status = f.login("claire@exemple.fr", "not the password", "198.51.100.7").await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
    }
    // Locked now, even with the right password, from that address.
    let locked = f.login("claire@exemple.fr", PASSWORD, "198.51.100.7").await.unwrap_err();
    assert_eq!(locked.code(), tonic::Code::ResourceExhausted);
    let first = retry_after(&locked);
    assert!((1..=30).contains(&first), "{first}");
    // The person, from another address, still signs in.
    f.login("claire@exemple.fr", PASSWORD, "203.0.113.10").await.unwrap();

    // After the lock, one more failure locks again, for longer.
    f.expire_locks().await;
    f.login("claire@exemple.fr", "still not it", "198.51.100.7").await.unwrap_err();
    let longer = retry_after(&f.login("claire@exemple.fr", PASSWORD, "198.51.100.7").await.unwrap_err());
    assert!(longer > first && longer <= 60, "{first} then {longer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn guesses_spread_over_many_addresses_lock_the_account_for_a_bounded_time() {
    let mut f = fixture(&["bruno@exemple.fr"]).await;
    for i in 0..20 {
        f.login("bruno@exemple.fr", "guess", &format!("192.0.2.{i}")).await.unwrap_err();
    }
    let locked = f.login("bruno@exemple.fr", PASSWORD, "203.0.113.20").await.unwrap_err();
    assert_eq!(locked.code(), tonic::Code::ResourceExhausted);
    assert!(retry_after(&locked) <= 15 * 60, "an account lock never exceeds 15 minutes");
    // Not forever: once the lock is over, the person signs in.
    f.expire_locks().await;
    f.login("bruno@exemple.fr", PASSWORD, "203.0.113.20").await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn one_address_guessing_many_accounts_is_locked_without_locking_them() {
    let mut f = fixture(&["alice@exemple.fr"]).await;
    for i in 0..50 {
        f.login(&format!("victim{i}@exemple.fr"), "guess", "198.51.100.99").await.unwrap_err();
    }
    let locked = f.login("alice@exemple.fr", PASSWORD, "198.51.100.99").await.unwrap_err();
    assert_eq!(locked.code(), tonic::Code::ResourceExhausted);
    f.login("alice@exemple.fr", PASSWORD, "203.0.113.30").await.unwrap();
}

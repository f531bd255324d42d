//! Memberships at the database level, on a real PostgreSQL: the row-level
//! security of membership types offered to descendants (readable below
//! their owner, never writable there), the status rules of periods and of
//! organisations' membership series, and lists sending the same number of
//! SQL statements whatever their page size.

use std::sync::Arc;

use chrono::NaiveDate;
use diesel::{
    QueryableByName,
    sql_types::{BigInt, Date, Nullable, SmallInt, Text, Uuid as SqlUuid},
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use socle_config::SecretString;
use socle_crm::{Caller, Crm, ancestry::set_ancestors, memberships::Memberships};
use socle_db::{Database, DbError, EntityScope, statements};
use socle_errors::Error;
use socle_proto::socle::{
    crm::v1::{
        CreateMembershipRequest, CreateMembershipTypeRequest, CreateOrganizationRequest, ListMembershipTypesRequest,
        ListMembershipsRequest, Membership, MembershipPeriodKind, MembershipType, Organization, RenewMembershipRequest,
    },
    r#type::v1::Money,
};
use socle_server::scope::ScopeResolver;
use socle_testkit::TestDatabase;
use uuid::Uuid;

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// A migrated CRM database and the membership APIs over its application
/// role, in `declared` mode (no tenancy: no entity has ancestors).
async fn api() -> (Memberships, Database) {
    let db = TestDatabase::create("crm_memberships_db").await.unwrap();
    socle_db::migrate(&SecretString::from(db.owner_url.clone()), socle_crm::MIGRATIONS, Some(&db.app_role))
        .await
        .unwrap();
    let app = Database::connect(&SecretString::from(db.app_url_with_password()), 4, std::time::Duration::from_secs(5))
        .await
        .unwrap();
    let crm = Crm { db: app.clone(), scopes: Arc::new(ScopeResolver::new(None)) };
    (Memberships::new(crm, None), app)
}

fn caller(entity: Uuid) -> Caller {
    Caller { principal: None, acting: Some(entity.to_string()) }
}

fn euros(cents: i64) -> Option<Money> {
    Some(Money { amount_cents: cents, currency_code: "EUR".into() })
}

async fn create_type(api: &Memberships, entity: Uuid, code: &str, offered: bool) -> MembershipType {
    let t = MembershipType {
        entity_id: entity.to_string(),
        code: code.to_owned(),
        display_name: format!("Adhésion {code}"),
        yearly_dues: euros(10_000),
        offered_to_descendants: offered,
        ..MembershipType::default()
    };
    let request = CreateMembershipTypeRequest { request_id: Uuid::new_v4().to_string(), membership_type: Some(t) };
    api.create_membership_type(&caller(entity), request).await.unwrap()
}

async fn create_org(api: &Memberships, entity: Uuid, name: &str) -> Organization {
    let org = Organization { entity_id: entity.to_string(), legal_name: name.to_owned(), ..Organization::default() };
    let request = CreateOrganizationRequest {
        request_id: Uuid::new_v4().to_string(),
        organization: Some(org),
        allow_duplicates: true,
    };
    api.crm.create_organization(&caller(entity), request).await.unwrap().organization.unwrap()
}

async fn create_membership(api: &Memberships, entity: Uuid, org: &str, t: &str, start: &str) -> Membership {
    let m = Membership {
        entity_id: entity.to_string(),
        organization_id: org.to_owned(),
        membership_type_id: t.to_owned(),
        start_date: start.to_owned(),
        ..Membership::default()
    };
    let request = CreateMembershipRequest { request_id: Uuid::new_v4().to_string(), membership: Some(m) };
    api.create_membership(&caller(entity), request).await.unwrap()
}

/// Runs `sql` in a transaction of `scope` with `ancestors` set, returning
/// the affected row count or the error.
async fn run(db: &Database, scope: EntityScope, ancestors: Vec<Uuid>, sql: String, id: Uuid) -> Result<usize, Error> {
    db.transaction(&scope, move |conn| {
        Box::pin(async move {
            set_ancestors(conn, &ancestors).await?;
            Ok(diesel::sql_query(sql).bind::<SqlUuid, _>(id).execute(conn).await.map_err(DbError::from)?)
        })
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn offered_types_are_readable_below_their_owner_and_never_writable_there() {
    let (api, db) = api().await;
    let (national, branch) = (Uuid::new_v4(), Uuid::new_v4());
    let offered = create_type(&api, national, "STD", true).await;
    let private = create_type(&api, national, "PRIVE", false).await;
    let offered_id = Uuid::parse_str(&offered.id).unwrap();
    let private_id = Uuid::parse_str(&private.id).unwrap();
    let branch_scope = || EntityScope::entity(branch);
    let count = "SELECT count(*) AS n FROM membership_types WHERE id = $1".to_owned();
    let visible = |ancestors: Vec<Uuid>, id: Uuid| {
        let (db, sql) = (db.clone(), count.clone());
        async move {
            db.transaction(&EntityScope::entity(branch), move |conn| {
                Box::pin(async move {
                    set_ancestors(conn, &ancestors).await?;
                    Ok::<_, Error>(
                        diesel::sql_query(sql)
                            .bind::<SqlUuid, _>(id)
                            .get_result::<Count>(conn)
                            .await
                            .map_err(DbError::from)?,
                    )
                })
            })
            .await
            .unwrap()
            .n
        }
    };

    // Without its ancestors, a branch sees no national type; with them, the
    // offered one only.
    assert_eq!(visible(vec![], offered_id).await, 0);
    assert_eq!(visible(vec![national], offered_id).await, 1);
    assert_eq!(visible(vec![national], private_id).await, 0);
    assert_eq!(visible(vec![Uuid::new_v4()], offered_id).await, 0, "only the named ancestors");

    // Writes and locks stay impossible for the branch.
    let updated = run(
        &db,
        branch_scope(),
        vec![national],
        "UPDATE membership_types SET display_name = 'Volé' WHERE id = $1".into(),
        offered_id,
    )
    .await
    .unwrap();
    assert_eq!(updated, 0, "a branch updated its ancestor's type");
    let deleted =
        run(&db, branch_scope(), vec![national], "DELETE FROM membership_types WHERE id = $1".into(), offered_id)
            .await
            .unwrap();
    assert_eq!(deleted, 0, "a branch deleted its ancestor's type");
    let locked = run(
        &db,
        branch_scope(),
        vec![national],
        "SELECT 1 FROM membership_types WHERE id = $1 FOR UPDATE".into(),
        offered_id,
    )
    .await
    .unwrap();
    assert_eq!(locked, 0, "a branch locked its ancestor's type");
    let inserted = run(
        &db,
        branch_scope(),
        vec![national],
        format!(
            "INSERT INTO membership_types (id, entity_id, code, display_name, offered_to_descendants)
             VALUES ($1, '{national}', 'INTRUS', 'Intrus', true)"
        ),
        Uuid::new_v4(),
    )
    .await;
    assert!(inserted.is_err(), "a branch created a type in its ancestor");
    let got = api.get_membership_type(&caller(national), &offered.id).await.unwrap();
    assert_eq!(got.display_name, "Adhésion STD", "nothing was written");

    // Through the API, in `declared` mode there are no ancestors: the branch
    // lists its own types only, and cannot use the national one.
    let list = api
        .list_membership_types(
            &caller(branch),
            ListMembershipTypesRequest { entity_id: branch.to_string(), ..ListMembershipTypesRequest::default() },
        )
        .await
        .unwrap();
    assert!(list.membership_types.is_empty());
    let org = create_org(&api, branch, "Scierie du Jura").await;
    let m = Membership {
        entity_id: branch.to_string(),
        organization_id: org.id.clone(),
        membership_type_id: offered.id.clone(),
        start_date: "2026-01-01".into(),
        ..Membership::default()
    };
    let request = CreateMembershipRequest { request_id: Uuid::new_v4().to_string(), membership: Some(m) };
    let refused = api.create_membership(&caller(branch), request).await.unwrap_err();
    assert_eq!(refused.violations()[0].field, "membership.membership_type_id");
}

#[test]
fn periods_follow_the_type_s_layout() {
    use socle_crm::memberships::period_end;
    let d = |s: &str| NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap();
    let (calendar, anniversary) = (MembershipPeriodKind::CalendarYear as i16, MembershipPeriodKind::Anniversary as i16);
    assert_eq!(period_end(calendar, d("2026-06-15")), d("2026-12-31"));
    assert_eq!(period_end(calendar, d("2026-01-01")), d("2026-12-31"));
    assert_eq!(period_end(anniversary, d("2026-06-15")), d("2027-06-14"));
    assert_eq!(period_end(anniversary, d("2026-01-01")), d("2026-12-31"));
    assert_eq!(period_end(anniversary, d("2023-03-01")), d("2024-02-29"), "a leap year");
    assert_eq!(period_end(anniversary, d("2024-02-29")), d("2025-02-28"));
}

#[derive(QueryableByName)]
struct Status {
    #[diesel(sql_type = SmallInt)]
    s: i16,
}

#[derive(QueryableByName)]
struct Series {
    #[diesel(sql_type = Nullable<SqlUuid>)]
    latest_membership_id: Option<Uuid>,
    #[diesel(sql_type = Nullable<Date>)]
    member_since: Option<NaiveDate>,
}

/// An organisation and its periods `(start, end, grace_end, cancel_date)`,
/// written directly; returns the organisation and the period ids.
async fn series(conn: &mut AsyncPgConnection, periods: &[(&str, &str, &str, Option<&str>)]) -> (Uuid, Vec<Uuid>) {
    let (entity, org, t) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    diesel::sql_query("INSERT INTO organizations (id, entity_id, legal_name) VALUES ($1, $2, 'Série')")
        .bind::<SqlUuid, _>(org)
        .bind::<SqlUuid, _>(entity)
        .execute(conn)
        .await
        .unwrap();
    diesel::sql_query("INSERT INTO membership_types (id, entity_id, code, display_name) VALUES ($1, $2, 'T', 'T')")
        .bind::<SqlUuid, _>(t)
        .bind::<SqlUuid, _>(entity)
        .execute(conn)
        .await
        .unwrap();
    let mut ids = Vec::new();
    for (start, end, grace, cancel) in periods {
        let id = Uuid::now_v7();
        diesel::sql_query(
            "INSERT INTO memberships (id, entity_id, organization_id, membership_type_id, start_date, end_date,
                grace_end_date, dues_cents, cancel_date)
             VALUES ($1, $2, $3, $4, $5::date, $6::date, $7::date, 0, $8::date)",
        )
        .bind::<SqlUuid, _>(id)
        .bind::<SqlUuid, _>(entity)
        .bind::<SqlUuid, _>(org)
        .bind::<SqlUuid, _>(t)
        .bind::<Text, _>(*start)
        .bind::<Text, _>(*end)
        .bind::<Text, _>(*grace)
        .bind::<Nullable<Text>, _>(*cancel)
        .execute(conn)
        .await
        .unwrap();
        ids.push(id);
    }
    diesel::sql_query("SELECT crm_refresh_membership($1)").bind::<SqlUuid, _>(org).execute(conn).await.unwrap();
    (org, ids)
}

async fn org_status(conn: &mut AsyncPgConnection, org: Uuid, today: &str) -> i16 {
    diesel::sql_query(
        "SELECT crm_membership_status(o.latest_membership_id, o.latest_membership_cancelled, o.member_since,
            o.latest_membership_end, o.latest_membership_grace_end, $2::date) AS s
           FROM organizations o WHERE o.id = $1",
    )
    .bind::<SqlUuid, _>(org)
    .bind::<Text, _>(today)
    .get_result::<Status>(conn)
    .await
    .unwrap()
    .s
}

async fn org_series(conn: &mut AsyncPgConnection, org: Uuid) -> Series {
    diesel::sql_query("SELECT latest_membership_id, member_since FROM organizations WHERE id = $1")
        .bind::<SqlUuid, _>(org)
        .get_result(conn)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn statuses_follow_dates_cancellations_and_renewals() {
    const UPCOMING: i16 = 2;
    const ACTIVE: i16 = 3;
    const GRACE: i16 = 4;
    const EXPIRED: i16 = 5;
    const CANCELLED: i16 = 6;
    let (_, db) = api().await;
    let d = |s: &str| NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap();
    db.transaction(&EntityScope::System, move |conn| {
        Box::pin(async move {
            // One period: upcoming, active, grace unless renewed, expired;
            // cancelled from its cancellation date only.
            let period = |cancel: Option<&'static str>, renewed: bool, today: &'static str| {
                diesel::sql_query(
                    "SELECT crm_membership_period_status('2026-01-01', '2026-12-31', '2027-03-31', $1::date, $2,
                        $3::date) AS s",
                )
                .bind::<Nullable<Text>, _>(cancel)
                .bind::<diesel::sql_types::Bool, _>(renewed)
                .bind::<Text, _>(today)
            };
            let mut status = async |cancel, renewed, today| {
                period(cancel, renewed, today).get_result::<Status>(conn).await.unwrap().s
            };
            assert_eq!(status(None, false, "2025-12-31").await, UPCOMING);
            assert_eq!(status(None, false, "2026-01-01").await, ACTIVE);
            assert_eq!(status(None, false, "2026-12-31").await, ACTIVE);
            assert_eq!(status(None, false, "2027-01-01").await, GRACE);
            assert_eq!(status(None, true, "2027-01-01").await, EXPIRED, "a renewed period has no grace");
            assert_eq!(status(None, false, "2027-04-01").await, EXPIRED);
            assert_eq!(status(Some("2026-06-01"), false, "2026-05-31").await, ACTIVE);
            assert_eq!(status(Some("2026-06-01"), false, "2026-06-01").await, CANCELLED);
            assert_eq!(status(Some("2027-02-01"), false, "2027-01-15").await, GRACE);
            assert_eq!(status(Some("2027-02-01"), false, "2027-02-01").await, CANCELLED);

            // Early renewal: the organisation stays active through both
            // periods, member since the first.
            let (org, ids) = series(
                conn,
                &[("2026-01-01", "2026-12-31", "2027-03-31", None), ("2027-01-01", "2027-12-31", "2028-03-31", None)],
            )
            .await;
            let s = org_series(conn, org).await;
            assert_eq!(s.latest_membership_id, Some(ids[1]));
            assert_eq!(s.member_since, Some(d("2026-01-01")));
            assert_eq!(org_status(conn, org, "2025-12-01").await, UPCOMING);
            assert_eq!(org_status(conn, org, "2026-06-01").await, ACTIVE);
            assert_eq!(org_status(conn, org, "2027-06-01").await, ACTIVE);
            assert_eq!(org_status(conn, org, "2028-02-01").await, GRACE);
            assert_eq!(org_status(conn, org, "2028-04-01").await, EXPIRED);

            // A cancellation taking effect later: active until then.
            let (org, _) = series(conn, &[("2026-01-01", "2026-12-31", "2027-03-31", Some("2026-09-01"))]).await;
            assert_eq!(org_status(conn, org, "2026-08-31").await, ACTIVE);
            assert_eq!(org_status(conn, org, "2026-09-01").await, CANCELLED);
            assert_eq!(org_series(conn, org).await.member_since, Some(d("2026-01-01")), "kept for the record");
            // Cancelled during the grace period.
            let (org, _) = series(conn, &[("2026-01-01", "2026-12-31", "2027-03-31", Some("2027-02-01"))]).await;
            assert_eq!(org_status(conn, org, "2027-01-15").await, GRACE);
            assert_eq!(org_status(conn, org, "2027-02-01").await, CANCELLED);
            // A renewal cancelled from its first day does not hide the period in force.
            let (org, ids) = series(
                conn,
                &[
                    ("2026-01-01", "2026-12-31", "2027-03-31", None),
                    ("2027-01-01", "2027-12-31", "2028-03-31", Some("2027-01-01")),
                ],
            )
            .await;
            assert_eq!(org_series(conn, org).await.latest_membership_id, Some(ids[0]));
            assert_eq!(org_status(conn, org, "2026-06-01").await, ACTIVE);
            assert_eq!(org_status(conn, org, "2027-02-01").await, GRACE);
            // Only a period cancelled from its start: cancelled from then.
            let (org, _) = series(conn, &[("2026-01-01", "2026-12-31", "2027-03-31", Some("2026-01-01"))]).await;
            assert_eq!(org_status(conn, org, "2025-12-31").await, UPCOMING);
            assert_eq!(org_status(conn, org, "2026-01-01").await, CANCELLED);
            // A gap interrupts the series; a cancelled period ends it early.
            let (org, _) = series(
                conn,
                &[("2024-01-01", "2024-12-31", "2025-03-31", None), ("2026-01-01", "2026-12-31", "2027-03-31", None)],
            )
            .await;
            assert_eq!(org_series(conn, org).await.member_since, Some(d("2026-01-01")));
            let (org, _) = series(
                conn,
                &[
                    ("2025-01-01", "2025-12-31", "2026-03-31", Some("2025-07-01")),
                    ("2025-07-01", "2026-06-30", "2026-09-28", None),
                ],
            )
            .await;
            assert_eq!(org_series(conn, org).await.member_since, Some(d("2025-01-01")), "replaced, not interrupted");
            // No membership: NONE.
            let (org, _) = series(conn, &[]).await;
            assert_eq!(org_status(conn, org, "2026-01-01").await, 1);
            Ok::<_, DbError>(())
        })
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn membership_lists_do_not_grow_with_the_page_size() {
    let (api, _db) = api().await;
    let entity = Uuid::new_v4();
    let who = caller(entity);
    let mut types = Vec::new();
    for i in 0..60 {
        types.push(create_type(&api, entity, &format!("T{i:02}"), i % 2 == 0).await);
    }
    for i in 0..60 {
        let org = create_org(&api, entity, &format!("Entreprise {i:02}")).await;
        let m = create_membership(&api, entity, &org.id, &types[i % 3].id, "2025-01-01").await;
        if i % 2 == 0 {
            let request = RenewMembershipRequest {
                membership_id: m.id.clone(),
                request_id: Uuid::new_v4().to_string(),
                ..RenewMembershipRequest::default()
            };
            api.renew_membership(&who, request).await.unwrap();
        }
    }

    let memberships = |size: i32| {
        let request = ListMembershipsRequest { page_size: size, ..ListMembershipsRequest::default() };
        api.list_memberships(&who, request)
    };
    let (small, small_count) = statements::count(memberships(5)).await;
    let (large, large_count) = statements::count(memberships(50)).await;
    assert_eq!(small.unwrap().memberships.len(), 5);
    let large = large.unwrap();
    assert_eq!(large.memberships.len(), 50);
    assert!(large.memberships.iter().all(|m| !m.organization_legal_name.is_empty()), "names are filled");
    assert!(large.memberships.iter().all(|m| !m.membership_type_display_name.is_empty()), "names are filled");
    assert!(large.memberships.iter().any(|m| !m.next_membership_id.is_empty()), "links are filled");
    assert!(small_count > 0, "the counter counts");
    assert_eq!(small_count, large_count, "memberships: statements grow with the page size");
    let filtered = |size: i32| {
        let request = ListMembershipsRequest {
            page_size: size,
            statuses: vec![2, 3, 4, 5, 6],
            order_by: "organization_legal_name".into(),
            ..ListMembershipsRequest::default()
        };
        api.list_memberships(&who, request)
    };
    let (small, small_count) = statements::count(filtered(5)).await;
    let (large, large_count) = statements::count(filtered(50)).await;
    assert_eq!(small.unwrap().memberships.len(), 5);
    assert_eq!(large.unwrap().memberships.len(), 50);
    assert_eq!(small_count, large_count, "filtered memberships: statements grow with the page size");

    let types_page = |size: i32| {
        let request = ListMembershipTypesRequest { page_size: size, ..ListMembershipTypesRequest::default() };
        api.list_membership_types(&who, request)
    };
    let (small, small_count) = statements::count(types_page(5)).await;
    let (large, large_count) = statements::count(types_page(50)).await;
    assert_eq!(small.unwrap().membership_types.len(), 5);
    let large = large.unwrap();
    assert_eq!(large.membership_types.len(), 50);
    let counted: i32 = large.membership_types.iter().map(|t| t.active_membership_count).sum();
    assert!(counted > 0, "the active membership counts are filled");
    assert_eq!(small_count, large_count, "membership types: statements grow with the page size");
}

//! CSV imports and exports of memberships and interactions through the
//! edge on the secured platform: raw REST uploads and downloads, native
//! gRPC streaming, real access decisions and entity ancestors from tenancy,
//! PostgreSQL with row-level security, audit events through the outbox.

use std::collections::BTreeMap;

use chrono::{Datelike, NaiveDate, Utc};
use reqwest::Method;
use serde_json::{Value, json};
use socle_crm::exports::{INTERACTION_COLUMNS, MEMBERSHIP_COLUMNS};
use socle_proto::socle::crm::v1::{
    ExportFormat, ExportInteractionsRequest, ExportMembershipsRequest, ImportInteractionsRequest, ImportJobState,
    ImportMembershipsRequest, InteractionKind, MembershipStatus, interaction_service_client::InteractionServiceClient,
    membership_service_client::MembershipServiceClient,
};
use socle_testkit::secure::authed;
use support::{Branches, counts, data_rows, read_export, siret, siret_at, windows_1252};
use uuid::Uuid;

mod support;

/// The membership types of the tests: a national one offered to every
/// branch and one of Lyon's.
struct Types {
    /// The national type `STD` (500 € a year), offered to the branches.
    std: String,
    /// Lyon's own type `LYON` (120 € a year).
    lyon: String,
}

/// Two branches with their staff, and the membership types.
async fn world() -> (Branches, Types) {
    let w = Branches::start().await;
    let (root, lyon) = (w.p.root.clone(), w.lyon.clone());
    let std = create_type(
        &w,
        &root,
        json!({ "code": "STD", "displayName": "Adhésion standard",
            "offeredToDescendants": true, "yearlyDues": { "amountCents": "50000" } }),
    )
    .await;
    let lyon = create_type(
        &w,
        &lyon,
        json!({ "code": "LYON", "displayName": "Adhésion lyonnaise",
            "yearlyDues": { "amountCents": "12000" } }),
    )
    .await;
    (w, Types { std, lyon })
}

impl Branches {
    /// Creates a record through `path` (`field` names it in the request and
    /// the response) acting for `entity`, confirming likely duplicates;
    /// returns it.
    async fn create(&self, token: &str, path: &str, field: &str, entity: &str, record: Value) -> Value {
        let mut record = record;
        record["entityId"] = json!(entity);
        let mut body = json!({ "requestId": Uuid::new_v4().to_string(), field: record });
        if matches!(field, "organization" | "contact") {
            body["allowDuplicates"] = json!(true);
        }
        let (status, body) = self.call(token, Method::POST, path, entity, Some(body)).await;
        assert_eq!(status, 200, "{body}");
        body[field].clone()
    }

    async fn create_org(&self, token: &str, entity: &str, org: Value) -> String {
        let created = self.create(token, "/api/v1/organizations", "organization", entity, org).await;
        created["id"].as_str().unwrap().to_owned()
    }

    async fn create_membership(&self, token: &str, entity: &str, m: Value) -> Value {
        self.create(token, "/api/v1/memberships", "membership", entity, m).await
    }

    /// A CSV export that must succeed, as text.
    async fn export_text(&self, token: &str, what: &str, entity: &str, body: Value) -> String {
        String::from_utf8(self.download(token, what, entity, body).await.2).unwrap()
    }
}

async fn create_type(b: &Branches, entity: &str, t: Value) -> String {
    let mut t = t;
    t["entityId"] = json!(entity);
    let body = json!({ "requestId": Uuid::new_v4().to_string(), "membershipType": t });
    let (status, body) = b.call(&b.p.admin_token, Method::POST, "/api/v1/membership-types", entity, Some(body)).await;
    assert_eq!(status, 200, "{body}");
    body["membershipType"]["id"].as_str().unwrap().to_owned()
}

/// The data rows of a CSV export given as text.
fn text_rows(csv: &str) -> Vec<String> {
    data_rows(csv.as_bytes())
}

/// Today in Europe/Paris, close enough for dates away from the new year.
fn today() -> NaiveDate {
    (Utc::now() + chrono::Duration::hours(1)).date_naive()
}

fn jan1(year_offset: i32) -> String {
    NaiveDate::from_ymd_opt(today().year() + year_offset, 1, 1).unwrap().to_string()
}

fn dec31(year_offset: i32) -> String {
    NaiveDate::from_ymd_opt(today().year() + year_offset, 12, 31).unwrap().to_string()
}

/// Exports of `what` stay within the caller's scope: Lille's holds its one
/// record (`lille_text`) and none of Lyon's (`lyon_text`), Lille cannot
/// export Lyon, the national administrator exports the whole tree (Lyon's
/// three records and Lille's).
async fn assert_exports_in_scope(w: &Branches, what: &str, lille_text: &str, lyon_text: &str) {
    let lille_csv = w.export_text(&w.lille_staff, what, &w.lille, json!({})).await;
    assert_eq!(text_rows(&lille_csv).len(), 1, "{lille_csv}");
    assert!(lille_csv.contains(lille_text) && !lille_csv.contains(lyon_text), "{lille_csv}");
    let (status, _, _, _) = w.export(&w.lille_staff, what, &w.lyon, json!({ "entityId": w.lyon })).await;
    assert_eq!(status, 403);
    let tree = json!({ "entityId": w.p.root, "includeDescendants": true });
    let all = w.export_text(&w.p.admin_token, what, &w.p.root, tree).await;
    assert_eq!(text_rows(&all).len(), 4, "{all}");
}

/// Lyon's organisations and memberships of the export tests, and one of
/// Lille's.
struct Memberships {
    emile: String,
    emile_siret: String,
    atelier: String,
}

async fn memberships(w: &Branches, t: &Types) -> Memberships {
    let (lyon, lille) = (w.lyon.clone(), w.lille.clone());
    let emile_siret = siret(11_111_111);
    let emile =
        w.create_org(&w.lyon_staff, &lyon, json!({ "legalName": "Boulangerie Émile", "siret": emile_siret })).await;
    let atelier = w.create_org(&w.lyon_staff, &lyon, json!({ "legalName": "Atelier Numérique" })).await;
    // Last year, paid in full; this year, its renewal, unpaid.
    w.create_membership(
        &w.lyon_staff,
        &lyon,
        json!({ "organizationId": emile, "membershipTypeId": t.std, "startDate": jan1(-1),
                "amountPaid": { "amountCents": "50000" }, "paymentDate": jan1(-1), "paymentReference": "CHQ-1" }),
    )
    .await;
    let renewal = w
        .create_membership(
            &w.lyon_staff,
            &lyon,
            json!({ "organizationId": emile, "membershipTypeId": t.std, "startDate": jan1(0) }),
        )
        .await;
    assert!(!renewal["previousMembershipId"].as_str().unwrap_or("").is_empty(), "{renewal}");
    w.create_membership(
        &w.lyon_staff,
        &lyon,
        json!({ "organizationId": atelier, "membershipTypeId": t.lyon, "startDate": jan1(0),
                "duesAmount": { "amountCents": "15050" }, "amountPaid": { "amountCents": "5000" },
                "notes": "Relance : « urgent », voir courrier" }),
    )
    .await;
    let nord = w.create_org(&w.lille_staff, &lille, json!({ "legalName": "Brasserie du Nord" })).await;
    w.create_membership(
        &w.lille_staff,
        &lille,
        json!({ "organizationId": nord, "membershipTypeId": t.std, "startDate": jan1(0) }),
    )
    .await;
    Memberships { emile, emile_siret, atelier }
}

#[tokio::test(flavor = "multi_thread")]
async fn membership_exports_stay_in_scope_apply_the_list_filters_in_csv_and_json_lines() {
    let (w, t) = world().await;
    let lyon = w.lyon.clone();
    let m = memberships(&w, &t).await;

    // CSV by default: `;`, UTF-8 with a byte order mark, a file name, every
    // column, the type's code and the organisation's identifiers.
    let (content_type, disposition, bytes) =
        w.download(&w.lyon_staff, "memberships", &lyon, json!({ "entityId": lyon })).await;
    assert_eq!(content_type, "text/csv; charset=utf-8");
    assert!(disposition.starts_with("attachment; filename=\"adhesions-"), "{disposition}");
    let csv = String::from_utf8(bytes).unwrap();
    assert!(
        csv.starts_with(
            "\u{feff}id;organization_id;organization_siret;organization_siren;organization_external_ref;\
             organization_legal_name;membership_type_id;membership_type_code;membership_type_display_name;\
             start_date;end_date;dues_amount;amount_paid;payment_status;payment_date;payment_reference;notes;status;"
        ),
        "{csv}"
    );
    let rows = text_rows(&csv);
    assert_eq!(rows.len(), 3, "{csv}");
    let paid = rows.iter().find(|r| r.contains("CHQ-1")).expect("last year's period");
    let prefix = format!(
        "|{}|{}|{}||Boulangerie Émile|{}|STD|Adhésion standard|{}|{}|500,00|500,00|paid|{}|CHQ-1||expired|",
        m.emile,
        m.emile_siret,
        &m.emile_siret[..9],
        t.std,
        jan1(-1),
        dec31(-1),
        jan1(-1)
    );
    assert!(paid.contains(&prefix), "{paid}\n{prefix}");

    assert_exports_in_scope(&w, "memberships", "Brasserie du Nord", "Émile").await;

    // The list's filters; columns chosen by name or French label.
    let columns = json!([
        "organization_legal_name",
        "Code du type d'adhésion",
        "start_date",
        "end_date",
        "dues_amount",
        "amount_paid",
        "payment_status",
        "status"
    ]);
    let active = w
        .export_text(
            &w.lyon_staff,
            "memberships",
            &lyon,
            json!({ "statuses": ["MEMBERSHIP_STATUS_ACTIVE"], "columns": columns }),
        )
        .await;
    assert_eq!(
        active,
        format!(
            "\u{feff}organization_legal_name;Code du type d'adhésion;start_date;end_date;dues_amount;amount_paid;\
             payment_status;status\r\n\
             Boulangerie Émile;STD;{};{};500,00;0,00;unpaid;active\r\n\
             Atelier Numérique;LYON;{};{};150,50;50,00;partially_paid;active\r\n",
            jan1(0),
            dec31(0),
            jan1(0),
            dec31(0)
        )
    );
    let one_column = |filter: Value| {
        let mut body = filter;
        body["columns"] = json!(["organization_legal_name", "start_date"]);
        body
    };
    for (filter, expected) in [
        (json!({ "paymentStatuses": ["PAYMENT_STATUS_PAID"] }), vec![format!("Boulangerie Émile|{}", jan1(-1))]),
        (json!({ "organizationId": m.atelier }), vec![format!("Atelier Numérique|{}", jan1(0))]),
        (
            json!({ "membershipTypeId": t.std }),
            vec![format!("Boulangerie Émile|{}", jan1(-1)), format!("Boulangerie Émile|{}", jan1(0))],
        ),
        (
            json!({ "activeOnDate": format!("{}-07-01", today().year() - 1) }),
            vec![format!("Boulangerie Émile|{}", jan1(-1))],
        ),
    ] {
        let csv = w.export_text(&w.lyon_staff, "memberships", &lyon, one_column(filter.clone())).await;
        assert_eq!(text_rows(&csv), expected, "{filter}");
    }
    for bad in [
        json!({ "columns": ["couleur"] }),
        json!({ "statuses": ["MEMBERSHIP_STATUS_NONE"] }),
        json!({ "activeOnDate": "2025-13-01" }),
        json!({ "delimiter": "|" }),
    ] {
        let (status, _, _, problem) = w.export(&w.lyon_staff, "memberships", &lyon, bad.clone()).await;
        assert_eq!(status, 400, "{bad}: {}", String::from_utf8_lossy(&problem));
    }

    // Windows-1252 and `,` on request (a cell holding `,` is quoted).
    let options = json!({ "encoding": "TEXT_ENCODING_WINDOWS_1252", "delimiter": ",", "organizationId": m.atelier,
                          "columns": ["organization_legal_name", "notes"] });
    let (content_type, _, latin) = w.download(&w.lyon_staff, "memberships", &lyon, options).await;
    assert_eq!(content_type, "text/csv; charset=windows-1252");
    let expected = "organization_legal_name,notes\r\nAtelier Numérique,\"Relance : « urgent », voir courrier\"\r\n";
    assert_eq!(latin, windows_1252(expected));

    // JSON Lines: one proto3 JSON record per line, every field included,
    // the national type's name read through Lyon's ancestors.
    let options = json!({ "format": "EXPORT_FORMAT_JSON_LINES" });
    let (content_type, disposition, jsonl) = w.download(&w.lyon_staff, "memberships", &lyon, options).await;
    assert_eq!(content_type, "application/jsonl");
    assert!(disposition.ends_with(".jsonl\""), "{disposition}");
    let lines: Vec<Value> =
        String::from_utf8(jsonl).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3);
    assert!(lines.iter().all(|l| l["entityId"] == lyon.as_str() && l.get("cancelReason").is_some()), "{lines:?}");
    let std = lines.iter().filter(|l| l["membershipTypeDisplayName"] == "Adhésion standard").count();
    assert_eq!(std, 2, "{lines:?}");
    assert!(lines.iter().any(|l| l["duesAmount"]["amountCents"] == "15050"), "{lines:?}");

    // Native gRPC through the edge, with a filter: the media type first,
    // the count last.
    let mut client = MembershipServiceClient::connect(w.p.edge.url()).await.unwrap();
    let request = ExportMembershipsRequest {
        statuses: vec![MembershipStatus::Active as i32],
        format: ExportFormat::JsonLines as i32,
        ..Default::default()
    };
    let stream = client.export_memberships(authed(request, &w.lyon_staff, &lyon)).await.unwrap().into_inner();
    let (content_type, filename, count, text) = read_export(stream).await;
    assert_eq!((content_type.as_str(), count), ("application/jsonl", 2));
    assert!(filename.starts_with("adhesions-") && filename.ends_with(".jsonl"), "{filename}");
    let statuses: Vec<Value> =
        text.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()["status"].clone()).collect();
    assert_eq!(statuses, [json!("MEMBERSHIP_STATUS_ACTIVE"), json!("MEMBERSHIP_STATUS_ACTIVE")]);
}

/// Lyon's organisations, contacts and interactions of the export tests,
/// and one of Lille's.
struct Timeline {
    emile: String,
    emile_siret: String,
    camille: String,
    paul: String,
    participant: String,
}

impl Branches {
    async fn create_contact(&self, token: &str, entity: &str, given: &str, family: &str, email: &str) -> String {
        let emails = if email.is_empty() { json!([]) } else { json!([{ "address": email, "primary": true }]) };
        let contact = json!({ "givenName": given, "familyName": family, "emails": emails });
        let created = self.create(token, "/api/v1/contacts", "contact", entity, contact).await;
        created["id"].as_str().unwrap().to_owned()
    }

    async fn create_interaction(&self, token: &str, entity: &str, interaction: Value) -> Value {
        self.create(token, "/api/v1/interactions", "interaction", entity, interaction).await
    }
}

async fn timeline(w: &Branches) -> Timeline {
    let (lyon, lille) = (w.lyon.clone(), w.lille.clone());
    let emile_siret = siret(11_111_111);
    let emile =
        w.create_org(&w.lyon_staff, &lyon, json!({ "legalName": "Boulangerie Émile", "siret": emile_siret })).await;
    let atelier = w.create_org(&w.lyon_staff, &lyon, json!({ "legalName": "Atelier Numérique" })).await;
    let camille = w.create_contact(&w.lyon_staff, &lyon, "Camille", "Durand", "camille@exemple.fr").await;
    let paul = w.create_contact(&w.lyon_staff, &lyon, "Paul", "Martin", "paul@exemple.fr").await;
    let zoe = w.create_contact(&w.lyon_staff, &lyon, "Zoé", "Sans-Courriel", "").await;
    let participant = Uuid::new_v4().to_string();
    for interaction in [
        json!({ "kind": "INTERACTION_KIND_CALL", "subject": "Relance cotisation", "occurTime": "2025-03-14T09:30:00Z",
                "duration": "900s", "direction": "INTERACTION_DIRECTION_OUTBOUND", "organizationId": emile,
                "contactIds": [camille], "tags": ["cotisation"] }),
        json!({ "kind": "INTERACTION_KIND_MEETING", "subject": "Visite atelier", "occurTime": "2025-04-02T13:00:00Z",
                "duration": "5400s", "location": "Lyon 7e", "organizationId": atelier, "contactIds": [paul, camille],
                "participantUserIds": [participant] }),
        json!({ "kind": "INTERACTION_KIND_NOTE", "subject": "Note interne", "occurTime": "2025-05-01T08:00:00Z",
                "body": "Coût : 15 € ; à revoir\nen mai", "contactIds": [paul, zoe], "tags": ["interne"] }),
    ] {
        w.create_interaction(&w.lyon_staff, &lyon, interaction).await;
    }
    let nord = w.create_org(&w.lille_staff, &lille, json!({ "legalName": "Brasserie du Nord" })).await;
    w.create_interaction(
        &w.lille_staff,
        &lille,
        json!({ "kind": "INTERACTION_KIND_NOTE", "subject": "Premier contact", "occurTime": "2025-03-01T10:00:00Z",
                "organizationId": nord }),
    )
    .await;
    Timeline { emile, emile_siret, camille, paul, participant }
}

#[tokio::test(flavor = "multi_thread")]
async fn interaction_exports_stay_in_scope_apply_the_list_filters_in_csv_and_json_lines() {
    let w = Branches::start().await;
    let lyon = w.lyon.clone();
    let t = timeline(&w).await;

    // CSV by default, every column: the organisation's SIRET and the
    // contacts' e-mail addresses next to their ids.
    let (content_type, disposition, bytes) =
        w.download(&w.lyon_staff, "interactions", &lyon, json!({ "entityId": lyon })).await;
    assert_eq!(content_type, "text/csv; charset=utf-8");
    assert!(disposition.starts_with("attachment; filename=\"interactions-"), "{disposition}");
    let csv = String::from_utf8(bytes).unwrap();
    assert!(
        csv.starts_with(
            "\u{feff}id;kind;occur_time;subject;body;duration;direction;organization_id;organization_siret;\
             organization_external_ref;organization_legal_name;contact_ids;contact_emails;event_name;location;\
             participant_user_ids;tags;author_id;create_time;update_time\r\n"
        ),
        "{csv}"
    );
    let rows = text_rows(&csv);
    assert_eq!(rows.len(), 3, "{csv}");
    let call = format!(
        "|call|2025-03-14T09:30:00.000000Z|Relance cotisation||0:15:00|outbound|{}|{}||Boulangerie Émile|{}|\
         camille@exemple.fr||||cotisation|",
        t.emile, t.emile_siret, t.camille
    );
    assert!(rows[0].contains(&call), "{}\n{call}", rows[0]);
    assert!(rows[1].contains("|meeting|2025-04-02T13:00:00.000000Z|Visite atelier||1:30:00||"), "{}", rows[1]);
    assert!(
        rows[1].contains(&format!(
            "|{}, {}|paul@exemple.fr, camille@exemple.fr||Lyon 7e|{}||",
            t.paul, t.camille, t.participant
        )),
        "{}",
        rows[1]
    );

    assert_exports_in_scope(&w, "interactions", "Premier contact", "Relance").await;

    // The list's filters; columns chosen by name or French label.
    let by_contact = w
        .export_text(
            &w.lyon_staff,
            "interactions",
            &lyon,
            json!({ "contactId": t.camille, "columns": ["subject", "Durée", "E-mails des contacts"] }),
        )
        .await;
    assert_eq!(
        by_contact,
        "\u{feff}subject;Durée;E-mails des contacts\r\nRelance cotisation;0:15:00;camille@exemple.fr\r\n\
         Visite atelier;1:30:00;paul@exemple.fr, camille@exemple.fr\r\n"
    );
    for (filter, expected) in [
        (json!({ "organizationId": t.emile }), vec!["Relance cotisation"]),
        (
            json!({ "kinds": ["INTERACTION_KIND_MEETING", "INTERACTION_KIND_NOTE"] }),
            vec!["Visite atelier", "Note interne"],
        ),
        (json!({ "startTime": "2025-04-01T00:00:00Z" }), vec!["Visite atelier", "Note interne"]),
        (json!({ "endTime": "2025-04-01T00:00:00Z" }), vec!["Relance cotisation"]),
        (json!({ "tags": ["Interne"] }), vec!["Note interne"]),
    ] {
        let mut body = filter.clone();
        body["columns"] = json!(["subject"]);
        let csv = w.export_text(&w.lyon_staff, "interactions", &lyon, body).await;
        assert_eq!(text_rows(&csv), expected, "{filter}");
    }
    for bad in [
        json!({ "columns": ["couleur"] }),
        json!({ "kinds": ["INTERACTION_KIND_UNSPECIFIED"] }),
        json!({ "startTime": "2025-04-01T00:00:00Z", "endTime": "2025-03-01T00:00:00Z" }),
        json!({ "contactId": "pas-un-id" }),
    ] {
        let (status, _, _, problem) = w.export(&w.lyon_staff, "interactions", &lyon, bad.clone()).await;
        assert_eq!(status, 400, "{bad}: {}", String::from_utf8_lossy(&problem));
    }

    // ISO-8859-1 on request: what it cannot hold becomes `?`; a cell holding
    // the delimiter or a line end is quoted.
    let options =
        json!({ "encoding": "TEXT_ENCODING_ISO_8859_1", "tags": ["interne"], "columns": ["subject", "body"] });
    let (content_type, _, latin) = w.download(&w.lyon_staff, "interactions", &lyon, options).await;
    assert_eq!(content_type, "text/csv; charset=iso-8859-1");
    assert_eq!(latin, b"subject;body\r\nNote interne;\"Co\xfbt : 15 ? ; \xe0 revoir\nen mai\"\r\n");

    // JSON Lines: every field, the author set by the server.
    let options = json!({ "format": "EXPORT_FORMAT_JSON_LINES" });
    let (content_type, _, jsonl) = w.download(&w.lyon_staff, "interactions", &lyon, options).await;
    assert_eq!(content_type, "application/jsonl");
    let lines: Vec<Value> =
        String::from_utf8(jsonl).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["duration"], "900s", "{lines:?}");
    assert_eq!(lines[1]["contactIds"], json!([t.paul, t.camille]));
    assert!(lines.iter().all(|l| l["author"]["kind"] == "ACTOR_KIND_USER" && l.get("eventName").is_some()));
    assert!(rows[0].contains(&format!("|{}|", lines[0]["author"]["id"].as_str().unwrap())), "the author's id");

    // Native gRPC through the edge, with a filter.
    let mut client = InteractionServiceClient::connect(w.p.edge.url()).await.unwrap();
    let request = ExportInteractionsRequest {
        kinds: vec![InteractionKind::Call as i32],
        columns: vec!["kind".into(), "direction".into()],
        ..Default::default()
    };
    let stream = client.export_interactions(authed(request, &w.lyon_staff, &lyon)).await.unwrap().into_inner();
    let (content_type, filename, count, text) = read_export(stream).await;
    assert_eq!((content_type.as_str(), count), ("text/csv; charset=utf-8", 1));
    assert!(filename.starts_with("interactions-") && filename.ends_with(".csv"), "{filename}");
    assert_eq!(text, "\u{feff}kind;direction\r\ncall;outbound\r\n");
}

/// The records of `what` (`memberships`, `interactions`) Lyon's list
/// returns.
async fn listed(w: &Branches, what: &str) -> Vec<Value> {
    let (status, body) =
        w.call(&w.lyon_staff, Method::GET, &format!("/api/v1/{what}?pageSize=500"), &w.lyon, None).await;
    assert_eq!(status, 200, "{body}");
    body[what].as_array().cloned().unwrap_or_default()
}

/// Deletes every record of `what` in Lyon as the national administrator,
/// newest first (a renewed membership only after its renewal); returns how
/// many.
async fn delete_all(w: &Branches, what: &str) -> usize {
    let mut ids: Vec<String> = listed(w, what).await.iter().map(|r| r["id"].as_str().unwrap().to_owned()).collect();
    ids.sort();
    for id in ids.iter().rev() {
        let path = format!("/api/v1/{what}/{id}");
        let (status, body) = w.call(&w.p.admin_token, Method::DELETE, &path, &w.lyon, None).await;
        assert_eq!(status, 200, "{body}");
    }
    ids.len()
}

/// A record of `what` (`membership`, `interaction`) read by Lyon's staff.
async fn get(w: &Branches, what: &str, id: &str) -> Value {
    let (status, body) = w.call(&w.lyon_staff, Method::GET, &format!("/api/v1/{what}s/{id}"), &w.lyon, None).await;
    assert_eq!(status, 200, "{body}");
    body[what].clone()
}

/// The reports of a job's rows, by row number.
async fn reports(w: &Branches, job: &Value) -> BTreeMap<i64, Value> {
    let rows = w.rows(&w.lyon_staff, &w.lyon, job["id"].as_str().unwrap(), "pageSize=500").await;
    rows.into_iter().map(|r| (r["rowNumber"].as_str().unwrap().parse().unwrap(), r)).collect()
}

/// The (column, reason) pairs of a row report's violations.
fn violations(row: &Value) -> Vec<(String, String)> {
    row["violations"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| (v["field"].as_str().unwrap_or("").to_owned(), v["reason"].as_str().unwrap_or("").to_owned()))
        .collect()
}

/// What an import test uploads to Lyon, and what it expects.
struct Protocol<'a> {
    /// `memberships` or `interactions`.
    what: &'static str,
    /// Options of every run besides the key and the mode (`&name=value`).
    options: &'a str,
    /// The good rows (lines 2 on), then the bad ones.
    first: Vec<u8>,
    good: i64,
    /// Each bad line's expected violations: (column as the file names it,
    /// reason).
    bad: &'a [(i64, &'a [(&'a str, &'a str)])],
    /// The first file fixed: its good rows and one more.
    fixed: Vec<u8>,
    /// A file without a required column, and that column.
    missing: (Vec<u8>, &'a str),
}

/// The runs of every import test, under one key: a dry run and an
/// all-or-nothing run that write nothing, a best-effort run that writes the
/// good rows, the fixed file that writes only the new row, the same file
/// again that returns its job; the jobs listed by kind; another branch's
/// staff refused; a file-level error; audit events for the records and the
/// job. Returns the best-effort job's reports by line.
async fn import_protocol(w: &Branches, p: Protocol<'_>) -> BTreeMap<i64, Value> {
    let what = p.what;
    let key = Uuid::new_v4().to_string();
    let query = |mode: &str, extra: &str| format!("importKey={key}&mode={mode}{}{extra}", p.options);
    let import = |query: String, file: Vec<u8>| async move {
        let (status, body) = w.import(&w.lyon_staff, what, &w.lyon, &query, file).await;
        assert_eq!(status, 200, "{body}");
        body["importJob"].clone()
    };
    let (good, bad) = (p.good, p.bad.len() as i64);
    let total = good + bad;
    let state_and_counts = |job: &Value| (job["state"].as_str().unwrap_or("").to_owned(), counts(job));

    // A dry run validates every row, reports the bad ones by column, and
    // writes nothing; so does all or nothing.
    let dry = import(query("IMPORT_MODE_BEST_EFFORT", "&dryRun=true"), p.first.clone()).await;
    assert_eq!(state_and_counts(&dry), ("IMPORT_JOB_STATE_VALIDATED".into(), [total, 0, 0, 0, bad, good]), "{dry}");
    assert_eq!(dry["recordKind"], format!("RECORD_KIND_{}", what.trim_end_matches('s').to_uppercase()));
    let rows = reports(w, &dry).await;
    for line in 2..good + 2 {
        assert_eq!(rows[&line]["outcome"], "IMPORT_ROW_OUTCOME_VALID", "{:?}", rows[&line]);
    }
    for (line, wanted) in p.bad {
        let found = violations(&rows[line]);
        for (column, reason) in *wanted {
            assert!(
                found.iter().any(|(c, r)| c == column && r == reason),
                "line {line}: no {column}/{reason} in {found:?}"
            );
        }
    }
    let failed = import(query("IMPORT_MODE_ALL_OR_NOTHING", ""), p.first.clone()).await;
    assert_eq!(state_and_counts(&failed), ("IMPORT_JOB_STATE_FAILED".into(), [total, 0, 0, 0, bad, good]));
    assert!(listed(w, what).await.is_empty(), "a dry run or all or nothing wrote something");

    // Best effort writes the good rows.
    let partial = import(query("IMPORT_MODE_BEST_EFFORT", ""), p.first.clone()).await;
    assert_eq!(
        state_and_counts(&partial),
        ("IMPORT_JOB_STATE_PARTIALLY_SUCCEEDED".into(), [total, good, 0, 0, bad, 0])
    );
    assert_eq!(listed(w, what).await.len() as i64, good);
    let created = reports(w, &partial).await;

    // The fixed file, same key: only the new row is written, the others
    // point at the records loaded first; the same file again returns its job.
    let second = import(query("IMPORT_MODE_BEST_EFFORT", ""), p.fixed.clone()).await;
    assert_eq!(state_and_counts(&second), ("IMPORT_JOB_STATE_SUCCEEDED".into(), [good + 1, 1, 0, good, 0, 0]));
    let again = reports(w, &second).await;
    for line in 2..good + 2 {
        assert_eq!(again[&line]["recordId"], created[&line]["recordId"], "line {line}");
    }
    assert_eq!(listed(w, what).await.len() as i64, good + 1);
    let third = import(query("IMPORT_MODE_BEST_EFFORT", ""), p.fixed.clone()).await;
    assert_eq!(third["id"], second["id"]);
    assert_eq!(listed(w, what).await.len() as i64, good + 1);
    let kind = dry["recordKind"].as_str().unwrap();
    let (_, jobs) =
        w.call(&w.lyon_staff, Method::GET, &format!("/api/v1/import-jobs?recordKind={kind}"), &w.lyon, None).await;
    assert_eq!(jobs["importJobs"].as_array().map(Vec::len), Some(4), "{jobs}");

    // No import into another branch; a file-level error fails the job.
    let (status, _) = w.import(&w.lille_staff, what, &w.lyon, &query("IMPORT_MODE_BEST_EFFORT", ""), p.fixed).await;
    assert_eq!(status, 403);
    let missing = import(format!("importKey={key}-incomplet"), p.missing.0).await;
    assert_eq!(missing["state"], "IMPORT_JOB_STATE_FAILED");
    assert!(missing["error"].as_str().unwrap().contains(p.missing.1), "{missing}");

    // Imported records and the job are audited like creates.
    let record = created[&2]["recordId"].as_str().unwrap().to_owned();
    let action = format!("crm.{what}.create");
    w.p.wait_for_event(&w.lyon, |e| e["action"] == action.as_str() && e["resourceId"] == record.as_str()).await;
    let job = partial["id"].as_str().unwrap().to_owned();
    w.p.wait_for_event(&w.lyon, |e| e["action"] == "crm.import_jobs.create" && e["resourceId"] == job.as_str()).await;
    created
}

#[tokio::test(flavor = "multi_thread")]
async fn membership_imports_resolve_references_report_by_column_and_write_all_or_nothing_or_best_effort() {
    let (w, _) = world().await;
    let (lyon, lille) = (w.lyon.clone(), w.lille.clone());
    let year = today().year();
    let (emile_siret, atelier_siret, nord_siret) = (siret(11_111_111), siret(22_222_222), siret(55_555_555));
    let emile =
        w.create_org(&w.lyon_staff, &lyon, json!({ "legalName": "Boulangerie Émile", "siret": emile_siret })).await;
    w.create_org(&w.lyon_staff, &lyon, json!({ "legalName": "Atelier Numérique", "siret": atelier_siret })).await;
    let transports_siren = siret(44_444_444)[..9].to_owned();
    let transports =
        w.create_org(&w.lyon_staff, &lyon, json!({ "legalName": "Transports Rhône", "siren": transports_siren })).await;
    // Two establishments of one company: its SIREN alone is ambiguous.
    let garage_siren = siret(33_333_333)[..9].to_owned();
    for (name, nic) in [("Garage Centre", 1), ("Garage Est", 2)] {
        w.create_org(&w.lyon_staff, &lyon, json!({ "legalName": name, "siret": siret_at(33_333_333, nic) })).await;
    }
    w.create_org(&w.lille_staff, &lille, json!({ "legalName": "Brasserie du Nord", "siret": nord_siret })).await;

    // French labels, Windows-1252, French dates and amounts; this year's
    // period before last year's, which it renews.
    let header = "SIRET de l'organisation;SIREN de l'organisation;Code du type d'adhésion;Date de début;Date de fin;\
                  Cotisation;Montant reçu;Statut de paiement;Date de paiement;Référence de paiement;Notes";
    let good = [
        format!("{emile_siret};;STD;{year}-01-01;;;;;;;"),
        format!("{emile_siret};;std;01/01/{};;;;payée;15/02/{};CHQ-1;Historique", year - 1, year - 1),
        format!(";{transports_siren};LYON;{year}-01-01;;150,50;50 €;;;;Relance : « urgent »"),
    ];
    let bad = [
        format!("{nord_siret};;STD;{year}-01-01;;;;;;;"),
        format!(";{garage_siren};STD;{year}-01-01;;;;;;;"),
        format!("{atelier_siret};;STD;{year}-13-01;;douze euros;;payée à moitié;;;"),
        format!("{atelier_siret};;INCONNU;{year}-01-01;;;;;;;"),
        format!("{emile_siret};;STD;{year}-06-01;;;;;;;"),
        format!("{atelier_siret};;STD;{year}-01-01;;;600;partially_paid;;;"),
    ];
    let file = |rows: &[String]| windows_1252(&format!("{header}\r\n{}\r\n", rows.join("\r\n")));
    let created = import_protocol(
        &w,
        Protocol {
            what: "memberships",
            options: "&encoding=TEXT_ENCODING_WINDOWS_1252&filename=cotisations.csv",
            first: file(&[good.to_vec(), bad.to_vec()].concat()),
            good: 3,
            bad: &[
                (5, &[("SIRET de l'organisation", "unknown_organization")]),
                (6, &[("SIREN de l'organisation", "ambiguous_organization")]),
                (
                    7,
                    &[
                        ("Date de début", "invalid_start_date"),
                        ("Cotisation", "invalid_amount"),
                        ("Statut de paiement", "invalid_payment_status"),
                    ],
                ),
                (8, &[("Code du type d'adhésion", "unknown_membership_type")]),
                (9, &[("Date de début", "overlapping_membership")]),
                (10, &[("Statut de paiement", "invalid_payment_status")]),
            ],
            fixed: file(&[good.to_vec(), vec![format!("{atelier_siret};;STD;{year}-01-01;;;;;;;")]].concat()),
            missing: (
                format!("organization_siret;membership_type_code\n{emile_siret};STD\n").into_bytes(),
                "start_date",
            ),
        },
    )
    .await;

    // The records, as the create path makes them.
    let id = |line: i64| created[&line]["recordId"].as_str().unwrap().to_owned();
    let (renewal, history) = (get(&w, "membership", &id(2)).await, get(&w, "membership", &id(3)).await);
    assert_eq!(renewal["organizationId"], emile.as_str());
    assert_eq!(renewal["previousMembershipId"], id(3), "linked to the period it renews, whatever the file's order");
    assert_eq!(renewal["membershipTypeId"], history["membershipTypeId"]);
    assert_eq!(
        (history["startDate"].as_str(), history["endDate"].as_str()),
        (Some(jan1(-1).as_str()), Some(dec31(-1).as_str()))
    );
    assert_eq!(history["duesAmount"]["amountCents"], "50000", "the national type's dues");
    assert_eq!(history["amountPaid"]["amountCents"], "50000", "paid without an amount: paid in full");
    assert_eq!(history["paymentStatus"], "PAYMENT_STATUS_PAID");
    assert_eq!(history["paymentDate"], format!("{}-02-15", year - 1));
    assert_eq!((history["paymentReference"].as_str(), history["notes"].as_str()), (Some("CHQ-1"), Some("Historique")));
    let by_siren = get(&w, "membership", &id(4)).await;
    assert_eq!(by_siren["organizationId"], transports.as_str());
    assert_eq!(by_siren["membershipTypeDisplayName"], "Adhésion lyonnaise");
    assert_eq!(
        (by_siren["duesAmount"]["amountCents"].as_str(), by_siren["amountPaid"]["amountCents"].as_str()),
        (Some("15050"), Some("5000"))
    );
    assert_eq!(by_siren["paymentStatus"], "PAYMENT_STATUS_PARTIALLY_PAID");
    assert_eq!(by_siren["notes"], "Relance : « urgent »");
    // The period renewed, whose successor link changed, is audited as an
    // update; Lyon's staff cannot import into Lille.
    w.p.wait_for_event(&lyon, |e| e["action"] == "crm.memberships.update" && e["resourceId"] == id(3).as_str()).await;
    let (status, _) = w.import(&w.lyon_staff, "memberships", &lille, "importKey=x", b"start_date\n".to_vec()).await;
    assert_eq!(status, 403);
}

/// Streams `file` to an import over native gRPC through the edge, the
/// options in the first message, in chunks of 100 bytes.
fn upload_messages<M: Default>(first: M, file: &[u8], chunk: impl Fn(M, Vec<u8>) -> M) -> Vec<M> {
    let mut pieces = file.chunks(100);
    let mut messages = vec![chunk(first, pieces.next().unwrap_or_default().to_vec())];
    messages.extend(pieces.map(|c| chunk(M::default(), c.to_vec())));
    messages
}

#[tokio::test(flavor = "multi_thread")]
async fn membership_exports_re_import_as_is_over_native_grpc_and_never_twice() {
    let (w, t) = world().await;
    let lyon = w.lyon.clone();
    memberships(&w, &t).await;
    // The columns imports read (external references are never exported),
    // with the status and the link to the period renewed.
    let read: Vec<&str> = MEMBERSHIP_COLUMNS
        .iter()
        .filter(|c| c.input && c.name != "organization_external_ref")
        .map(|c| c.name)
        .collect();
    let input = json!([read, vec!["status", "previous_membership_id"]].concat());
    let before = w.export_text(&w.lyon_staff, "memberships", &lyon, json!({ "columns": input })).await;
    let exported = w.download(&w.lyon_staff, "memberships", &lyon, json!({})).await.2;

    // Every period deleted (the renewal first), then the export imported
    // back: the same periods, the renewal linked again.
    assert_eq!(delete_all(&w, "memberships").await, 3);
    assert!(listed(&w, "memberships").await.is_empty());
    let client = MembershipServiceClient::connect(w.p.edge.url()).await.unwrap();
    let first = ImportMembershipsRequest {
        entity_id: lyon.clone(),
        import_key: "copie".into(),
        filename: "adhesions.csv".into(),
        ..Default::default()
    };
    let messages = upload_messages(first, &exported, |m, chunk| ImportMembershipsRequest { chunk, ..m });
    let upload = |messages: Vec<ImportMembershipsRequest>| {
        let (mut client, request) = (client.clone(), authed(futures::stream::iter(messages), &w.lyon_staff, &lyon));
        async move { client.import_memberships(request).await.unwrap().into_inner().import_job.unwrap() }
    };
    let job = upload(messages.clone()).await;
    assert_eq!((job.state, job.counts.unwrap().created), (ImportJobState::Succeeded as i32, 3), "{job:?}");
    let after = w.export_text(&w.lyon_staff, "memberships", &lyon, json!({ "columns": input })).await;
    let rows = |csv: &str| {
        let mut rows = text_rows(csv);
        rows.sort();
        // The previous period's id changed; that there is one did not.
        rows.iter()
            .map(|r| r.rsplit_once('|').map(|(head, previous)| format!("{head}|{}", !previous.is_empty())).unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(rows(&after), rows(&before), "{after}\n{before}");
    assert!(rows(&after).iter().any(|r| r.contains("|500,00|500,00|paid|") && r.contains("|CHQ-1|")), "{after}");
    assert_eq!(rows(&after).iter().filter(|r| r.ends_with("|true")).count(), 1, "the renewal is linked again: {after}");

    // Never twice: the same upload returns the first job; under another key
    // every period is refused as overlapping the one already there.
    assert_eq!(upload(messages).await.id, job.id);
    let (status, other) =
        w.import(&w.lyon_staff, "memberships", &lyon, "importKey=autre&mode=IMPORT_MODE_BEST_EFFORT", exported).await;
    assert_eq!(status, 200, "{other}");
    assert_eq!(counts(&other["importJob"]), [3, 0, 0, 0, 3, 0], "{other}");
    let rows = reports(&w, &other["importJob"]).await;
    assert!(
        rows.values().all(|r| violations(r).contains(&("start_date".to_owned(), "overlapping_membership".to_owned()))),
        "{rows:?}"
    );
    assert_eq!(listed(&w, "memberships").await.len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn interaction_imports_resolve_organisations_and_contacts_report_by_column_and_rerun_safely() {
    let w = Branches::start().await;
    let (lyon, lille) = (w.lyon.clone(), w.lille.clone());
    let (emile_siret, atelier_siret, nord_siret) = (siret(11_111_111), siret(22_222_222), siret(55_555_555));
    let emile =
        w.create_org(&w.lyon_staff, &lyon, json!({ "legalName": "Boulangerie Émile", "siret": emile_siret })).await;
    let atelier =
        w.create_org(&w.lyon_staff, &lyon, json!({ "legalName": "Atelier Numérique", "siret": atelier_siret })).await;
    let camille = w.create_contact(&w.lyon_staff, &lyon, "Camille", "Durand", "camille.durand@exemple.fr").await;
    let paul = w.create_contact(&w.lyon_staff, &lyon, "Paul", "Martin", "paul@exemple.fr").await;
    for name in ["Accueil", "Standard"] {
        w.create_contact(&w.lyon_staff, &lyon, name, "Partagé", "accueil@exemple.fr").await;
    }
    w.create_org(&w.lille_staff, &lille, json!({ "legalName": "Brasserie du Nord", "siret": nord_siret })).await;
    w.create_contact(&w.lille_staff, &lille, "Nadia", "Nord", "nord@exemple.fr").await;

    // French labels and values, Paris times (winter and summer), contacts
    // by e-mail, organisations by SIRET; UTF-8 and `;`.
    let header = "Type;Date;Objet;Détails;Durée;Sens;SIRET de l'organisation;E-mails des contacts;Lieu;Étiquettes";
    let good = [
        format!(
            "appel;14/03/2025 10:30;Relance cotisation;;15;sortant;{emile_siret};Camille.Durand@Exemple.FR;;cotisation"
        ),
        format!(
            "réunion;2025-07-02 15:00;Visite atelier;\"Compte rendu ; à suivre\";1:30;;{atelier_siret};\
             paul@exemple.fr, camille.durand@exemple.fr;Lyon 7e;"
        ),
        "note;2025-05-01T08:00:00Z;Note interne;;;;;paul@exemple.fr;;interne".to_owned(),
    ];
    let bad = [
        format!("appel;2025-03-14 10:30;Appel de Lille;;;;{nord_siret};;;"),
        "note;2025-03-14;Accueil;;;;;accueil@exemple.fr;;".to_owned(),
        "visioconférence;31/02/2025;;;deux heures;latéral;;camille.durand@exemple.fr;;".to_owned(),
        "note;2025-03-14;Sans personne;;;;;;;".to_owned(),
        "note;2025-03-14;Contact de Lille;;;;;nord@exemple.fr;;".to_owned(),
        "note;2025-03-14;Lieu sans réunion;;;;;paul@exemple.fr;Salle A;".to_owned(),
    ];
    let file = |rows: &[String]| format!("{header}\n{}\n", rows.join("\n")).into_bytes();
    let created = import_protocol(
        &w,
        Protocol {
            what: "interactions",
            options: "",
            first: file(&[good.to_vec(), bad.to_vec()].concat()),
            good: 3,
            bad: &[
                (5, &[("SIRET de l'organisation", "unknown_organization")]),
                (6, &[("E-mails des contacts", "ambiguous_contact")]),
                (
                    7,
                    &[
                        ("Type", "invalid_kind"),
                        ("Date", "invalid_occur_time"),
                        ("Objet", "required"),
                        ("Durée", "invalid_duration"),
                        ("Sens", "invalid_direction"),
                    ],
                ),
                (8, &[("organization_id", "required")]),
                (9, &[("E-mails des contacts", "unknown_contact")]),
                (10, &[("Lieu", "invalid_location")]),
            ],
            fixed: file(&[good.to_vec(), vec![format!("note;2025-03-14;Sans personne;;;;{emile_siret};;;")]].concat()),
            missing: (b"kind;occur_time\nnote;2025-03-14\n".to_vec(), "subject"),
        },
    )
    .await;

    // The records, as the create path makes them, recorded by the importer.
    let id = |line: i64| created[&line]["recordId"].as_str().unwrap().to_owned();
    let call = get(&w, "interaction", &id(2)).await;
    assert_eq!(call["kind"], "INTERACTION_KIND_CALL");
    assert_eq!(call["occurTime"], "2025-03-14T09:30:00Z", "10:30 in Paris in winter");
    assert_eq!(
        (call["duration"].as_str(), call["direction"].as_str()),
        (Some("900s"), Some("INTERACTION_DIRECTION_OUTBOUND"))
    );
    assert_eq!((call["organizationId"].as_str(), call["contactIds"].clone()), (Some(emile.as_str()), json!([camille])));
    assert_eq!(call["tags"], json!(["cotisation"]));
    assert_eq!(call["author"]["kind"], "ACTOR_KIND_USER", "recorded by the importer");
    let meeting = get(&w, "interaction", &id(3)).await;
    assert_eq!(meeting["occurTime"], "2025-07-02T13:00:00Z", "15:00 in Paris in summer");
    assert_eq!(
        (meeting["duration"].as_str(), meeting["body"].as_str(), meeting["location"].as_str()),
        (Some("5400s"), Some("Compte rendu ; à suivre"), Some("Lyon 7e"))
    );
    assert_eq!(
        (meeting["organizationId"].as_str(), meeting["contactIds"].clone()),
        (Some(atelier.as_str()), json!([paul, camille]))
    );
    let note = get(&w, "interaction", &id(4)).await;
    assert_eq!((note["organizationId"].as_str(), note["contactIds"].clone()), (None, json!([paul])));
}

#[tokio::test(flavor = "multi_thread")]
async fn interaction_exports_re_import_as_is_over_native_grpc_and_never_twice() {
    let w = Branches::start().await;
    let lyon = w.lyon.clone();
    timeline(&w).await;
    let read: Vec<&str> = INTERACTION_COLUMNS
        .iter()
        .filter(|c| c.input && c.name != "organization_external_ref")
        .map(|c| c.name)
        .collect();
    let before = w.export_text(&w.lyon_staff, "interactions", &lyon, json!({ "columns": read })).await;
    let exported = w.download(&w.lyon_staff, "interactions", &lyon, json!({})).await.2;

    // Every interaction deleted, then the export imported back.
    assert_eq!(delete_all(&w, "interactions").await, 3);
    assert!(listed(&w, "interactions").await.is_empty());
    let client = InteractionServiceClient::connect(w.p.edge.url()).await.unwrap();
    let first = ImportInteractionsRequest { entity_id: lyon.clone(), import_key: "copie".into(), ..Default::default() };
    let messages = upload_messages(first, &exported, |m, chunk| ImportInteractionsRequest { chunk, ..m });
    let upload = |messages: Vec<ImportInteractionsRequest>| {
        let (mut client, request) = (client.clone(), authed(futures::stream::iter(messages), &w.lyon_staff, &lyon));
        async move { client.import_interactions(request).await.unwrap().into_inner().import_job.unwrap() }
    };
    let job = upload(messages.clone()).await;
    assert_eq!((job.state, job.counts.unwrap().created), (ImportJobState::Succeeded as i32, 3), "{job:?}");
    let after = w.export_text(&w.lyon_staff, "interactions", &lyon, json!({ "columns": read })).await;
    assert_eq!(text_rows(&after), text_rows(&before), "{after}\n{before}");

    // Never twice: the same upload returns the first job; the same rows in
    // another run of the key are already loaded.
    assert_eq!(upload(messages).await.id, job.id);
    let query = "importKey=copie&mode=IMPORT_MODE_BEST_EFFORT&filename=encore.csv";
    let (status, rerun) = w.import(&w.lyon_staff, "interactions", &lyon, query, exported).await;
    assert_eq!(status, 200, "{rerun}");
    assert_eq!(counts(&rerun["importJob"]), [3, 0, 0, 3, 0, 0], "{rerun}");
    assert_eq!(listed(&w, "interactions").await.len(), 3);
}

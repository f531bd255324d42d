//! CSV imports and exports of organisations and contacts, and the import
//! job reports, through the edge on the secured platform: raw REST uploads
//! and downloads, native gRPC streaming, real access decisions, PostgreSQL
//! with row-level security, audit events through the outbox.

use reqwest::Method;
use serde_json::{Value, json};
use socle_proto::socle::crm::v1::{
    ExportFormat, ExportOrganizationsRequest, ImportJobState, ImportMode, ImportOrganizationsRequest,
    organization_service_client::OrganizationServiceClient,
};
use socle_testkit::secure::authed;
use support::{Branches, counts, data_rows, fields, read_export, siret, windows_1252};
use uuid::Uuid;

mod support;

/// The two branches, and the lists these tests read.
type World = Branches;

async fn organisations(w: &World, token: &str, entity: &str) -> Vec<Value> {
    let (status, body) = w.call(token, Method::GET, "/api/v1/organizations?pageSize=500", entity, None).await;
    assert_eq!(status, 200, "{body}");
    body["organizations"].as_array().cloned().unwrap_or_default()
}

const FRENCH_HEADER: &str =
    "Raison sociale;SIRET;Code NAF;Téléphone;E-mail;Adresse;Code postal;Ville;Étiquettes;Tranche d'effectif";

fn french_file(third_row: &str) -> Vec<u8> {
    let rows = [
        FRENCH_HEADER.to_owned(),
        format!(
            "Boulangerie Émile;{};10.71C;04 78 00 00 01;contact@emile.fr;12 rue de la Paix;69002;Lyon;\
             \"Artisanat, jeune entreprise\";11",
            siret(11_111_111)
        ),
        third_row.to_owned(),
        format!("Café Zoé;{};56.30Z;;;;69001;Lyon;;", siret(22_222_222)),
    ];
    windows_1252(&(rows.join("\r\n") + "\r\n"))
}

#[tokio::test(flavor = "multi_thread")]
async fn imports_validate_by_column_write_all_or_nothing_or_best_effort_and_rerun_safely() {
    let w = Branches::start().await;
    let (lyon, lille) = (w.lyon.clone(), w.lille.clone());
    let bad = "Pâtisserie Noël;12345678901234;00.00Z;12345;pas-un-email;;6900;Lyon;;99";
    let file = french_file(bad);
    let key = Uuid::new_v4().to_string();
    let options = |mode: &str, extra: &str| {
        format!("importKey={key}&mode={mode}&encoding=TEXT_ENCODING_WINDOWS_1252&filename=adherents.csv{extra}")
    };

    // A dry run validates every row and writes nothing.
    let (status, dry) = w
        .import(
            &w.lyon_staff,
            "organizations",
            &lyon,
            &options("IMPORT_MODE_BEST_EFFORT", "&dryRun=true"),
            file.clone(),
        )
        .await;
    assert_eq!(status, 200, "{dry}");
    let dry = &dry["importJob"];
    assert_eq!(dry["state"], "IMPORT_JOB_STATE_VALIDATED", "{dry}");
    assert_eq!(counts(dry), [3, 0, 0, 0, 1, 2], "{dry}");
    assert!(organisations(&w, &w.lyon_staff, &lyon).await.is_empty(), "a dry run writes nothing");

    // Per-row violations, by column as the file names them (French
    // headers of a Windows-1252 file with `;`), on the right line.
    let rejected =
        w.rows(&w.lyon_staff, &lyon, dry["id"].as_str().unwrap(), "outcomes=IMPORT_ROW_OUTCOME_REJECTED").await;
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(rejected[0]["rowNumber"], "3");
    let fields = fields(&rejected[0]);
    for column in ["SIRET", "Code NAF", "Téléphone", "E-mail", "Code postal", "Tranche d'effectif"] {
        assert!(fields.iter().any(|f| f == column), "no violation on {column}: {rejected:?}");
    }
    let siret_violation =
        rejected[0]["violations"].as_array().unwrap().iter().find(|v| v["field"] == "SIRET").unwrap().clone();
    assert_eq!(siret_violation["reason"], "invalid_siret");
    assert!(siret_violation["description"].as_str().unwrap().contains("SIRET invalide"), "{siret_violation}");

    // All or nothing: one bad row, nothing written.
    let (status, failed) =
        w.import(&w.lyon_staff, "organizations", &lyon, &options("IMPORT_MODE_ALL_OR_NOTHING", ""), file.clone()).await;
    assert_eq!(status, 200, "{failed}");
    let failed = &failed["importJob"];
    assert_eq!(failed["state"], "IMPORT_JOB_STATE_FAILED", "{failed}");
    assert_eq!(counts(failed), [3, 0, 0, 0, 1, 2]);
    assert!(organisations(&w, &w.lyon_staff, &lyon).await.is_empty(), "all or nothing wrote something");

    // Best effort: the good rows are written, normalised like a create.
    let (status, partial) =
        w.import(&w.lyon_staff, "organizations", &lyon, &options("IMPORT_MODE_BEST_EFFORT", ""), file.clone()).await;
    assert_eq!(status, 200, "{partial}");
    let partial = partial["importJob"].clone();
    assert_eq!(partial["state"], "IMPORT_JOB_STATE_PARTIALLY_SUCCEEDED", "{partial}");
    assert_eq!(counts(&partial), [3, 2, 0, 0, 1, 0]);
    assert_eq!(partial["filename"], "adherents.csv");
    assert_eq!(partial["sizeBytes"], file.len().to_string());
    assert_eq!(partial["fileSha256"].as_str().unwrap().len(), 64);
    assert_eq!(partial["creator"]["kind"], "ACTOR_KIND_USER", "{partial}");
    let orgs = organisations(&w, &w.lyon_staff, &lyon).await;
    assert_eq!(orgs.len(), 2);
    let emile = orgs.iter().find(|o| o["legalName"] == "Boulangerie Émile").expect("accents decoded").clone();
    assert_eq!(emile["phone"], "+33478000001");
    assert_eq!(emile["tags"], json!(["artisanat", "jeune-entreprise"]));
    assert_eq!(emile["headcountBand"], "HEADCOUNT_BAND_FROM_10_TO_19");
    assert_eq!(emile["addresses"][0]["address"]["departmentCode"], "69");
    let first_rows = w.rows(&w.lyon_staff, &lyon, partial["id"].as_str().unwrap(), "").await;
    let created: Vec<String> = first_rows
        .iter()
        .filter(|r| r["outcome"] == "IMPORT_ROW_OUTCOME_CREATED")
        .map(|r| r["recordId"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(created.len(), 2);
    assert!(created.contains(&emile["id"].as_str().unwrap().to_owned()));

    // The fixed file, same key: only the fixed row is written; the others
    // were loaded already.
    let fixed = french_file(&format!(
        "Pâtisserie Noël;{};10.71D;04 78 00 00 03;noel@patisserie.fr;;69003;Lyon;;12",
        siret(33_333_333)
    ));
    let (status, second) =
        w.import(&w.lyon_staff, "organizations", &lyon, &options("IMPORT_MODE_BEST_EFFORT", ""), fixed.clone()).await;
    assert_eq!(status, 200, "{second}");
    let second = second["importJob"].clone();
    assert_eq!(second["state"], "IMPORT_JOB_STATE_SUCCEEDED", "{second}");
    assert_eq!(counts(&second), [3, 1, 0, 2, 0, 0]);
    let second_rows = w.rows(&w.lyon_staff, &lyon, second["id"].as_str().unwrap(), "").await;
    let unchanged: Vec<String> = second_rows
        .iter()
        .filter(|r| r["outcome"] == "IMPORT_ROW_OUTCOME_UNCHANGED")
        .map(|r| r["recordId"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(unchanged, created, "unchanged rows point at the records loaded first");
    assert_eq!(organisations(&w, &w.lyon_staff, &lyon).await.len(), 3);

    // The same file again: the first job, nothing written.
    let (status, again) =
        w.import(&w.lyon_staff, "organizations", &lyon, &options("IMPORT_MODE_BEST_EFFORT", ""), fixed.clone()).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["importJob"]["id"], second["id"], "{again}");
    assert_eq!(organisations(&w, &w.lyon_staff, &lyon).await.len(), 3);

    // Job reports: get, list newest first with pages, rows with pages.
    let (status, got) = w
        .call(
            &w.lyon_staff,
            Method::GET,
            &format!("/api/v1/import-jobs/{}", second["id"].as_str().unwrap()),
            &lyon,
            None,
        )
        .await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["importJob"]["importKey"], key.as_str());
    assert_eq!(got["importJob"]["recordKind"], "RECORD_KIND_ORGANIZATION");
    let mut listed = Vec::new();
    let mut token = String::new();
    loop {
        let (status, page) = w
            .call(
                &w.lyon_staff,
                Method::GET,
                &format!("/api/v1/import-jobs?pageSize=2&importKey={key}&pageToken={token}"),
                &lyon,
                None,
            )
            .await;
        assert_eq!(status, 200, "{page}");
        let jobs = page["importJobs"].as_array().cloned().unwrap_or_default();
        assert!(jobs.len() <= 2);
        listed.extend(jobs.iter().map(|j| j["id"].as_str().unwrap().to_owned()));
        token = page["nextPageToken"].as_str().unwrap_or("").to_owned();
        if token.is_empty() {
            break;
        }
    }
    let expected: Vec<String> =
        [&second, &partial, failed, dry].iter().map(|j| j["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(listed, expected, "newest first, every job once");
    let (_, succeeded) =
        w.call(&w.lyon_staff, Method::GET, "/api/v1/import-jobs?states=IMPORT_JOB_STATE_SUCCEEDED", &lyon, None).await;
    assert_eq!(succeeded["importJobs"].as_array().map(Vec::len), Some(1), "{succeeded}");
    let job = second["id"].as_str().unwrap();
    let mut numbers = Vec::new();
    let mut token = String::new();
    loop {
        let (status, page) = w
            .call(
                &w.lyon_staff,
                Method::GET,
                &format!("/api/v1/import-jobs/{job}/rows?pageSize=1&pageToken={token}"),
                &lyon,
                None,
            )
            .await;
        assert_eq!(status, 200, "{page}");
        numbers.extend(page["rows"].as_array().unwrap().iter().map(|r| r["rowNumber"].as_str().unwrap().to_owned()));
        token = page["nextPageToken"].as_str().unwrap_or("").to_owned();
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(numbers, ["2", "3", "4"], "file order, the header being line 1");

    // Isolation: Lille sees none of Lyon's jobs.
    let (status, _) = w.call(&w.lille_staff, Method::GET, &format!("/api/v1/import-jobs/{job}"), &lille, None).await;
    assert_eq!(status, 404);
    let (status, _) =
        w.call(&w.lille_staff, Method::GET, &format!("/api/v1/import-jobs/{job}/rows"), &lille, None).await;
    assert_eq!(status, 404);
    let (status, list) = w.call(&w.lille_staff, Method::GET, "/api/v1/import-jobs", &lille, None).await;
    assert_eq!(status, 200, "{list}");
    assert!(list["importJobs"].as_array().is_none_or(|j| j.is_empty()), "{list}");
    let (status, _) = w.call(&w.lille_staff, Method::GET, "/api/v1/import-jobs", &lyon, None).await;
    assert_eq!(status, 403);
    // Nor can it import into Lyon.
    let (status, _) = w
        .import(&w.lille_staff, "organizations", &lyon, &options("IMPORT_MODE_BEST_EFFORT", "&dryRun=true"), fixed)
        .await;
    assert_eq!(status, 403);

    // A file-level error fails the job with a French explanation.
    let (status, unknown) = w
        .import(&w.lyon_staff, "organizations", &lyon, "importKey=other", b"legal_name;couleur\nA;rouge\n".to_vec())
        .await;
    assert_eq!(status, 200, "{unknown}");
    assert_eq!(unknown["importJob"]["state"], "IMPORT_JOB_STATE_FAILED");
    assert!(unknown["importJob"]["error"].as_str().unwrap().contains("« couleur »"), "{unknown}");
    let (status, latin) = w
        .import(&w.lyon_staff, "organizations", &lyon, "importKey=other", windows_1252("Raison sociale\nNoël\n"))
        .await;
    assert_eq!(status, 200, "{latin}");
    assert!(latin["importJob"]["error"].as_str().unwrap().contains("UTF-8"), "{latin}");

    // Imported records and the job are audited like creates.
    let id = created[0].clone();
    w.p.wait_for_event(&lyon, |e| e["action"] == "crm.organizations.create" && e["resourceId"] == id.as_str()).await;
    let job_id = partial["id"].as_str().unwrap().to_owned();
    w.p.wait_for_event(&lyon, |e| e["action"] == "crm.import_jobs.create" && e["resourceId"] == job_id.as_str()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn duplicate_policies_reject_with_candidates_update_the_one_match_or_create_anyway() {
    let w = Branches::start().await;
    let lyon = w.lyon.clone();
    let siret_a = siret(44_444_444);
    let (status, created) = w
        .call(
            &w.lyon_staff,
            Method::POST,
            "/api/v1/organizations",
            &lyon,
            Some(json!({ "requestId": Uuid::new_v4().to_string(), "organization": {
                "entityId": lyon, "legalName": "Garage du Rhône", "siret": siret_a, "email": "garage@rhone.fr",
                "tags": ["auto"], "description": "Client historique" } })),
        )
        .await;
    assert_eq!(status, 200, "{created}");
    let existing = created["organization"]["id"].as_str().unwrap().to_owned();
    // A comma-separated UTF-8 file with the export's column names.
    let file = format!(
        "legal_name,siret,phone,tags,description\nGarage du Rhône SARL,{siret_a},04 72 00 00 00,\"reseau, auto\",\n"
    )
    .into_bytes();
    let run = |policy: &str| {
        let query = format!("importKey={}&mode=IMPORT_MODE_BEST_EFFORT&duplicatePolicy={policy}", Uuid::new_v4());
        let (w, lyon, file) = (&w, lyon.clone(), file.clone());
        async move {
            let (status, body) = w.import(&w.lyon_staff, "organizations", &lyon, &query, file).await;
            assert_eq!(status, 200, "{body}");
            let job = body["importJob"].clone();
            let rows = w.rows(&w.lyon_staff, &lyon, job["id"].as_str().unwrap(), "").await;
            (job, rows[0].clone())
        }
    };

    // Reject (the default policy): the row comes back with its candidate.
    let (job, row) = run("DUPLICATE_POLICY_REJECT").await;
    assert_eq!(job["state"], "IMPORT_JOB_STATE_FAILED", "{job}");
    assert_eq!(row["outcome"], "IMPORT_ROW_OUTCOME_REJECTED");
    assert_eq!(row["duplicates"][0]["recordId"], existing.as_str(), "{row}");
    assert!(row["duplicates"][0]["reasons"].as_array().unwrap().contains(&json!("DUPLICATE_REASON_SAME_SIRET")));
    assert!(fields(&row).contains(&"siret".to_owned()), "{row}");

    // Update existing: the one record with that SIRET takes the row's
    // non-empty values; lists are merged, empty cells change nothing.
    let (job, row) = run("DUPLICATE_POLICY_UPDATE_EXISTING").await;
    assert_eq!(job["state"], "IMPORT_JOB_STATE_SUCCEEDED", "{job} {row}");
    assert_eq!(row["outcome"], "IMPORT_ROW_OUTCOME_UPDATED");
    assert_eq!(row["recordId"], existing.as_str());
    let (_, got) = w.call(&w.lyon_staff, Method::GET, &format!("/api/v1/organizations/{existing}"), &lyon, None).await;
    let org = &got["organization"];
    assert_eq!(org["legalName"], "Garage du Rhône SARL");
    assert_eq!(org["phone"], "+33472000000");
    assert_eq!(org["email"], "garage@rhone.fr");
    assert_eq!(org["description"], "Client historique");
    assert_eq!(org["tags"], json!(["auto", "reseau"]));
    w.p.wait_for_event(&lyon, |e| e["action"] == "crm.organizations.update" && e["resourceId"] == existing.as_str())
        .await;

    // Create anyway: a second record.
    let (job, row) = run("DUPLICATE_POLICY_CREATE_ANYWAY").await;
    assert_eq!(job["state"], "IMPORT_JOB_STATE_SUCCEEDED", "{job}");
    assert_eq!(row["outcome"], "IMPORT_ROW_OUTCOME_CREATED");
    assert_ne!(row["recordId"], existing.as_str());
    assert_eq!(organisations(&w, &w.lyon_staff, &lyon).await.len(), 2);

    // Rows of one file are checked against each other too.
    let file = format!(
        "legal_name;siret;email;address_postal_code;address_city\n\
         Menuiserie Dupont;{};;69003;Lyon\n\
         Menuiserie Dupond;;;69003;Lyon\n\
         Charpente Martin;{};atelier@martin.fr;;\n\
         Charpentes Martin Frères;;Atelier@Martin.fr;;\n",
        siret(45_454_545),
        siret(46_464_646)
    );
    let (status, body) = w
        .import(&w.lyon_staff, "organizations", &lyon, "importKey=same-file&mode=IMPORT_MODE_BEST_EFFORT", file.into())
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(counts(&body["importJob"]), [4, 2, 0, 0, 2, 0], "{body}");
    let rows = w.rows(&w.lyon_staff, &lyon, body["importJob"]["id"].as_str().unwrap(), "").await;
    assert_eq!(rows[1]["duplicates"][0]["recordId"], rows[0]["recordId"], "{rows:?}");
    assert!(
        rows[1]["duplicates"][0]["reasons"]
            .as_array()
            .unwrap()
            .contains(&json!("DUPLICATE_REASON_FUZZY_NAME_POSTAL_CODE"))
    );
    assert_eq!(rows[3]["duplicates"][0]["recordId"], rows[2]["recordId"], "{rows:?}");
    assert!(fields(&rows[3]).contains(&"email".to_owned()), "{rows:?}");

    // Two records now match: updating would be a guess, so the row is rejected.
    let (_, row) = run("DUPLICATE_POLICY_UPDATE_EXISTING").await;
    assert_eq!(row["outcome"], "IMPORT_ROW_OUTCOME_REJECTED", "{row}");
    assert_eq!(row["duplicates"].as_array().unwrap().len(), 2, "{row}");
}

/// The data rows of a CSV export (BOM and header removed), sorted.
fn sorted_rows(csv: &[u8]) -> Vec<String> {
    let mut rows = data_rows(csv);
    rows.sort();
    rows
}

#[tokio::test(flavor = "multi_thread")]
async fn exports_stay_in_scope_apply_the_list_filters_and_re_import_as_is() {
    let w = Branches::start().await;
    let (lyon, lille) = (w.lyon.clone(), w.lille.clone());
    let orgs = [
        json!({ "legalName": "Société Générale de Boulangerie", "siret": siret(55_555_555), "nafCode": "10.71C",
                "legalFormCode": "5499", "headcountBand": "HEADCOUNT_BAND_FROM_3_TO_5", "tags": ["artisanat"],
                "website": "boulangerie.fr", "email": "contact@boulangerie.fr", "phone": "04 78 00 00 10",
                "description": "Deux lignes :\nune « citation » \"entre guillemets\"; et un point-virgule",
                "externalRefs": { "dolibarr": "12,5" },
                "addresses": [{ "kind": "ADDRESS_KIND_ESTABLISHMENT", "address": { "streetLine": "3 place Bellecour",
                                "complement": "Bâtiment B", "postalCode": "69002", "city": "Lyon" } }] }),
        json!({ "legalName": "Atelier Numérique", "tags": ["jeune-entreprise"] }),
        json!({ "legalName": "Transports Rhodaniens", "nafCode": "49.41A", "tags": ["artisanat", "transport"] }),
    ];
    for org in orgs {
        let mut org = org;
        org["entityId"] = json!(lyon);
        let body = json!({ "requestId": Uuid::new_v4().to_string(), "organization": org });
        let (status, created) = w.call(&w.lyon_staff, Method::POST, "/api/v1/organizations", &lyon, Some(body)).await;
        assert_eq!(status, 200, "{created}");
    }
    let body = json!({ "requestId": Uuid::new_v4().to_string(),
                       "organization": { "entityId": lille, "legalName": "Brasserie du Nord" } });
    let (status, created) = w.call(&w.lille_staff, Method::POST, "/api/v1/organizations", &lille, Some(body)).await;
    assert_eq!(status, 200, "{created}");

    // CSV by default: `;`, UTF-8 with a byte order mark, a file name.
    let (status, content_type, disposition, lyon_csv) =
        w.export(&w.lyon_staff, "organizations", &lyon, json!({ "entityId": lyon })).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&lyon_csv));
    assert_eq!(content_type, "text/csv; charset=utf-8");
    assert!(disposition.starts_with("attachment; filename=\"organisations-"), "{disposition}");
    assert!(lyon_csv.starts_with(b"\xEF\xBB\xBFid;legal_name;trade_name;siren;siret;"), "{lyon_csv:?}");
    assert_eq!(sorted_rows(&lyon_csv).len(), 3);

    // Only within the caller's scope: Lille's export has no Lyon row, and
    // Lille cannot export Lyon.
    let (status, _, _, lille_csv) = w.export(&w.lille_staff, "organizations", &lille, json!({})).await;
    assert_eq!(status, 200);
    let lille_text = String::from_utf8(lille_csv).unwrap();
    assert!(lille_text.contains("Brasserie du Nord"), "{lille_text}");
    assert!(!lille_text.contains("Boulangerie") && !lille_text.contains("Atelier"), "{lille_text}");
    let (status, _, _, _) = w.export(&w.lille_staff, "organizations", &lyon, json!({ "entityId": lyon })).await;
    assert_eq!(status, 403);
    // The national administrator exports the whole tree.
    let (status, _, _, all) = w
        .export(
            &w.p.admin_token,
            "organizations",
            &w.p.root,
            json!({ "entityId": w.p.root, "includeDescendants": true }),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(sorted_rows(&all).len(), 4);

    // The list filters apply; chosen columns, by name or French label.
    let (status, _, _, filtered) = w
        .export(
            &w.lyon_staff,
            "organizations",
            &lyon,
            json!({ "tags": ["artisanat"], "nafCodes": ["10.71"], "columns": ["legal_name", "Code NAF"] }),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        String::from_utf8(filtered).unwrap(),
        "\u{feff}legal_name;Code NAF\r\nSociété Générale de Boulangerie;10.71C\r\n"
    );
    let (status, _, _, problem) =
        w.export(&w.lyon_staff, "organizations", &lyon, json!({ "columns": ["couleur"] })).await;
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&problem));

    // Windows-1252 on request.
    let (status, content_type, _, latin) = w
        .export(
            &w.lyon_staff,
            "organizations",
            &lyon,
            json!({ "encoding": "TEXT_ENCODING_WINDOWS_1252", "columns": ["legal_name"], "tags": ["artisanat"],
                    "nafCodes": ["10.71"] }),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(content_type, "text/csv; charset=windows-1252");
    assert_eq!(latin, windows_1252("legal_name\r\nSociété Générale de Boulangerie\r\n"));

    // Round trip: Lyon's export imports into Lille as is, and Lille's
    // export of the imported records holds the same values.
    let (status, imported) = w
        .import(
            &w.lille_staff,
            "organizations",
            &lille,
            "importKey=copie-lyon&duplicatePolicy=DUPLICATE_POLICY_CREATE_ANYWAY",
            lyon_csv,
        )
        .await;
    assert_eq!(status, 200, "{imported}");
    assert_eq!(imported["importJob"]["state"], "IMPORT_JOB_STATE_SUCCEEDED", "{imported}");
    assert_eq!(counts(&imported["importJob"]), [3, 3, 0, 0, 0, 0]);
    let input_columns = json!([
        "legal_name",
        "trade_name",
        "siren",
        "siret",
        "naf_code",
        "legal_form_code",
        "headcount_band",
        "address_kind",
        "address_street_line",
        "address_complement",
        "address_postal_code",
        "address_city",
        "address_country_code",
        "website",
        "email",
        "phone",
        "tags",
        "description",
        "external_refs"
    ]);
    let (_, _, _, from_lyon) =
        w.export(&w.lyon_staff, "organizations", &lyon, json!({ "columns": input_columns })).await;
    let (_, _, _, from_lille) =
        w.export(&w.lille_staff, "organizations", &lille, json!({ "columns": input_columns })).await;
    let mut lille_rows = sorted_rows(&from_lille);
    lille_rows.retain(|r| !r.starts_with("Brasserie du Nord"));
    assert_eq!(lille_rows, sorted_rows(&from_lyon));
    assert!(sorted_rows(&from_lyon).iter().any(|r| r.contains("dolibarr=12\\,5") && r.contains("establishment")));

    // JSON Lines: one proto3 JSON record per line, every field included.
    let (status, content_type, disposition, jsonl) =
        w.export(&w.lyon_staff, "organizations", &lyon, json!({ "format": "EXPORT_FORMAT_JSON_LINES" })).await;
    assert_eq!(status, 200);
    assert_eq!(content_type, "application/jsonl");
    assert!(disposition.ends_with(".jsonl\""), "{disposition}");
    let lines: Vec<Value> =
        String::from_utf8(jsonl).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3);
    assert!(lines.iter().all(|l| l["entityId"] == lyon.as_str() && l.get("tradeName").is_some()), "{lines:?}");
    assert!(lines.iter().any(|l| l["externalRefs"]["dolibarr"] == "12,5"));
}

#[tokio::test(flavor = "multi_thread")]
async fn contacts_import_with_their_affiliation_and_export_with_it() {
    let w = Branches::start().await;
    let lyon = w.lyon.clone();
    let org_siret = siret(66_666_666);
    let body = json!({ "requestId": Uuid::new_v4().to_string(),
                       "organization": { "entityId": lyon, "legalName": "Imprimerie Croix-Rousse", "siret": org_siret } });
    let (status, created) = w.call(&w.lyon_staff, Method::POST, "/api/v1/organizations", &lyon, Some(body)).await;
    assert_eq!(status, 200, "{created}");
    let org = created["organization"]["id"].as_str().unwrap().to_owned();

    // Tab-separated, French headers, an organisation named by SIRET.
    let file = [
        "Civilité\tPrénom\tNom\tE-mail\tTéléphone\tSIRET de l'organisation\tRôles dans l'organisation\t\
         Fonction dans l'organisation\tConsentements",
        &format!(
            "Mme\tCamille\tDurand\tCamille.Durand@Exemple.FR\t06 12 34 56 78\t{org_siret}\tprimary_contact, billing_contact\t\
             Gérante\tnewsletter:email, events:sms:non"
        ),
        "M.\tPaul\tMartin\tpaul.martin@exemple.fr\t\t\t\t\t",
        "Docteur\tSans\t\tpas-un-email\t\t73282932000075\t\t\t",
    ]
    .join("\n");
    let (status, job) = w
        .import(
            &w.lyon_staff,
            "contacts",
            &lyon,
            "importKey=contacts-1&mode=IMPORT_MODE_BEST_EFFORT",
            file.into_bytes(),
        )
        .await;
    assert_eq!(status, 200, "{job}");
    let job = &job["importJob"];
    assert_eq!(job["recordKind"], "RECORD_KIND_CONTACT");
    assert_eq!(counts(job), [3, 2, 0, 0, 1, 0], "{job}");
    let rows = w.rows(&w.lyon_staff, &lyon, job["id"].as_str().unwrap(), "").await;
    let bad = fields(&rows[2]);
    for column in ["Civilité", "Nom", "E-mail", "SIRET de l'organisation"] {
        assert!(bad.iter().any(|f| f == column), "no violation on {column}: {rows:?}");
    }
    let camille = rows[0]["recordId"].as_str().unwrap().to_owned();
    let (_, got) = w.call(&w.lyon_staff, Method::GET, &format!("/api/v1/contacts/{camille}"), &lyon, None).await;
    let contact = &got["contact"];
    assert_eq!(contact["civility"], "CIVILITY_MADAME");
    assert_eq!(contact["emails"][0]["address"], "Camille.Durand@exemple.fr");
    assert_eq!(contact["phones"][0]["number"], "+33612345678");
    assert_eq!(contact["organizations"][0]["organizationId"], org.as_str(), "{contact}");
    assert_eq!(contact["organizations"][0]["jobTitle"], "Gérante");
    let consents = contact["consents"].as_array().unwrap();
    assert_eq!(consents.len(), 2, "{contact}");
    assert!(consents.iter().any(|c| c["topic"] == "CONSENT_TOPIC_NEWSLETTER" && c["granted"] == true));
    assert!(consents.iter().any(|c| c["topic"] == "CONSENT_TOPIC_EVENTS" && c.get("granted").is_none()));
    w.p.wait_for_event(&lyon, |e| e["action"] == "crm.contacts.create" && e["resourceId"] == camille.as_str()).await;
    w.p.wait_for_event(&lyon, |e| e["action"] == "crm.affiliations.create").await;

    // The export carries the affiliation; filters are those of the list.
    let (status, _, _, csv) = w.export(&w.lyon_staff, "contacts", &lyon, json!({ "organizationId": org })).await;
    assert_eq!(status, 200);
    let text = String::from_utf8(csv.clone()).unwrap();
    assert!(
        text.contains(&format!(
            ";{org};{org_siret};;Imprimerie Croix-Rousse;primary_contact, billing_contact;Gérante;"
        )),
        "{text}"
    );
    assert!(!text.contains("Martin"), "filtered on the organisation: {text}");
    assert!(text.contains("newsletter:email, events:sms:non"), "{text}");

    // Re-imported with update-existing: matched by e-mail, updated, and the
    // affiliation is not duplicated.
    let (status, again) = w
        .import(
            &w.lyon_staff,
            "contacts",
            &lyon,
            "importKey=contacts-2&duplicatePolicy=DUPLICATE_POLICY_UPDATE_EXISTING",
            csv,
        )
        .await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(counts(&again["importJob"]), [1, 0, 1, 0, 0, 0], "{again}");
    let (_, got) = w.call(&w.lyon_staff, Method::GET, &format!("/api/v1/contacts/{camille}"), &lyon, None).await;
    assert_eq!(got["contact"]["organizations"].as_array().unwrap().len(), 1, "{got}");
    assert_eq!(got["contact"]["emails"].as_array().unwrap().len(), 1, "{got}");
}

#[tokio::test(flavor = "multi_thread")]
async fn native_grpc_clients_stream_imports_and_exports_through_the_edge() {
    let w = Branches::start().await;
    let lyon = w.lyon.clone();
    let mut client = OrganizationServiceClient::connect(w.p.edge.url()).await.unwrap();
    let mut file = String::from("legal_name;siret\n");
    for i in 0..40u32 {
        file.push_str(&format!("Entreprise {i:02};{}\n", siret(70_000_000 + i * 7919)));
    }
    let bytes = file.into_bytes();
    // The options and the first chunk, then more chunks.
    let mut messages = vec![ImportOrganizationsRequest {
        entity_id: lyon.clone(),
        import_key: "grpc".into(),
        mode: ImportMode::BestEffort as i32,
        filename: "grpc.csv".into(),
        chunk: bytes[..100].to_vec(),
        ..ImportOrganizationsRequest::default()
    }];
    messages.extend(
        bytes[100..].chunks(256).map(|c| ImportOrganizationsRequest { chunk: c.to_vec(), ..Default::default() }),
    );
    let job = client
        .import_organizations(authed(futures::stream::iter(messages), &w.lyon_staff, &lyon))
        .await
        .unwrap()
        .into_inner()
        .import_job
        .unwrap();
    assert_eq!(job.state, ImportJobState::Succeeded as i32, "{job:?}");
    assert_eq!(job.counts.unwrap().created, 40);
    assert_eq!(job.size_bytes, bytes.len() as i64);

    // A message over 1 MiB is refused.
    let big = ImportOrganizationsRequest {
        entity_id: lyon.clone(),
        import_key: "big".into(),
        chunk: vec![b'a'; 1024 * 1024 + 1],
        ..Default::default()
    };
    let refused =
        client.import_organizations(authed(futures::stream::iter(vec![big]), &w.lyon_staff, &lyon)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");

    // The export streams in chunks: the media type first, the count last.
    let stream = client
        .export_organizations(authed(
            ExportOrganizationsRequest {
                entity_id: lyon.clone(),
                format: ExportFormat::Csv as i32,
                columns: vec!["legal_name".into()],
                ..Default::default()
            },
            &w.lyon_staff,
            &lyon,
        ))
        .await
        .unwrap()
        .into_inner();
    let (content_type, filename, count, text) = read_export(stream).await;
    assert_eq!((content_type.as_str(), count), ("text/csv; charset=utf-8", 40));
    assert!(filename.ends_with(".csv"));
    assert_eq!(text.lines().count(), 41);
    assert!(text.contains("Entreprise 00\r\n") && text.contains("Entreprise 39\r\n"));
}

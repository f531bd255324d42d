//! CSV imports of organisations, contacts, memberships and interactions
//! (`ImportOrganizations`, `ImportContacts`, `ImportMemberships`,
//! `ImportInteractions`) and their reports
//! (`socle.crm.v1.ImportJobService`).
//!
//! An import is uploaded as a stream: the first message carries the options
//! and maybe the first chunk (at most 1 MiB per message, 50 MiB and 200,000
//! data rows per file). Then:
//! 1. The file is decoded (UTF-8 with or without a byte order mark,
//!    Windows-1252 or ISO-8859-1; a UTF-8 mark always wins) and split as CSV
//!    (RFC 4180) with the given delimiter, or the one of `;`, tab and `,`
//!    the header row holds most of. Blank rows are skipped.
//! 2. Columns are named by the header row, or by the `columns` option (a
//!    first row made only of known column names is then the header being
//!    overridden, otherwise it is data). Names are those of the export
//!    ([`crate::exports::ORGANIZATION_COLUMNS`],
//!    [`crate::exports::CONTACT_COLUMNS`],
//!    [`crate::exports::MEMBERSHIP_COLUMNS`],
//!    [`crate::exports::INTERACTION_COLUMNS`]), their French labels, or a few
//!    common aliases, compared without case, accents or punctuation. An
//!    empty name skips a column; output-only columns (`id`,
//!    `membership_status`, times…) are ignored, so that an export
//!    re-imports as is. An unknown column, a repeated column, a missing
//!    required column (`legal_name`, `family_name`; for memberships an
//!    organisation column, a type column and `start_date`; for interactions
//!    `kind`, `subject` and `occur_time`), an unreadable encoding or too
//!    many rows fail the job with a file-level `error`.
//! 3. Each row becomes an `Organization`, a `Contact`, a `Membership` or an
//!    `Interaction` and is validated and normalised exactly like a create
//!    (`organizations::validate`, `contacts::validate`,
//!    `memberships::validate_new`, `interactions::validate`); violations are
//!    reported by column, named as in the file's header.
//! 4. Rows are identified within their import key by the SHA-256 of their
//!    non-empty mapped cells: a row already written (created or updated) by
//!    a run with the same key is reported `UNCHANGED` and not written again
//!    (so is a row repeating an earlier row of the same file). The same file
//!    (same SHA-256) sent again with the same key and options returns the
//!    first job, without writing anything.
//! 5. Valid rows are checked for duplicates (`find_duplicates`, as a
//!    create) and written through the create and update code paths, each
//!    with its audit event, in one transaction: `ALL_OR_NOTHING` and dry
//!    runs roll it back (rows reported `VALID`) when a row was rejected or
//!    when nothing may be written; `BEST_EFFORT` commits the valid rows.
//!
//! Duplicate policies: `REJECT` rejects a row with candidates (each reason
//! reported as a violation on its column); `CREATE_ANYWAY` creates it;
//! `UPDATE_EXISTING` updates the one candidate of the entity matching on an
//! identifier (SIRET, e-mail or phone; SIREN only for rows without SIRET, so
//! that two establishments of one company are never mixed up) with the
//! row's non-empty values: fields replaced, lists (tags, e-mails, phones)
//! and maps (external references, consents) merged, nothing removed;
//! otherwise the row is rejected. Updating needs the update permission.
//!
//! Contact rows may name an organisation of the entity by
//! `organization_id`, else `organization_siret`, else
//! `organization_external_ref` (`system=value`), with
//! `affiliation_roles` and `affiliation_job_title`: the affiliation is
//! created with the contact (or added to an updated contact that has no
//! current link with it), audited like a create. A reference matching
//! several organisations names the one still active among them (a SIRET
//! shared with those merged into it), else it is ambiguous.
//!
//! Membership rows name their organisation like contact rows, or by
//! `organization_siren` when one active organisation of the entity has it
//! (two establishments of a company are ambiguous), and their type by
//! `membership_type_id`, else `membership_type_code` (the entity's own type
//! with that code, else the one its nearest ancestor offers). Cells: dates
//! `YYYY-MM-DD` or `DD/MM/YYYY`; amounts in euros with `,` or `.` for
//! decimals (`1 250,50 €`); payment statuses by name (`paid`) or in French
//! (`payée`, `exonérée`…). Empty cells take the create's defaults (end and
//! dues from the type); a `paid` row without `amount_paid` received its dues
//! in full. Rows are written oldest period first, whatever the file's
//! order, through the create path (`memberships::create`: overlap refused,
//! renewals linked, the organisation's series refreshed, audited); its
//! refusals are the row's violations (an overlap on `start_date`).
//!
//! Interaction rows name their organisation like contact rows, and their
//! contacts by `contact_ids`, else `contact_emails` (each the one active
//! contact of the entity with that address). Cells: `kind` and `direction`
//! by name (`meeting`, `outbound`) or in French (`réunion`, `sortant`);
//! `occur_time` in RFC 3339 (as exported) or as a date and time in
//! Europe/Paris (`2025-03-14 10:30`, `14/03/2025 10:30`); `duration` as
//! `H:MM:SS`, `H:MM` or minutes. They are written through the create path
//! (`interactions::create`: references checked, audited), recorded by the
//! importer.
//!
//! Lookups are batched: the already loaded rows and the organisations rows
//! name in one statement per 5,000 rows, the membership types named by code
//! in one statement; duplicate hints in one statement per 500 rows
//! (`have_hints`); row reports written 1,000 at a time. A row gets the full per-row duplicate check (`find_duplicates`,
//! which reports the candidates) only when it has hints, or shares an
//! identifier or a postal code with a row written since its batch was
//! looked up, so that rows of one file are checked against each other
//! too. Writes stay per row: they are the create and update code paths,
//! with their audit events. Everything runs in one transaction (the job
//! is stored with its final state: `RUNNING` is never observed), and runs
//! of one import key are serialised by an advisory lock.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime, NaiveTime, Utc};
use diesel::{
    QueryableByName,
    sql_types::{Array, BigInt, Bool, Jsonb, Nullable, SmallInt, Text, Timestamptz, Uuid as SqlUuid},
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use serde::{Deserialize, Serialize};
use socle_api::{PageToken, Violations, page_size, parse_id};
use socle_db::{DbError, EntityScope};
use socle_errors::{Code, Error};
use socle_proto::socle::{
    crm::v1::{import_job_service_server::ImportJobService, *},
    r#type::v1::{ActorRef, Money, PostalAddress},
};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::{
    ancestry::{Ancestry, set_ancestors},
    common::{Audited, Caller, Count, Crm, TODAY_SQL, audit, etag, reply, rid, timestamp},
    contacts::{self, ContactInput},
    exports::{self, CONTACT_COLUMNS, Column, INTERACTION_COLUMNS, MEMBERSHIP_COLUMNS, ORGANIZATION_COLUMNS},
    interactions,
    membership_types::{self, TypeRow},
    memberships,
    organizations::{self, OrganizationInput, scope_ids},
    validate,
};

/// Largest chunk of one upload message.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;
/// Largest file.
pub const MAX_FILE_BYTES: usize = 50 * 1024 * 1024;
/// Most data rows in a file.
pub const MAX_ROWS: usize = 200_000;

/// Hashes and ids looked up per statement.
const LOOKUP_BATCH: usize = 5000;
/// Row reports written per statement.
const REPORT_BATCH: usize = 1000;
/// Rows whose duplicate hints are looked up in one statement.
const SCREEN_BATCH: usize = 500;

// ---------------------------------------------------------------------------
// Options and upload
// ---------------------------------------------------------------------------

/// What is imported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Organisations.
    Organizations,
    /// Contacts.
    Contacts,
    /// Memberships.
    Memberships,
    /// Interactions.
    Interactions,
}

/// The columns that name an organisation, in the order they are read.
const ORGANIZATION_REFS: &[&str] =
    &["organization_id", "organization_siret", "organization_siren", "organization_external_ref"];

impl Kind {
    fn record_kind(self) -> RecordKind {
        match self {
            Kind::Organizations => RecordKind::Organization,
            Kind::Contacts => RecordKind::Contact,
            Kind::Memberships => RecordKind::Membership,
            Kind::Interactions => RecordKind::Interaction,
        }
    }

    fn columns(self) -> &'static [Column] {
        match self {
            Kind::Organizations => ORGANIZATION_COLUMNS,
            Kind::Contacts => CONTACT_COLUMNS,
            Kind::Memberships => MEMBERSHIP_COLUMNS,
            Kind::Interactions => INTERACTION_COLUMNS,
        }
    }

    /// The columns a file must have: one of each group.
    fn required(self) -> &'static [&'static [&'static str]] {
        match self {
            Kind::Organizations => &[&["legal_name"]],
            Kind::Contacts => &[&["family_name"]],
            Kind::Memberships => &[ORGANIZATION_REFS, &["membership_type_code", "membership_type_id"], &["start_date"]],
            Kind::Interactions => &[&["kind"], &["subject"], &["occur_time"]],
        }
    }

    fn permission(self, action: &str) -> String {
        match self {
            Kind::Organizations => format!("crm.organizations.{action}"),
            Kind::Contacts => format!("crm.contacts.{action}"),
            Kind::Memberships => format!("crm.memberships.{action}"),
            Kind::Interactions => format!("crm.interactions.{action}"),
        }
    }
}

/// The option fields of an upload message (read from the first one).
#[derive(Debug, Clone, Default)]
pub struct RawOptions {
    entity_id: String,
    import_key: String,
    mode: i32,
    duplicate_policy: i32,
    dry_run: bool,
    encoding: i32,
    delimiter: String,
    columns: Vec<String>,
    filename: String,
}

/// A message of an import stream.
pub trait UploadMessage: Send + 'static {
    /// The option fields.
    fn options(&self) -> RawOptions;
    /// The bytes it carries.
    fn into_chunk(self) -> Vec<u8>;
}

/// `$policy`: the message's duplicate policy (kinds without one: 0).
macro_rules! upload_message {
    ($t:ty, $policy:expr) => {
        impl UploadMessage for $t {
            fn options(&self) -> RawOptions {
                let policy: fn(&$t) -> i32 = $policy;
                RawOptions {
                    entity_id: self.entity_id.clone(),
                    import_key: self.import_key.clone(),
                    mode: self.mode,
                    duplicate_policy: policy(self),
                    dry_run: self.dry_run,
                    encoding: self.encoding,
                    delimiter: self.delimiter.clone(),
                    columns: self.columns.clone(),
                    filename: self.filename.clone(),
                }
            }
            fn into_chunk(self) -> Vec<u8> {
                self.chunk
            }
        }
    };
}
upload_message!(ImportOrganizationsRequest, |m| m.duplicate_policy);
upload_message!(ImportContactsRequest, |m| m.duplicate_policy);
upload_message!(ImportMembershipsRequest, |_| 0);
upload_message!(ImportInteractionsRequest, |_| 0);

/// Validated options.
#[derive(Debug, Clone)]
struct Options {
    entity: Uuid,
    key: String,
    mode: ImportMode,
    policy: DuplicatePolicy,
    dry_run: bool,
    encoding: TextEncoding,
    /// `;`, `,`, a tab, or empty (detected).
    delimiter: String,
    columns: Vec<String>,
    filename: String,
}

fn options(caller: &Caller, raw: RawOptions) -> Result<Options, Error> {
    let mut v = Violations::new();
    let entity = caller.entity_or_acting("entity_id", &raw.entity_id).map_err(|e| crate::common::absorb(&mut v, e));
    let key = raw.import_key.trim().to_owned();
    v.check(!key.is_empty(), "import_key", "la clé d'import est obligatoire (par exemple un UUID par fichier source)");
    v.check(key.chars().count() <= 200, "import_key", "au plus 200 caractères");
    let mode = match ImportMode::try_from(raw.mode) {
        Ok(ImportMode::Unspecified) => ImportMode::AllOrNothing,
        Ok(mode) => mode,
        Err(_) => {
            v.add("mode", "mode d'import inconnu");
            ImportMode::AllOrNothing
        }
    };
    let policy = match DuplicatePolicy::try_from(raw.duplicate_policy) {
        Ok(DuplicatePolicy::Unspecified) => DuplicatePolicy::Reject,
        Ok(policy) => policy,
        Err(_) => {
            v.add("duplicate_policy", "politique de doublons inconnue");
            DuplicatePolicy::Reject
        }
    };
    let encoding = TextEncoding::try_from(raw.encoding).unwrap_or_else(|_| {
        v.add("encoding", "encodage inconnu");
        TextEncoding::Unspecified
    });
    let delimiter = match raw.delimiter.as_str() {
        "" => String::new(),
        ";" | "," | "\t" => raw.delimiter.clone(),
        "\\t" | "tab" => "\t".to_owned(),
        _ => {
            v.add("delimiter", "séparateur attendu : « ; », « , » ou une tabulation");
            String::new()
        }
    };
    v.check(raw.columns.len() <= 100, "columns", "au plus 100 colonnes");
    v.check(raw.filename.chars().count() <= 255, "filename", "au plus 255 caractères");
    v.into_result()?;
    let Ok(entity) = entity else { return Err(Error::internal("violations were reported")) };
    Ok(Options {
        entity,
        key,
        mode,
        policy,
        dry_run: raw.dry_run,
        encoding,
        delimiter,
        columns: raw.columns,
        filename: raw.filename.trim().to_owned(),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads an upload: the options of the first message, then every chunk.
async fn receive<M: UploadMessage>(
    caller: &Caller,
    mut stream: tonic::Streaming<M>,
) -> Result<(Options, Vec<u8>, String), Error> {
    let interrupted =
        |status: Status| Error::new(Code::InvalidArgument, format!("the upload was interrupted: {}", status.message()));
    let first = stream
        .message()
        .await
        .map_err(interrupted)?
        .ok_or_else(|| Error::invalid_argument("the upload is empty: its first message carries the options"))?;
    let options = options(caller, first.options())?;
    let mut bytes = Vec::new();
    let mut digest = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut add = |chunk: Vec<u8>| -> Result<(), Error> {
        if chunk.len() > MAX_MESSAGE_BYTES {
            return Err(Error::invalid_field("chunk", "au plus 1 Mio par message")
                .with_reason(socle_errors::reason::PAYLOAD_TOO_LARGE));
        }
        if bytes.len() + chunk.len() > MAX_FILE_BYTES {
            return Err(Error::invalid_argument("the file exceeds 50 MiB: split it")
                .with_reason(socle_errors::reason::PAYLOAD_TOO_LARGE));
        }
        digest.update(&chunk);
        bytes.extend_from_slice(&chunk);
        Ok(())
    };
    add(first.into_chunk())?;
    while let Some(message) = stream.message().await.map_err(interrupted)? {
        add(message.into_chunk())?;
    }
    Ok((options, bytes, hex(digest.finish().as_ref())))
}

// ---------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------

/// The text of a file in `encoding` (a UTF-8 byte order mark always wins).
fn decode(bytes: &[u8], encoding: TextEncoding) -> Result<String, String> {
    if let Some(rest) = bytes.strip_prefix(b"\xEF\xBB\xBF") {
        return std::str::from_utf8(rest).map(str::to_owned).map_err(|e| not_utf8(e.valid_up_to() + 3));
    }
    match encoding {
        TextEncoding::Windows1252 => Ok(encoding_rs::WINDOWS_1252.decode_without_bom_handling(bytes).0.into_owned()),
        TextEncoding::Iso88591 => Ok(bytes.iter().map(|b| char::from(*b)).collect()),
        _ => std::str::from_utf8(bytes).map(str::to_owned).map_err(|e| not_utf8(e.valid_up_to())),
    }
}

fn not_utf8(at: usize) -> String {
    format!(
        "le fichier n'est pas en UTF-8 (octet invalide à la position {at}) : précisez son encodage, par exemple \
         TEXT_ENCODING_WINDOWS_1252 pour un fichier enregistré par Excel sous Windows"
    )
}

/// The delimiter the header row holds most of, outside quotes (`;` first
/// on a tie, then tab, then `,`).
fn detect_delimiter(text: &str) -> u8 {
    let (mut semicolons, mut tabs, mut commas, mut quoted) = (0, 0, 0, false);
    for c in text.chars() {
        match c {
            '"' => quoted = !quoted,
            '\n' | '\r' if !quoted => break,
            ';' if !quoted => semicolons += 1,
            '\t' if !quoted => tabs += 1,
            ',' if !quoted => commas += 1,
            _ => {}
        }
    }
    if semicolons >= tabs && semicolons >= commas {
        b';'
    } else if tabs >= commas {
        b'\t'
    } else {
        b','
    }
}

/// One problem of a row, on a column (by name), before it is named as in
/// the file.
#[derive(Debug, Clone)]
struct Problem {
    column: &'static str,
    reason: String,
    description: String,
}

fn problem(column: &'static str, reason: &str, description: impl Into<String>) -> Problem {
    Problem { column, reason: reason.to_owned(), description: description.into() }
}

/// An organisation a row names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum OrgRef {
    Id(Uuid),
    Siret(String),
    /// Only when one active organisation of the entity has it.
    Siren(String),
    External(String),
}

impl OrgRef {
    fn column(&self) -> &'static str {
        match self {
            OrgRef::Id(_) => "organization_id",
            OrgRef::Siret(_) => "organization_siret",
            OrgRef::Siren(_) => "organization_siren",
            OrgRef::External(_) => "organization_external_ref",
        }
    }
}

/// The membership type a row names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum TypeRef {
    Id(Uuid),
    /// Upper-cased, as codes are stored.
    Code(String),
}

impl TypeRef {
    fn column(&self) -> &'static str {
        match self {
            TypeRef::Id(_) => "membership_type_id",
            TypeRef::Code(_) => "membership_type_code",
        }
    }
}

/// A membership row: the record as given (its organisation and type left
/// to resolve) and how it names them.
struct MembershipDraft {
    membership: Membership,
    organization: OrgRef,
    membership_type: TypeRef,
    /// `PAID` without an amount received: the dues were received.
    paid_in_full: bool,
}

/// The contacts an interaction row names: by `contact_ids`, else by
/// `contact_emails` (e-mail match keys).
#[derive(Debug, Clone, Default)]
enum ContactRefs {
    #[default]
    None,
    Ids(Vec<Uuid>),
    Emails(Vec<String>),
}

impl ContactRefs {
    fn column(&self) -> &'static str {
        match self {
            ContactRefs::Emails(_) => "contact_emails",
            _ => "contact_ids",
        }
    }

    fn len(&self) -> usize {
        match self {
            ContactRefs::None => 0,
            ContactRefs::Ids(ids) => ids.len(),
            ContactRefs::Emails(keys) => keys.len(),
        }
    }
}

/// An interaction row: the record as given (its organisation and contacts
/// left to resolve) and how it names them.
struct InteractionDraft {
    interaction: Interaction,
    organization: Option<OrgRef>,
    contacts: ContactRefs,
}

impl InteractionDraft {
    fn column(&self, path: &str) -> &'static str {
        let organization = self.organization.as_ref().map_or("organization_id", OrgRef::column);
        interaction_column(path, organization, self.contacts.column())
    }
}

/// The affiliation a contact row asks for.
#[derive(Debug, Clone)]
struct Link {
    organization: OrgRef,
    roles: Vec<i16>,
    job_title: String,
}

/// A row made into a record, validated.
enum Prepared {
    Invalid,
    Organization(Box<(Organization, OrganizationInput)>),
    Contact(Box<(Contact, ContactInput, Option<Link>)>),
    Membership(Box<MembershipDraft>),
    Interaction(Box<InteractionDraft>),
}

impl Prepared {
    /// The organisation the row names, if any.
    fn organization(&self) -> Option<&OrgRef> {
        match self {
            Prepared::Contact(c) => c.2.as_ref().map(|l| &l.organization),
            Prepared::Membership(m) => Some(&m.organization),
            Prepared::Interaction(i) => i.organization.as_ref(),
            _ => None,
        }
    }
}

/// A data row.
struct Row {
    number: i64,
    hash: String,
    /// Cells by catalogue column, trimmed ("" when absent).
    cells: Vec<String>,
    problems: Vec<Problem>,
    prepared: Prepared,
}

/// A parsed file.
struct Parsed {
    /// The name of each catalogue column as the file names it.
    headers: Vec<String>,
    rows: Vec<Row>,
}

/// The cells of a row, by column name.
struct Cells<'a> {
    catalogue: &'static [Column],
    cells: &'a [String],
}

impl Cells<'_> {
    fn get(&self, name: &str) -> &str {
        self.catalogue.iter().position(|c| c.name == name).map(|i| self.cells[i].as_str()).unwrap_or("")
    }

    fn has(&self, name: &str) -> bool {
        !self.get(name).is_empty()
    }
}

fn parse(kind: Kind, options: &Options, bytes: &[u8]) -> Result<Parsed, String> {
    let catalogue = kind.columns();
    let text = decode(bytes, options.encoding)?;
    let delimiter = match options.delimiter.as_str() {
        "" => detect_delimiter(&text),
        d => d.as_bytes()[0],
    };
    let mut reader =
        csv::ReaderBuilder::new().has_headers(false).flexible(true).delimiter(delimiter).from_reader(text.as_bytes());
    let mut records = reader.records();
    let unreadable = |e: csv::Error| {
        let line = e.position().map(|p| p.line()).unwrap_or(0);
        format!("ligne {line} illisible : {e}")
    };
    let Some(first) = records.next().transpose().map_err(unreadable)? else {
        return Err("le fichier est vide : une ligne d'en-tête au moins est attendue".to_owned());
    };
    let known = |name: &str| name.trim().is_empty() || exports::find_column(catalogue, name).is_some();
    let (names, header_consumed): (Vec<String>, bool) = if options.columns.is_empty() {
        (first.iter().map(str::to_owned).collect(), true)
    } else {
        let is_header = first.iter().any(|c| !c.trim().is_empty()) && first.iter().all(known);
        (options.columns.clone(), is_header)
    };

    // Column mapping: file position → catalogue column (None: skipped).
    let mut mapping: Vec<Option<usize>> = Vec::with_capacity(names.len());
    let mut headers: Vec<String> = catalogue.iter().map(|c| c.name.to_owned()).collect();
    let (mut unknown, mut repeated, mut seen) = (Vec::new(), Vec::new(), HashSet::new());
    for name in &names {
        let name = name.trim();
        if name.is_empty() {
            mapping.push(None);
            continue;
        }
        match exports::find_column(catalogue, name) {
            Some((i, _)) => {
                if !seen.insert(i) {
                    repeated.push(format!("« {name} »"));
                }
                headers[i] = name.to_owned();
                mapping.push(catalogue[i].input.then_some(i));
            }
            None => {
                unknown.push(format!("« {name} »"));
                mapping.push(None);
            }
        }
    }
    if !unknown.is_empty() {
        return Err(format!(
            "colonne(s) inconnue(s) : {} ; colonnes reconnues : {} (ou leurs libellés en français)",
            unknown.join(", "),
            catalogue.iter().filter(|c| c.input).map(|c| c.name).collect::<Vec<_>>().join(", ")
        ));
    }
    if !repeated.is_empty() {
        return Err(format!("colonne(s) en double : {}", repeated.join(", ")));
    }
    for group in kind.required() {
        let present =
            |name: &&str| catalogue.iter().position(|c| c.name == *name).is_some_and(|i| mapping.contains(&Some(i)));
        if !group.iter().any(present) {
            let named: Vec<String> = group
                .iter()
                .filter_map(|name| catalogue.iter().find(|c| c.name == *name))
                .map(|c| format!("{} ({})", c.name, c.label))
                .collect();
            return Err(match named.as_slice() {
                [one] => format!("colonne obligatoire absente : {one}"),
                _ => format!("colonne obligatoire absente, l'une de : {}", named.join(", ")),
            });
        }
    }

    let mut rows = Vec::new();
    let bytes_of_text = text.as_bytes();
    let (mut counted, mut newlines) = (0usize, 0i64);
    let data = (!header_consumed).then_some(Ok(first)).into_iter().chain(records);
    for record in data {
        let record = record.map_err(unreadable)?;
        if record.iter().all(|c| c.trim().is_empty()) {
            continue;
        }
        if rows.len() == MAX_ROWS {
            return Err(format!("le fichier compte plus de {MAX_ROWS} lignes de données : découpez-le"));
        }
        // The line where the record starts (`Position::line` miscounts
        // CRLF line ends and blank lines): the newlines before its first byte.
        // Line ends before the record (the end of the previous one, blank
        // lines) are not part of it.
        let mut start = record.position().map_or(0, |p| p.byte() as usize);
        while matches!(bytes_of_text.get(start), Some(b'\r' | b'\n')) {
            start += 1;
        }
        if start > counted {
            newlines += bytes_of_text[counted..start].iter().filter(|b| **b == b'\n').count() as i64;
            counted = start;
        }
        let number = newlines + 1;
        let mut cells = vec![String::new(); catalogue.len()];
        let mut extra = false;
        for (j, cell) in record.iter().enumerate() {
            match mapping.get(j) {
                Some(Some(i)) => cells[*i] = cell.trim().to_owned(),
                Some(None) => {}
                None => extra |= !cell.trim().is_empty(),
            }
        }
        let mut problems = Vec::new();
        if extra {
            problems.push(problem(
                "",
                "extra_cells",
                format!("la ligne compte {} cellules, l'en-tête {}", record.len(), mapping.len()),
            ));
        }
        let hash = row_hash(catalogue, &cells);
        let view = Cells { catalogue, cells: &cells };
        let prepared = match kind {
            Kind::Organizations => prepare_organization(&view, options.entity, &mut problems),
            Kind::Contacts => prepare_contact(&view, options.entity, &mut problems),
            Kind::Memberships => prepare_membership(&view, options.entity, &mut problems),
            Kind::Interactions => prepare_interaction(&view, options.entity, &mut problems),
        };
        let prepared = if problems.is_empty() { prepared } else { Prepared::Invalid };
        rows.push(Row { number, hash, cells, problems, prepared });
    }
    Ok(Parsed { headers, rows })
}

/// SHA-256 of a row's non-empty mapped cells with their column names.
fn row_hash(catalogue: &[Column], cells: &[String]) -> String {
    let mut digest = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for (column, cell) in catalogue.iter().zip(cells) {
        if column.input && !cell.is_empty() {
            digest.update(column.name.as_bytes());
            digest.update(b"\x1f");
            digest.update(cell.as_bytes());
            digest.update(b"\x1e");
        }
    }
    hex(digest.finish().as_ref())
}

/// Items of a list cell.
fn list(cell: &str) -> Vec<String> {
    cell.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect()
}

/// The value of an enum named by `text`: its full or short name, or an
/// alias, compared without case, accents or punctuation.
fn enum_value(
    text: &str,
    prefix: &str,
    name_of: impl Fn(i32) -> Option<&'static str>,
    aliases: &[(&str, i32)],
) -> Option<i32> {
    let k = exports::key(text);
    for value in 1..64 {
        let Some(full) = name_of(value) else { continue };
        if exports::key(full) == k || exports::key(full.strip_prefix(prefix).unwrap_or(full)) == k {
            return Some(value);
        }
    }
    aliases.iter().find(|(alias, _)| exports::key(alias) == k).map(|(_, v)| *v)
}

fn headcount(text: &str) -> Option<i32> {
    let code =
        if text.len() == 1 && text.chars().all(|c| c.is_ascii_digit()) { format!("0{text}") } else { text.to_owned() };
    if let Some((band, _)) = exports::HEADCOUNT_CODES.iter().find(|(_, c)| *c == code) {
        return Some(*band as i32);
    }
    enum_value(text, "HEADCOUNT_BAND_", |v| HeadcountBand::try_from(v).ok().map(|e| e.as_str_name()), &[])
}

fn address_kind(text: &str) -> Option<i32> {
    enum_value(
        text,
        "ADDRESS_KIND_",
        |v| AddressKind::try_from(v).ok().map(|e| e.as_str_name()),
        &[
            ("siège", 1),
            ("siège social", 1),
            ("établissement", 2),
            ("correspondance", 3),
            ("courrier", 3),
            ("facturation", 4),
        ],
    )
}

fn civility(text: &str) -> Option<i32> {
    enum_value(
        text,
        "CIVILITY_",
        |v| Civility::try_from(v).ok().map(|e| e.as_str_name()),
        &[("Mme", 1), ("Mlle", 1), ("M.", 2), ("Mr", 2)],
    )
}

fn role(text: &str) -> Option<i32> {
    enum_value(
        text,
        "AFFILIATION_ROLE_",
        |v| AffiliationRole::try_from(v).ok().map(|e| e.as_str_name()),
        &[
            ("dirigeant", 1),
            ("représentant légal", 1),
            ("mandataire social", 1),
            ("contact principal", 2),
            ("facturation", 3),
            ("contact facturation", 3),
            ("rh", 4),
            ("ressources humaines", 4),
            ("salarié", 5),
            ("employé", 5),
        ],
    )
}

fn consent(token: &str) -> Option<CommunicationConsent> {
    let parts: Vec<&str> = token.split(':').map(str::trim).collect();
    if !(2..=3).contains(&parts.len()) {
        return None;
    }
    let topic = enum_value(
        parts[0],
        "CONSENT_TOPIC_",
        |v| ConsentTopic::try_from(v).ok().map(|e| e.as_str_name()),
        &[("lettre d'information", 1), ("événements", 2), ("enquêtes", 3), ("offres partenaires", 4)],
    )?;
    let channel = enum_value(
        parts[1],
        "CONSENT_CHANNEL_",
        |v| ConsentChannel::try_from(v).ok().map(|e| e.as_str_name()),
        &[("courriel", 1), ("mail", 1), ("téléphone", 3), ("courrier", 4)],
    )?;
    let granted = match parts.get(2).map(|g| exports::key(g)) {
        None => true,
        Some(g) => match g.as_str() {
            "oui" | "o" | "true" | "1" | "yes" | "y" | "granted" => true,
            "non" | "n" | "false" | "0" | "no" | "withdrawn" | "retire" => false,
            _ => return None,
        },
    };
    Some(CommunicationConsent { topic, channel, granted, source: "import".to_owned(), record_time: None })
}

/// `system=value` pairs, `,` separated, `\` escaping.
fn refs(cell: &str) -> Option<HashMap<String, String>> {
    let mut pairs = Vec::new();
    let (mut current, mut escaped) = (String::new(), false);
    for c in cell.chars() {
        match c {
            _ if escaped => {
                current.push(c);
                escaped = false;
            }
            '\\' => escaped = true,
            ',' => pairs.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    pairs.push(current);
    let mut map = HashMap::new();
    for pair in pairs.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
        let (system, value) = pair.split_once('=')?;
        map.insert(system.trim().to_owned(), value.trim().to_owned());
    }
    Some(map)
}

const REFS_FORMAT: &str = "références externes attendues sous la forme systeme=valeur, séparées par des virgules";

/// The organisation a row names by `organization_id`, else
/// `organization_siret`, else `organization_siren`, else
/// `organization_external_ref` (`system=value`); `None` when none is given
/// or the one given is malformed (a problem then).
fn org_ref(c: &Cells, problems: &mut Vec<Problem>) -> Option<OrgRef> {
    let column = *ORGANIZATION_REFS.iter().find(|n| c.has(n))?;
    let cell = c.get(column);
    let invalid = |reason: &'static str, description: &str| (reason, description.to_owned());
    let parsed = match column {
        "organization_id" => Uuid::parse_str(cell)
            .map(OrgRef::Id)
            .map_err(|_| invalid("invalid_id", "identifiant (UUID) d'organisation attendu")),
        "organization_siret" => validate::normalize_siret(cell)
            .map(OrgRef::Siret)
            .map_err(|r| invalid("invalid_siret", validate::describe(r))),
        "organization_siren" => validate::normalize_siren(cell)
            .map(OrgRef::Siren)
            .map_err(|r| invalid("invalid_siren", validate::describe(r))),
        _ => refs(cell)
            .filter(|m| m.len() == 1)
            .and_then(|m| m.into_iter().next())
            .map(|(k, v)| OrgRef::External(format!("{k}={v}")))
            .ok_or_else(|| {
                invalid("invalid_external_ref", "une référence externe attendue sous la forme systeme=valeur")
            }),
    };
    parsed.map_err(|(reason, description)| problems.push(problem(column, reason, description))).ok()
}

/// A date cell: `YYYY-MM-DD` as is, `DD/MM/YYYY` (French spreadsheets)
/// rewritten; anything else is left for validation to refuse.
fn date_cell(text: &str) -> String {
    let parts: Vec<&str> = text.split('/').collect();
    match parts.as_slice() {
        [d, m, y] if d.len() <= 2 && m.len() <= 2 && y.len() == 4 => {
            match (d.parse::<u32>(), m.parse::<u32>(), y.parse::<i32>()) {
                (Ok(d), Ok(m), Ok(y)) => format!("{y:04}-{m:02}-{d:02}"),
                _ => text.to_owned(),
            }
        }
        _ => text.to_owned(),
    }
}

/// Cents from an amount in euros as spreadsheets write it: `150`, `150,5`,
/// `1 250,50 €`, `1250.50`, `EUR 30` (a negative amount is returned for
/// validation to refuse); `None` when unreadable.
fn amount_cents(text: &str) -> Option<i64> {
    let compact: String = text.chars().filter(|c| !c.is_whitespace() && *c != '€').collect();
    let upper = compact.to_ascii_uppercase();
    let bare = upper.strip_suffix("EUR").or_else(|| upper.strip_prefix("EUR")).unwrap_or(&upper);
    let (negative, bare) = match bare.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, bare),
    };
    let (units, decimals) = match bare.rsplit_once([',', '.']) {
        Some((units, decimals)) if decimals.len() <= 2 => (units, decimals),
        Some(_) => return None,
        None => (bare, ""),
    };
    let digits = |s: &str| s.chars().all(|c| c.is_ascii_digit());
    if units.is_empty() && decimals.is_empty() || !digits(units) || !digits(decimals) || units.len() > 12 {
        return None;
    }
    let units: i64 = if units.is_empty() { 0 } else { units.parse().ok()? };
    let cents: i64 = format!("{decimals:0<2}").parse().ok()?;
    let total = units * 100 + cents;
    Some(if negative { -total } else { total })
}

fn payment_status(text: &str) -> Option<i32> {
    enum_value(
        text,
        "PAYMENT_STATUS_",
        |v| PaymentStatus::try_from(v).ok().map(|e| e.as_str_name()),
        &[
            ("impayée", 1),
            ("impayé", 1),
            ("non payée", 1),
            ("partiellement payée", 2),
            ("partiel", 2),
            ("payée", 3),
            ("payé", 3),
            ("réglée", 3),
            ("réglé", 3),
            ("exonérée", 4),
            ("exonéré", 4),
            ("remboursée", 5),
            ("remboursé", 5),
        ],
    )
}

/// The column of a membership's field path; its organisation and type
/// are on the columns that named them.
fn membership_column(path: &str, organization: &'static str, membership_type: &'static str) -> &'static str {
    match path.split(['[', '.']).next().unwrap_or("") {
        "organization_id" => organization,
        "membership_type_id" => membership_type,
        other => MEMBERSHIP_COLUMNS.iter().find(|c| c.name == other).map_or("", |c| c.name),
    }
}

fn prepare_membership(c: &Cells, entity: Uuid, problems: &mut Vec<Problem>) -> Prepared {
    let organization = org_ref(c, problems);
    if !ORGANIZATION_REFS.iter().any(|n| c.has(n)) {
        problems.push(problem(
            "organization_id",
            "required",
            "organisation obligatoire : renseignez organization_id, organization_siret, organization_siren ou \
             organization_external_ref",
        ));
    }
    let membership_type = if c.has("membership_type_id") {
        match Uuid::parse_str(c.get("membership_type_id")) {
            Ok(id) => Some(TypeRef::Id(id)),
            Err(_) => {
                problems.push(problem(
                    "membership_type_id",
                    "invalid_id",
                    "identifiant (UUID) de type d'adhésion attendu",
                ));
                None
            }
        }
    } else if c.has("membership_type_code") {
        Some(TypeRef::Code(c.get("membership_type_code").to_ascii_uppercase()))
    } else {
        problems.push(problem(
            "membership_type_code",
            "required",
            "type d'adhésion obligatoire : renseignez membership_type_code ou membership_type_id",
        ));
        None
    };
    // The references are resolved when the row is written: placeholders
    // meanwhile, so that validation reports the other fields.
    let mut m = Membership {
        entity_id: entity.to_string(),
        organization_id: Uuid::nil().to_string(),
        membership_type_id: Uuid::nil().to_string(),
        start_date: date_cell(c.get("start_date")),
        end_date: date_cell(c.get("end_date")),
        payment_date: date_cell(c.get("payment_date")),
        payment_reference: c.get("payment_reference").to_owned(),
        notes: c.get("notes").to_owned(),
        ..Membership::default()
    };
    for (name, into) in [("dues_amount", &mut m.dues_amount), ("amount_paid", &mut m.amount_paid)] {
        if c.has(name) {
            match amount_cents(c.get(name)) {
                Some(cents) => *into = Some(Money { amount_cents: cents, currency_code: String::new() }),
                None => problems.push(problem(
                    name,
                    "invalid_amount",
                    "montant en euros attendu, par exemple 150, 150,50 ou 1 250,00 €",
                )),
            }
        }
    }
    if c.has("payment_status") {
        match payment_status(c.get("payment_status")) {
            Some(status) => m.payment_status = status,
            None => problems.push(problem(
                "payment_status",
                "invalid_payment_status",
                "statut de paiement inconnu : unpaid, partially_paid, paid, waived ou refunded",
            )),
        }
    }
    let paid_in_full = m.payment_status == PaymentStatus::Paid as i32 && !c.has("amount_paid");
    match (memberships::validate_new(&m), organization, membership_type) {
        (Ok(_), Some(organization), Some(membership_type)) => Prepared::Membership(Box::new(MembershipDraft {
            membership: m,
            organization,
            membership_type,
            paid_in_full,
        })),
        (Ok(_), _, _) => Prepared::Invalid,
        (Err(error), _, _) => {
            absorb_violations(problems, &error, "membership.", |path| {
                membership_column(path, "organization_id", "membership_type_code")
            });
            Prepared::Invalid
        }
    }
}

/// The UTC instant of a wall-clock time in Europe/Paris: UTC+1, UTC+2 in
/// summer time (from 01:00 UTC on the last Sunday of March to 01:00 UTC on
/// the last Sunday of October, the EU rule).
fn paris(local: NaiveDateTime) -> DateTime<Utc> {
    let last_sunday = |month: u32| {
        let last = NaiveDate::from_ymd_opt(local.year(), month, 31).unwrap_or_default();
        last - chrono::Days::new(u64::from(last.weekday().num_days_from_sunday()))
    };
    let one_am = NaiveTime::from_hms_opt(1, 0, 0).unwrap_or_default();
    let (start, end) = (last_sunday(3).and_time(one_am).and_utc(), last_sunday(10).and_time(one_am).and_utc());
    let summer = (local - chrono::Duration::hours(2)).and_utc();
    if (start..end).contains(&summer) { summer } else { (local - chrono::Duration::hours(1)).and_utc() }
}

/// A time cell: RFC 3339 (as exported), or a date and a time in
/// Europe/Paris (`YYYY-MM-DD HH:MM[:SS]`, `DD/MM/YYYY HH:MM`, a date alone
/// at midnight).
fn time_cell(text: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some(t.with_timezone(&Utc));
    }
    let (date, time) = text.split_once([' ', 'T']).map_or((text, ""), |(d, t)| (d, t.trim()));
    let date = NaiveDate::parse_from_str(&date_cell(date), "%Y-%m-%d").ok()?;
    let time = match time {
        "" => NaiveTime::MIN,
        t => NaiveTime::parse_from_str(t, "%H:%M:%S").or_else(|_| NaiveTime::parse_from_str(t, "%H:%M")).ok()?,
    };
    Some(paris(date.and_time(time)))
}

/// A duration cell: `H:MM:SS` (as exported), `H:MM`, or minutes.
fn duration_cell(text: &str) -> Option<prost_types::Duration> {
    let number = |s: &str| s.trim().parse::<i64>().ok().filter(|n| (0..=10_000_000).contains(n));
    let sixty = |s: &str| number(s).filter(|n| *n < 60);
    let seconds = match text.split(':').collect::<Vec<_>>().as_slice() {
        [minutes] => number(minutes.trim_end_matches("min"))? * 60,
        [h, m] => number(h)? * 3600 + sixty(m)? * 60,
        [h, m, s] => number(h)? * 3600 + sixty(m)? * 60 + sixty(s)?,
        _ => return None,
    };
    Some(prost_types::Duration { seconds, nanos: 0 })
}

fn interaction_kind(text: &str) -> Option<i32> {
    enum_value(
        text,
        "INTERACTION_KIND_",
        |v| InteractionKind::try_from(v).ok().map(|e| e.as_str_name()),
        &[
            ("appel", 1),
            ("appel téléphonique", 1),
            ("téléphone", 1),
            ("réunion", 2),
            ("rendez-vous", 2),
            ("rdv", 2),
            ("visite", 2),
            ("courriel", 3),
            ("mail", 3),
            ("événement", 4),
            ("participation", 4),
            ("participation à un événement", 4),
        ],
    )
}

fn direction(text: &str) -> Option<i32> {
    enum_value(
        text,
        "INTERACTION_DIRECTION_",
        |v| InteractionDirection::try_from(v).ok().map(|e| e.as_str_name()),
        &[("entrant", 1), ("reçu", 1), ("sortant", 2), ("émis", 2)],
    )
}

/// The column of an interaction's field path; its organisation and
/// contacts are on the columns that named them.
fn interaction_column(path: &str, organization: &'static str, contacts: &'static str) -> &'static str {
    match path.split(['[', '.']).next().unwrap_or("") {
        "organization_id" => organization,
        "contact_ids" => contacts,
        other => INTERACTION_COLUMNS.iter().find(|c| c.name == other).map_or("", |c| c.name),
    }
}

/// The contacts a row names by `contact_ids`, else `contact_emails`.
fn contact_refs(c: &Cells, problems: &mut Vec<Problem>) -> ContactRefs {
    if c.has("contact_ids") {
        let mut ids = Vec::new();
        for item in list(c.get("contact_ids")) {
            match Uuid::parse_str(&item) {
                Ok(id) => ids.push(id),
                Err(_) => problems.push(problem(
                    "contact_ids",
                    "invalid_id",
                    format!("« {item} » n'est pas un identifiant (UUID) de contact"),
                )),
            }
        }
        ContactRefs::Ids(ids)
    } else if c.has("contact_emails") {
        let mut keys = Vec::new();
        for item in list(c.get("contact_emails")) {
            match validate::normalize_email(&item) {
                Ok(email) => keys.push(validate::email_match_key(&email)),
                Err(r) => problems.push(problem(
                    "contact_emails",
                    "invalid_email",
                    format!("« {item} » : {}", validate::describe(r)),
                )),
            }
        }
        ContactRefs::Emails(keys)
    } else {
        ContactRefs::None
    }
}

fn prepare_interaction(c: &Cells, entity: Uuid, problems: &mut Vec<Problem>) -> Prepared {
    let organization = org_ref(c, problems);
    let contacts = contact_refs(c, problems);
    // The references are resolved when the row is written: placeholders
    // meanwhile, so that validation reports the other fields.
    let mut i = Interaction {
        entity_id: entity.to_string(),
        subject: c.get("subject").to_owned(),
        body: c.get("body").to_owned(),
        organization_id: if organization.is_some() { Uuid::nil().to_string() } else { String::new() },
        contact_ids: (0..contacts.len()).map(|n| Uuid::from_u128(n as u128 + 1).to_string()).collect(),
        event_name: c.get("event_name").to_owned(),
        location: c.get("location").to_owned(),
        participant_user_ids: list(c.get("participant_user_ids")),
        tags: list(c.get("tags")),
        ..Interaction::default()
    };
    if c.has("kind") {
        match interaction_kind(c.get("kind")) {
            Some(kind) => i.kind = kind,
            None => problems.push(problem(
                "kind",
                "invalid_kind",
                "type inconnu : call, meeting, email, event_attendance ou note (appel, réunion, courriel, \
                 événement, note)",
            )),
        }
    }
    if c.has("occur_time") {
        match time_cell(c.get("occur_time")) {
            Some(t) => i.occur_time = Some(timestamp(t)),
            None => problems.push(problem(
                "occur_time",
                "invalid_occur_time",
                "date et heure attendues : 2025-03-14T09:30:00Z, ou 2025-03-14 10:30 ou 14/03/2025 10:30 (heure de \
                 Paris)",
            )),
        }
    }
    if c.has("duration") {
        match duration_cell(c.get("duration")) {
            Some(d) => i.duration = Some(d),
            None => problems.push(problem("duration", "invalid_duration", "durée attendue : 1:30:00, 1:30 ou 90")),
        }
    }
    if c.has("direction") {
        match direction(c.get("direction")) {
            Some(d) => i.direction = d,
            None => problems.push(problem("direction", "invalid_direction", "sens attendu : inbound ou outbound")),
        }
    }
    let draft = InteractionDraft { interaction: i, organization, contacts };
    match interactions::validate(&draft.interaction, "interaction") {
        Ok(_) => Prepared::Interaction(Box::new(draft)),
        Err(error) => {
            absorb_violations(problems, &error, "interaction.", |path| draft.column(path));
            Prepared::Invalid
        }
    }
}

fn prepare_organization(c: &Cells, entity: Uuid, problems: &mut Vec<Problem>) -> Prepared {
    let mut org = Organization {
        entity_id: entity.to_string(),
        legal_name: c.get("legal_name").to_owned(),
        trade_name: c.get("trade_name").to_owned(),
        siren: c.get("siren").to_owned(),
        siret: c.get("siret").to_owned(),
        naf_code: c.get("naf_code").to_owned(),
        legal_form_code: c.get("legal_form_code").to_owned(),
        website: c.get("website").to_owned(),
        email: c.get("email").to_owned(),
        phone: c.get("phone").to_owned(),
        tags: list(c.get("tags")),
        description: c.get("description").to_owned(),
        ..Organization::default()
    };
    if c.has("headcount_band") {
        match headcount(c.get("headcount_band")) {
            Some(band) => org.headcount_band = band,
            None => problems.push(problem(
                "headcount_band",
                "invalid_headcount_band",
                "tranche d'effectif inconnue : code INSEE attendu (00, 01, 02, 03, 11, 12, 21, 22, 31, 32, 41, 42, 51, 52, 53)",
            )),
        }
    }
    let address_columns =
        ["address_street_line", "address_complement", "address_postal_code", "address_city", "address_country_code"];
    if address_columns.iter().any(|n| c.has(n)) {
        let kind = if c.has("address_kind") {
            address_kind(c.get("address_kind")).unwrap_or_else(|| {
                problems.push(problem(
                    "address_kind",
                    "invalid_address_kind",
                    "type d'adresse inconnu : head_office, establishment, mailing ou billing",
                ));
                0
            })
        } else {
            AddressKind::HeadOffice as i32
        };
        org.addresses.push(OrganizationAddress {
            kind,
            primary: true,
            address: Some(PostalAddress {
                street_line: c.get("address_street_line").to_owned(),
                complement: c.get("address_complement").to_owned(),
                postal_code: c.get("address_postal_code").to_owned(),
                city: c.get("address_city").to_owned(),
                country_code: c.get("address_country_code").to_owned(),
                ..PostalAddress::default()
            }),
        });
    }
    match refs(c.get("external_refs")) {
        Some(map) => org.external_refs = map,
        None => problems.push(problem("external_refs", "invalid_external_refs", REFS_FORMAT)),
    }
    match organizations::validate(&org, "organization", true) {
        Ok(input) => Prepared::Organization(Box::new((org, input))),
        Err(error) => {
            absorb_violations(problems, &error, "organization.", organization_column);
            Prepared::Invalid
        }
    }
}

fn prepare_contact(c: &Cells, entity: Uuid, problems: &mut Vec<Problem>) -> Prepared {
    let mut contact = Contact {
        entity_id: entity.to_string(),
        given_name: c.get("given_name").to_owned(),
        family_name: c.get("family_name").to_owned(),
        job_title: c.get("job_title").to_owned(),
        tags: list(c.get("tags")),
        ..Contact::default()
    };
    if c.has("civility") {
        match civility(c.get("civility")) {
            Some(v) => contact.civility = v,
            None => problems.push(problem("civility", "invalid_civility", "civilité attendue : Madame ou Monsieur")),
        }
    }
    let email = c.get("email");
    contact.emails = std::iter::once(email.to_owned())
        .filter(|e| !e.is_empty())
        .chain(list(c.get("other_emails")))
        .enumerate()
        .map(|(i, address)| ContactEmail { address, kind: 0, primary: i == 0 })
        .collect();
    contact.phones = std::iter::once(c.get("phone").to_owned())
        .filter(|p| !p.is_empty())
        .chain(list(c.get("other_phones")))
        .enumerate()
        .map(|(i, number)| ContactPhone { number, kind: 0, primary: i == 0 })
        .collect();
    let address_columns =
        ["address_street_line", "address_complement", "address_postal_code", "address_city", "address_country_code"];
    if address_columns.iter().any(|n| c.has(n)) {
        contact.address = Some(PostalAddress {
            street_line: c.get("address_street_line").to_owned(),
            complement: c.get("address_complement").to_owned(),
            postal_code: c.get("address_postal_code").to_owned(),
            city: c.get("address_city").to_owned(),
            country_code: c.get("address_country_code").to_owned(),
            ..PostalAddress::default()
        });
    }
    for token in list(c.get("consents")) {
        match consent(&token) {
            Some(consent) => contact.consents.push(consent),
            None => problems.push(problem(
                "consents",
                "invalid_consent",
                format!(
                    "consentement « {token} » illisible : sujet:canal, suivi de :non s'il est retiré \
                     (ex. newsletter:email, events:sms:non)"
                ),
            )),
        }
    }
    match refs(c.get("external_refs")) {
        Some(map) => contact.external_refs = map,
        None => problems.push(problem("external_refs", "invalid_external_refs", REFS_FORMAT)),
    }

    // The organisation, roles and job title of the affiliation.
    let organization = org_ref(c, problems);
    let mut roles = Vec::new();
    for name in list(c.get("affiliation_roles")) {
        match role(&name) {
            Some(r) => roles.push(r),
            None => problems.push(problem(
                "affiliation_roles",
                "invalid_role",
                format!(
                    "rôle « {name} » inconnu : legal_representative, primary_contact, billing_contact, hr_contact \
                     ou employee"
                ),
            )),
        }
    }
    let job_title = c.get("affiliation_job_title").to_owned();
    let affiliation = Affiliation { roles: roles.clone(), job_title: job_title.clone(), ..Affiliation::default() };
    if let Err(error) = crate::affiliations::validate(&affiliation, "affiliation") {
        absorb_violations(problems, &error, "affiliation.", |path| {
            if path.starts_with("roles") { "affiliation_roles" } else { "affiliation_job_title" }
        });
    }
    let ask = !roles.is_empty() || !job_title.is_empty();
    if ask && organization.is_none() && !ORGANIZATION_REFS.iter().any(|n| c.has(n)) {
        problems.push(problem(
            if roles.is_empty() { "affiliation_job_title" } else { "affiliation_roles" },
            "organization_required",
            "rôle ou fonction sans organisation : renseignez organization_id, organization_siret ou \
             organization_external_ref",
        ));
    }
    let link = organization.map(|organization| {
        let mut unique: Vec<i16> = Vec::new();
        for r in &roles {
            if !unique.contains(&(*r as i16)) {
                unique.push(*r as i16);
            }
        }
        Link { organization, roles: unique, job_title: job_title.split_whitespace().collect::<Vec<_>>().join(" ") }
    });
    match contacts::validate(&contact, "contact", true) {
        Ok(input) => Prepared::Contact(Box::new((contact, input, link))),
        Err(error) => {
            let email_given = !email.is_empty();
            let phone_given = c.has("phone");
            absorb_violations(problems, &error, "contact.", |path| contact_column(path, email_given, phone_given));
            Prepared::Invalid
        }
    }
}

/// Adds the violations of a validation error, their field paths (under
/// `prefix`) mapped to columns by `column`.
fn absorb_violations(problems: &mut Vec<Problem>, error: &Error, prefix: &str, column: impl Fn(&str) -> &'static str) {
    if error.violations().is_empty() {
        problems.push(problem("", "invalid", error.message().to_owned()));
    }
    for v in error.violations() {
        let path = v.field.strip_prefix(prefix).unwrap_or(&v.field);
        let name = column(path);
        let reason = if v.description.contains("obligatoire") {
            "required".to_owned()
        } else if name.is_empty() {
            "invalid".to_owned()
        } else {
            format!("invalid_{name}")
        };
        problems.push(Problem { column: name, reason, description: v.description.clone() });
    }
}

/// The column of an organisation's field path.
fn organization_column(path: &str) -> &'static str {
    let base = path.split(['[', '.']).next().unwrap_or("");
    if base == "addresses" {
        if path.ends_with(".kind") {
            return "address_kind";
        }
        return match path.rsplit_once("address.").map(|(_, sub)| sub) {
            Some("postal_code") => "address_postal_code",
            Some("city") => "address_city",
            Some("country_code") => "address_country_code",
            Some("complement") => "address_complement",
            _ => "address_street_line",
        };
    }
    ORGANIZATION_COLUMNS.iter().find(|c| c.name == base).map_or("", |c| c.name)
}

/// The column of a contact's field path.
fn contact_column(path: &str, email_given: bool, phone_given: bool) -> &'static str {
    let base = path.split(['[', '.']).next().unwrap_or("");
    let index = path.split_once('[').and_then(|(_, rest)| rest.split(']').next()).and_then(|i| i.parse::<usize>().ok());
    match base {
        "emails" => match index {
            Some(0) | None if email_given => "email",
            _ => "other_emails",
        },
        "phones" => match index {
            Some(0) | None if phone_given => "phone",
            _ => "other_phones",
        },
        "address" => match path.strip_prefix("address.") {
            Some("postal_code") => "address_postal_code",
            Some("city") => "address_city",
            Some("country_code") => "address_country_code",
            Some("complement") => "address_complement",
            _ => "address_street_line",
        },
        other => CONTACT_COLUMNS.iter().find(|c| c.name == other).map_or("", |c| c.name),
    }
}

// ---------------------------------------------------------------------------
// Storage
// ---------------------------------------------------------------------------

/// A violation as stored in `import_rows.violations`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredViolation {
    field: String,
    reason: String,
    description: String,
}

/// A candidate as stored in `import_rows.duplicates`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct StoredCandidate {
    record_kind: i32,
    record_id: String,
    score: f64,
    reasons: Vec<i32>,
    in_other_entity: bool,
    entity_id: String,
    display_name: String,
    summary: String,
}

impl StoredCandidate {
    fn of(c: &DuplicateCandidate) -> Self {
        StoredCandidate {
            record_kind: c.record_kind,
            record_id: c.record_id.clone(),
            score: c.score,
            reasons: c.reasons.clone(),
            in_other_entity: c.in_other_entity,
            entity_id: c.entity_id.clone(),
            display_name: c.display_name.clone(),
            summary: c.summary.clone(),
        }
    }

    fn to_proto(&self) -> DuplicateCandidate {
        DuplicateCandidate {
            record_kind: self.record_kind,
            record_id: self.record_id.clone(),
            score: self.score,
            reasons: self.reasons.clone(),
            in_other_entity: self.in_other_entity,
            entity_id: self.entity_id.clone(),
            display_name: self.display_name.clone(),
            summary: self.summary.clone(),
        }
    }
}

/// The report of one row.
#[derive(Debug, Clone)]
struct Report {
    number: i64,
    hash: String,
    outcome: ImportRowOutcome,
    record: Option<Uuid>,
    violations: Vec<StoredViolation>,
    duplicates: Vec<DuplicateCandidate>,
}

#[derive(QueryableByName)]
struct JobRow {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    entity_id: Uuid,
    #[diesel(sql_type = SmallInt)]
    record_kind: i16,
    #[diesel(sql_type = Text)]
    import_key: String,
    #[diesel(sql_type = SmallInt)]
    mode: i16,
    #[diesel(sql_type = SmallInt)]
    duplicate_policy: i16,
    #[diesel(sql_type = Bool)]
    dry_run: bool,
    #[diesel(sql_type = SmallInt)]
    state: i16,
    #[diesel(sql_type = BigInt)]
    total_count: i64,
    #[diesel(sql_type = BigInt)]
    created_count: i64,
    #[diesel(sql_type = BigInt)]
    updated_count: i64,
    #[diesel(sql_type = BigInt)]
    unchanged_count: i64,
    #[diesel(sql_type = BigInt)]
    rejected_count: i64,
    #[diesel(sql_type = BigInt)]
    valid_count: i64,
    #[diesel(sql_type = Text)]
    filename: String,
    #[diesel(sql_type = BigInt)]
    size_bytes: i64,
    #[diesel(sql_type = Text)]
    file_sha256: String,
    #[diesel(sql_type = Text)]
    error: String,
    #[diesel(sql_type = SmallInt)]
    creator_kind: i16,
    #[diesel(sql_type = Text)]
    creator_id: String,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    complete_time: Option<DateTime<Utc>>,
    #[diesel(sql_type = BigInt)]
    version: i64,
    #[diesel(sql_type = Timestamptz)]
    create_time: DateTime<Utc>,
    #[diesel(sql_type = Timestamptz)]
    update_time: DateTime<Utc>,
}

const JOB_COLUMNS: &str = "j.id, j.entity_id, j.record_kind, j.import_key, j.mode, j.duplicate_policy, j.dry_run,
    j.state, j.total_count, j.created_count, j.updated_count, j.unchanged_count, j.rejected_count, j.valid_count,
    j.filename, j.size_bytes, j.file_sha256, j.error, j.creator_kind, j.creator_id, j.complete_time, j.version,
    j.create_time, j.update_time";

impl JobRow {
    fn to_proto(&self) -> ImportJob {
        ImportJob {
            id: self.id.to_string(),
            entity_id: self.entity_id.to_string(),
            record_kind: i32::from(self.record_kind),
            import_key: self.import_key.clone(),
            mode: i32::from(self.mode),
            duplicate_policy: i32::from(self.duplicate_policy),
            dry_run: self.dry_run,
            state: i32::from(self.state),
            counts: Some(ImportCounts {
                total: self.total_count,
                created: self.created_count,
                updated: self.updated_count,
                unchanged: self.unchanged_count,
                rejected: self.rejected_count,
                valid: self.valid_count,
            }),
            filename: self.filename.clone(),
            size_bytes: self.size_bytes,
            file_sha256: self.file_sha256.clone(),
            error: self.error.clone(),
            creator: (self.creator_kind != 0).then(|| ActorRef {
                kind: i32::from(self.creator_kind),
                id: self.creator_id.clone(),
                display_name: String::new(),
            }),
            create_time: Some(timestamp(self.create_time)),
            complete_time: self.complete_time.map(timestamp),
            update_time: Some(timestamp(self.update_time)),
            etag: etag(self.version),
        }
    }
}

impl Audited for ImportJob {
    const RESOURCE_TYPE: &'static str = "crm.import_job";
    fn record_id(&self) -> &str {
        &self.id
    }
    fn owner(&self) -> &str {
        &self.entity_id
    }
}

async fn load_job(conn: &mut AsyncPgConnection, id: Uuid) -> Result<Option<JobRow>, Error> {
    let rows: Vec<JobRow> = diesel::sql_query(format!("SELECT {JOB_COLUMNS} FROM import_jobs j WHERE j.id = $1"))
        .bind::<SqlUuid, _>(id)
        .load(conn)
        .await
        .map_err(DbError::from)?;
    Ok(rows.into_iter().next())
}

/// A job about to be written: everything but its outcome.
#[derive(Debug, Clone)]
struct Draft {
    id: Uuid,
    kind: Kind,
    options: Options,
    size: i64,
    sha256: String,
    creator: ActorRef,
}

/// Finds the first run of the same file with the same key and options.
async fn same_run(conn: &mut AsyncPgConnection, d: &Draft) -> Result<Option<JobRow>, Error> {
    let o = &d.options;
    let rows: Vec<JobRow> = diesel::sql_query(format!(
        "SELECT {JOB_COLUMNS} FROM import_jobs j
          WHERE j.entity_id = $1 AND j.record_kind = $2 AND j.import_key = $3 AND j.file_sha256 = $4
            AND j.mode = $5 AND j.duplicate_policy = $6 AND j.dry_run = $7 AND j.encoding = $8
            AND j.delimiter = $9 AND j.columns = $10
          ORDER BY j.create_time, j.id LIMIT 1"
    ))
    .bind::<SqlUuid, _>(o.entity)
    .bind::<SmallInt, _>(d.kind.record_kind() as i16)
    .bind::<Text, _>(&o.key)
    .bind::<Text, _>(&d.sha256)
    .bind::<SmallInt, _>(o.mode as i16)
    .bind::<SmallInt, _>(o.policy as i16)
    .bind::<Bool, _>(o.dry_run)
    .bind::<SmallInt, _>(o.encoding as i16)
    .bind::<Text, _>(&o.delimiter)
    .bind::<Array<Text>, _>(&o.columns)
    .load(conn)
    .await
    .map_err(DbError::from)?;
    Ok(rows.into_iter().next())
}

/// Writes the job and its row reports; `rolled_back` when the rows'
/// writes were undone (dry run, all-or-nothing with a rejected row): what
/// was created or updated is then only `VALID`.
async fn save(
    conn: &mut AsyncPgConnection,
    d: &Draft,
    mut reports: Vec<Report>,
    error: &str,
    rolled_back: bool,
) -> Result<ImportJob, Error> {
    if rolled_back {
        for r in &mut reports {
            match r.outcome {
                ImportRowOutcome::Created => {
                    r.outcome = ImportRowOutcome::Valid;
                    r.record = None;
                }
                ImportRowOutcome::Updated => r.outcome = ImportRowOutcome::Valid,
                _ => {}
            }
        }
    }
    let count = |o: ImportRowOutcome| reports.iter().filter(|r| r.outcome == o).count() as i64;
    let (created, updated, unchanged, rejected, valid) = (
        count(ImportRowOutcome::Created),
        count(ImportRowOutcome::Updated),
        count(ImportRowOutcome::Unchanged),
        count(ImportRowOutcome::Rejected),
        count(ImportRowOutcome::Valid),
    );
    let o = &d.options;
    let state = if !error.is_empty() {
        ImportJobState::Failed
    } else if o.dry_run {
        ImportJobState::Validated
    } else if rejected == 0 {
        ImportJobState::Succeeded
    } else if o.mode == ImportMode::AllOrNothing || created + updated + unchanged == 0 {
        ImportJobState::Failed
    } else {
        ImportJobState::PartiallySucceeded
    };
    diesel::sql_query(
        "INSERT INTO import_jobs (id, entity_id, record_kind, import_key, mode, duplicate_policy, dry_run, state,
            total_count, created_count, updated_count, unchanged_count, rejected_count, valid_count, filename,
            size_bytes, file_sha256, encoding, delimiter, columns, error, creator_kind, creator_id, complete_time)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21,
            $22, $23, now())",
    )
    .bind::<SqlUuid, _>(d.id)
    .bind::<SqlUuid, _>(o.entity)
    .bind::<SmallInt, _>(d.kind.record_kind() as i16)
    .bind::<Text, _>(&o.key)
    .bind::<SmallInt, _>(o.mode as i16)
    .bind::<SmallInt, _>(o.policy as i16)
    .bind::<Bool, _>(o.dry_run)
    .bind::<SmallInt, _>(state as i16)
    .bind::<BigInt, _>(reports.len() as i64)
    .bind::<BigInt, _>(created)
    .bind::<BigInt, _>(updated)
    .bind::<BigInt, _>(unchanged)
    .bind::<BigInt, _>(rejected)
    .bind::<BigInt, _>(valid)
    .bind::<Text, _>(&o.filename)
    .bind::<BigInt, _>(d.size)
    .bind::<Text, _>(&d.sha256)
    .bind::<SmallInt, _>(o.encoding as i16)
    .bind::<Text, _>(&o.delimiter)
    .bind::<Array<Text>, _>(&o.columns)
    .bind::<Text, _>(error)
    .bind::<SmallInt, _>(d.creator.kind as i16)
    .bind::<Text, _>(&d.creator.id)
    .execute(conn)
    .await
    .map_err(DbError::from)?;
    for batch in reports.chunks(REPORT_BATCH) {
        let numbers: Vec<i64> = batch.iter().map(|r| r.number).collect();
        let hashes: Vec<&str> = batch.iter().map(|r| r.hash.as_str()).collect();
        let outcomes: Vec<i16> = batch.iter().map(|r| r.outcome as i16).collect();
        let records: Vec<Option<Uuid>> = batch.iter().map(|r| r.record).collect();
        let violations: Vec<serde_json::Value> =
            batch.iter().map(|r| serde_json::to_value(&r.violations).unwrap_or_default()).collect();
        let duplicates: Vec<serde_json::Value> = batch
            .iter()
            .map(|r| {
                serde_json::to_value(r.duplicates.iter().map(StoredCandidate::of).collect::<Vec<_>>())
                    .unwrap_or_default()
            })
            .collect();
        diesel::sql_query(
            "INSERT INTO import_rows (import_job_id, entity_id, record_kind, import_key, row_number, content_hash,
                outcome, record_id, violations, duplicates)
             SELECT $1, $2, $3, $4, r.n, r.h, r.o, r.id, r.v, r.d
               FROM unnest($5::bigint[], $6::text[], $7::smallint[], $8::uuid[], $9::jsonb[], $10::jsonb[])
                 AS r(n, h, o, id, v, d)",
        )
        .bind::<SqlUuid, _>(d.id)
        .bind::<SqlUuid, _>(o.entity)
        .bind::<SmallInt, _>(d.kind.record_kind() as i16)
        .bind::<Text, _>(&o.key)
        .bind::<Array<BigInt>, _>(numbers)
        .bind::<Array<Text>, _>(hashes)
        .bind::<Array<SmallInt>, _>(outcomes)
        .bind::<Array<Nullable<SqlUuid>>, _>(records)
        .bind::<Array<Jsonb>, _>(violations)
        .bind::<Array<Jsonb>, _>(duplicates)
        .execute(conn)
        .await
        .map_err(DbError::from)?;
    }
    let job = load_job(conn, d.id).await?.ok_or_else(|| Error::internal("import job not found"))?.to_proto();
    audit(conn, "crm.import_jobs.create", None, Some(&job)).await?;
    Ok(job)
}

// ---------------------------------------------------------------------------
// The runner
// ---------------------------------------------------------------------------

/// Why the import transaction ends without committing.
enum Stop {
    Failed(Error),
    /// Nothing may be written: roll the rows back, keep their reports.
    Rollback(Vec<Report>),
}

impl From<DbError> for Stop {
    fn from(e: DbError) -> Self {
        Stop::Failed(e.into())
    }
}

impl From<Error> for Stop {
    fn from(e: Error) -> Self {
        Stop::Failed(e)
    }
}

/// What the runner needs to write rows.
struct Context {
    kind: Kind,
    entity: Uuid,
    policy: DuplicatePolicy,
    readable: EntityScope,
    write: EntityScope,
    headers: Vec<String>,
    /// The entity's ancestors, whose offered membership types rows may use.
    ancestors: Vec<Uuid>,
    /// Who imports: the author of imported interactions.
    author: ActorRef,
    /// Where the importer sees what interactions name (interactions only).
    scopes: Option<interactions::Scopes>,
}

impl Context {
    /// A problem named after the file's column.
    fn violation(&self, p: &Problem) -> StoredViolation {
        let field = self
            .kind
            .columns()
            .iter()
            .position(|c| c.name == p.column)
            .map(|i| self.headers[i].clone())
            .unwrap_or_default();
        StoredViolation { field, reason: p.reason.clone(), description: p.description.clone() }
    }
}

/// What writing a row did.
enum Written {
    Created(Uuid),
    /// The record, and its duplicate keys after the update.
    Updated(Uuid, Vec<String>),
    Rejected(Vec<Problem>, Vec<DuplicateCandidate>),
}

#[derive(QueryableByName)]
struct Loaded {
    #[diesel(sql_type = Text)]
    content_hash: String,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    record_id: Option<Uuid>,
}

/// The rows of the file already loaded under the key: hash → record.
async fn loaded(
    conn: &mut AsyncPgConnection,
    kind: Kind,
    entity: Uuid,
    key: &str,
    rows: &[Row],
) -> Result<HashMap<String, Option<Uuid>>, Error> {
    let mut found = HashMap::new();
    let hashes: Vec<&str> = rows.iter().map(|r| r.hash.as_str()).collect();
    for batch in hashes.chunks(LOOKUP_BATCH) {
        let rows: Vec<Loaded> = diesel::sql_query(
            "SELECT content_hash, record_id FROM import_rows
              WHERE entity_id = $1 AND record_kind = $2 AND import_key = $3 AND outcome IN (1, 2)
                AND content_hash = ANY($4)",
        )
        .bind::<SqlUuid, _>(entity)
        .bind::<SmallInt, _>(kind.record_kind() as i16)
        .bind::<Text, _>(key)
        .bind::<Array<Text>, _>(batch)
        .load(conn)
        .await
        .map_err(DbError::from)?;
        found.extend(rows.into_iter().map(|r| (r.content_hash, r.record_id)));
    }
    Ok(found)
}

#[derive(QueryableByName)]
struct Named {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = Nullable<Text>)]
    siret: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    siren: Option<String>,
    #[diesel(sql_type = SmallInt)]
    state: i16,
    #[diesel(sql_type = Array<Text>)]
    refs: Vec<String>,
}

/// The organisations of the entity the rows name, in batches.
async fn named_organizations(conn: &mut AsyncPgConnection, entity: Uuid, rows: &[Row]) -> Result<Vec<Named>, Error> {
    let mut refs: Vec<OrgRef> = rows.iter().filter_map(|r| r.prepared.organization().cloned()).collect();
    refs.sort_by_key(|r| format!("{r:?}"));
    refs.dedup();
    let mut found = Vec::new();
    for batch in refs.chunks(LOOKUP_BATCH) {
        let ids: Vec<Uuid> =
            batch.iter().filter_map(|r| if let OrgRef::Id(id) = r { Some(*id) } else { None }).collect();
        let sirets: Vec<&str> =
            batch.iter().filter_map(|r| if let OrgRef::Siret(s) = r { Some(s.as_str()) } else { None }).collect();
        let externals: Vec<&str> =
            batch.iter().filter_map(|r| if let OrgRef::External(e) = r { Some(e.as_str()) } else { None }).collect();
        let sirens: Vec<&str> =
            batch.iter().filter_map(|r| if let OrgRef::Siren(s) = r { Some(s.as_str()) } else { None }).collect();
        let rows: Vec<Named> = diesel::sql_query(
            "SELECT o.id, o.siret, o.siren, o.state,
                    ARRAY(SELECT e.key || '=' || e.value FROM jsonb_each_text(o.external_refs) e) AS refs
               FROM organizations o
              WHERE o.entity_id = $1
                AND (o.id = ANY($2) OR o.siret = ANY($3) OR o.siren = ANY($5)
                     OR EXISTS (SELECT 1 FROM jsonb_each_text(o.external_refs) e WHERE e.key || '=' || e.value = ANY($4)))",
        )
        .bind::<SqlUuid, _>(entity)
        .bind::<Array<SqlUuid>, _>(ids)
        .bind::<Array<Text>, _>(sirets)
        .bind::<Array<Text>, _>(externals)
        .bind::<Array<Text>, _>(sirens)
        .load(conn)
        .await
        .map_err(DbError::from)?;
        found.extend(rows);
    }
    Ok(found)
}

/// The organisation a row names, or the problem: the one organisation of
/// the entity it designates, or the one active among several (a SIRET
/// shared with the organisations merged into it).
fn resolve(organization: &OrgRef, named: &[Named]) -> Result<Uuid, Problem> {
    let matches: Vec<&Named> = named
        .iter()
        .filter(|n| match organization {
            OrgRef::Id(id) => n.id == *id,
            OrgRef::Siret(s) => n.siret.as_deref() == Some(s.as_str()),
            OrgRef::Siren(s) => n.siren.as_deref() == Some(s.as_str()),
            OrgRef::External(e) => n.refs.contains(e),
        })
        .collect();
    let matches: Vec<(Uuid, bool)> =
        matches.iter().map(|n| (n.id, n.state == OrganizationState::Active as i16)).collect();
    designated(&matches, organization.column(), &ORGANIZATION_WORDS, "")
}

/// How a reference's problems speak of what it names.
struct Words {
    /// `organization` or `contact`, for the reasons.
    kind: &'static str,
    unknown: &'static str,
    merged: &'static str,
    ambiguous: &'static str,
}

const ORGANIZATION_WORDS: Words = Words {
    kind: "organization",
    unknown: "ne désigne aucune organisation de l'entité",
    merged: "l'organisation a été fusionnée",
    ambiguous: "désigne plusieurs organisations de l'entité : précisez le SIRET ou l'identifiant",
};

const CONTACT_WORDS: Words = Words {
    kind: "contact",
    unknown: "ne désigne aucun contact de l'entité",
    merged: "le contact a été fusionné ou effacé",
    ambiguous: "désigne plusieurs contacts de l'entité : précisez leurs identifiants",
};

/// The one record a reference designates among its `matches` (id,
/// active): the only one, or the only active one; else the problem on
/// `column` (its description after `prefix`).
fn designated(matches: &[(Uuid, bool)], column: &'static str, words: &Words, prefix: &str) -> Result<Uuid, Problem> {
    let active: Vec<Uuid> = matches.iter().filter(|m| m.1).map(|m| m.0).collect();
    let (reason, description) = match (matches, active.as_slice()) {
        (_, [one]) => return Ok(*one),
        ([], _) => ("unknown", words.unknown),
        ([_], []) => ("merged", words.merged),
        _ => ("ambiguous", words.ambiguous),
    };
    Err(problem(column, &format!("{reason}_{}", words.kind), format!("{prefix}{description}")))
}

#[derive(QueryableByName)]
struct NamedContact {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = SmallInt)]
    state: i16,
    #[diesel(sql_type = Array<Text>)]
    email_keys: Vec<String>,
}

/// The contacts of the entity the interaction rows name by e-mail, in
/// batches.
async fn named_contacts(conn: &mut AsyncPgConnection, entity: Uuid, rows: &[Row]) -> Result<Vec<NamedContact>, Error> {
    let mut keys: Vec<&str> = rows
        .iter()
        .filter_map(|r| match &r.prepared {
            Prepared::Interaction(i) => match &i.contacts {
                ContactRefs::Emails(keys) => Some(keys.iter().map(String::as_str)),
                _ => None,
            },
            _ => None,
        })
        .flatten()
        .collect();
    keys.sort_unstable();
    keys.dedup();
    let mut found = Vec::new();
    for batch in keys.chunks(LOOKUP_BATCH) {
        let rows: Vec<NamedContact> =
            diesel::sql_query("SELECT id, state, email_keys FROM contacts WHERE entity_id = $1 AND email_keys && $2")
                .bind::<SqlUuid, _>(entity)
                .bind::<Array<Text>, _>(batch)
                .load(conn)
                .await
                .map_err(DbError::from)?;
        found.extend(rows);
    }
    Ok(found)
}

/// The contacts an interaction row names, or their problems.
fn resolve_contacts(contacts: &ContactRefs, named: &[NamedContact]) -> Result<Vec<Uuid>, Vec<Problem>> {
    let keys = match contacts {
        ContactRefs::None => return Ok(Vec::new()),
        ContactRefs::Ids(ids) => return Ok(ids.clone()),
        ContactRefs::Emails(keys) => keys,
    };
    let (mut ids, mut problems) = (Vec::new(), Vec::new());
    for key in keys {
        let matches: Vec<(Uuid, bool)> = named
            .iter()
            .filter(|n| n.email_keys.contains(key))
            .map(|n| (n.id, n.state == ContactState::Active as i16))
            .collect();
        match designated(&matches, "contact_emails", &CONTACT_WORDS, &format!("« {key} » ")) {
            Ok(id) => ids.push(id),
            Err(p) => problems.push(p),
        }
    }
    if problems.is_empty() { Ok(ids) } else { Err(problems) }
}

/// The membership types the rows name by code and the entity may use, in
/// one statement.
async fn named_types(conn: &mut AsyncPgConnection, ctx: &Context, rows: &[Row]) -> Result<Vec<TypeRow>, Error> {
    let mut codes: Vec<String> = rows
        .iter()
        .filter_map(|r| match &r.prepared {
            Prepared::Membership(m) => match &m.membership_type {
                TypeRef::Code(code) => Some(code.clone()),
                TypeRef::Id(_) => None,
            },
            _ => None,
        })
        .collect();
    codes.sort();
    codes.dedup();
    if codes.is_empty() {
        return Ok(Vec::new());
    }
    let types = membership_types::load_by_codes(conn, &codes).await?;
    Ok(types.into_iter().filter(|t| t.usable_by(ctx.entity, &ctx.ancestors)).collect())
}

/// The membership type a row names, or the problem: by id as given (the
/// create path checks it), by code the entity's own type, else the one its
/// nearest ancestor offers.
fn resolve_type(membership_type: &TypeRef, ctx: &Context, types: &[TypeRow]) -> Result<Uuid, Problem> {
    let code = match membership_type {
        TypeRef::Id(id) => return Ok(*id),
        TypeRef::Code(code) => code,
    };
    let nearness = |t: &TypeRow| {
        if t.entity_id == ctx.entity {
            usize::MAX
        } else {
            ctx.ancestors.iter().position(|a| *a == t.entity_id).unwrap_or(0)
        }
    };
    types.iter().filter(|t| t.code == *code).max_by_key(|t| nearness(t)).map(|t| t.id).ok_or_else(|| {
        problem(
            membership_type.column(),
            "unknown_membership_type",
            "code de type d'adhésion inconnu, ou non proposé à cette entité",
        )
    })
}

/// The one candidate of the entity matching on an identifier, if exactly
/// one does.
fn identifier_match(candidates: &[DuplicateCandidate], entity: Uuid, siren_counts: bool) -> Option<Uuid> {
    let entity = entity.to_string();
    let mut ids: Vec<&str> = candidates
        .iter()
        .filter(|c| !c.in_other_entity && c.entity_id == entity)
        .filter(|c| {
            c.reasons.iter().any(|r| match DuplicateReason::try_from(*r) {
                Ok(DuplicateReason::SameSiret | DuplicateReason::SameEmail | DuplicateReason::SamePhone) => true,
                Ok(DuplicateReason::SameSiren) => siren_counts,
                _ => false,
            })
        })
        .map(|c| c.record_id.as_str())
        .collect();
    ids.dedup();
    match ids.as_slice() {
        [one] => Uuid::parse_str(one).ok(),
        _ => None,
    }
}

/// The duplicate problems of a rejected row: one per candidate, on the
/// column of its strongest reason.
fn duplicate_problems(
    kind: Kind,
    candidates: &[DuplicateCandidate],
    policy: DuplicatePolicy,
    has_siret: bool,
) -> Vec<Problem> {
    candidates
        .iter()
        .map(|c| {
            let column = match <[i32]>::first(&c.reasons).and_then(|r| DuplicateReason::try_from(*r).ok()) {
                Some(DuplicateReason::SameSiren) if has_siret => "siret",
                Some(DuplicateReason::SameSiren) => "siren",
                Some(DuplicateReason::SameSiret) => "siret",
                Some(DuplicateReason::SameEmail) => "email",
                Some(DuplicateReason::SamePhone) => "phone",
                _ => kind.required()[0][0],
            };
            let who = if c.in_other_entity {
                "une fiche d'une autre entité".to_owned()
            } else if c.summary.is_empty() {
                format!("« {} »", c.display_name)
            } else {
                format!("« {} » ({})", c.display_name, c.summary)
            };
            let (reason, description) = if policy == DuplicatePolicy::UpdateExisting {
                (
                    "duplicate_not_updatable",
                    format!(
                        "doublon probable de {who} : la mise à jour demande une seule fiche de l'entité \
                         identifiée par SIRET, e-mail ou téléphone"
                    ),
                )
            } else {
                ("duplicate_suspected", format!("doublon probable de {who}"))
            };
            problem(column, reason, description)
        })
        .collect()
}

/// Creates, updates or rejects one valid organisation row.
async fn write_organization(
    conn: &mut AsyncPgConnection,
    ctx: &Context,
    row: &Organization,
    input: &OrganizationInput,
    cells: &Cells<'_>,
    clear: bool,
) -> Result<Written, Error> {
    let duplicates = if clear || ctx.policy == DuplicatePolicy::CreateAnyway {
        Vec::new()
    } else {
        let found = organizations::find_duplicates(conn, input, None, 10, &ctx.readable, &[]).await?;
        socle_db::set_scope(conn, &ctx.write).await.map_err(DbError::from)?;
        found
    };
    if duplicates.is_empty() || ctx.policy == DuplicatePolicy::CreateAnyway {
        let id = Uuid::now_v7();
        organizations::insert(conn, id, ctx.entity, input).await?;
        return Ok(Written::Created(id));
    }
    let target = match ctx.policy {
        DuplicatePolicy::UpdateExisting => identifier_match(&duplicates, ctx.entity, row.siret.is_empty()),
        _ => None,
    };
    let Some(id) = target else {
        return Ok(Written::Rejected(
            duplicate_problems(ctx.kind, &duplicates, ctx.policy, !row.siret.is_empty()),
            duplicates,
        ));
    };
    let Some(current) = organizations::load_for_update(conn, id).await? else {
        return Ok(Written::Rejected(
            duplicate_problems(ctx.kind, &duplicates, ctx.policy, !row.siret.is_empty()),
            duplicates,
        ));
    };
    let before = current.to_proto();
    if before.state != OrganizationState::Active as i32 {
        return Ok(Written::Rejected(
            duplicate_problems(ctx.kind, &duplicates, ctx.policy, !row.siret.is_empty()),
            duplicates,
        ));
    }
    let next = overlay_organization(before.clone(), row, cells);
    let input = match organizations::validate(&next, "organization", true) {
        Ok(input) => input,
        Err(error) => {
            let mut problems = Vec::new();
            absorb_violations(&mut problems, &error, "organization.", organization_column);
            return Ok(Written::Rejected(problems, Vec::new()));
        }
    };
    organizations::write(conn, id, current.version, &input).await?;
    let after = organizations::load(conn, id).await?.ok_or_else(|| Error::internal("updated row not found"))?;
    let after = after.to_proto();
    audit(conn, "crm.organizations.update", Some(&before), Some(&after)).await?;
    Ok(Written::Updated(id, input.duplicate_keys()))
}

/// `current` with the row's non-empty values.
fn overlay_organization(mut o: Organization, row: &Organization, c: &Cells<'_>) -> Organization {
    for (into, from) in [
        (&mut o.legal_name, &row.legal_name),
        (&mut o.trade_name, &row.trade_name),
        (&mut o.naf_code, &row.naf_code),
        (&mut o.legal_form_code, &row.legal_form_code),
        (&mut o.website, &row.website),
        (&mut o.email, &row.email),
        (&mut o.phone, &row.phone),
        (&mut o.description, &row.description),
    ] {
        if !from.is_empty() {
            *into = from.clone();
        }
    }
    if !row.siret.is_empty() {
        o.siret = row.siret.clone();
        o.siren = row.siren.clone();
    } else if !row.siren.is_empty() {
        o.siren = row.siren.clone();
        let siren = validate::normalize_siren(&row.siren).unwrap_or_default();
        if !o.siret.starts_with(&siren) {
            o.siret.clear();
        }
    }
    if row.headcount_band != 0 {
        o.headcount_band = row.headcount_band;
    }
    if let Some(given) = <[OrganizationAddress]>::first(&row.addresses) {
        let at = o.addresses.iter().position(|a| a.primary).or(if o.addresses.is_empty() { None } else { Some(0) });
        match at {
            None => o.addresses.push(given.clone()),
            Some(i) => {
                let target = &mut o.addresses[i];
                if c.has("address_kind") {
                    target.kind = given.kind;
                }
                let from = given.address.clone().unwrap_or_default();
                let into = target.address.get_or_insert_with(PostalAddress::default);
                for (into, from) in [
                    (&mut into.street_line, from.street_line),
                    (&mut into.complement, from.complement),
                    (&mut into.postal_code, from.postal_code),
                    (&mut into.city, from.city),
                    (&mut into.country_code, from.country_code),
                ] {
                    if !from.is_empty() {
                        *into = from;
                    }
                }
            }
        }
    }
    for tag in &row.tags {
        if !o.tags.contains(tag) {
            o.tags.push(tag.clone());
        }
    }
    o.external_refs.extend(row.external_refs.clone());
    o
}

/// Creates, updates or rejects one valid contact row, with its affiliation.
async fn write_contact(
    conn: &mut AsyncPgConnection,
    ctx: &Context,
    row: &Contact,
    input: &ContactInput,
    organization: Option<(Uuid, &Link)>,
    clear: bool,
) -> Result<Written, Error> {
    let duplicates = if clear || ctx.policy == DuplicatePolicy::CreateAnyway {
        Vec::new()
    } else {
        let found = contacts::find_duplicates(conn, input, None, 10, &ctx.readable, &[]).await?;
        socle_db::set_scope(conn, &ctx.write).await.map_err(DbError::from)?;
        found
    };
    if duplicates.is_empty() || ctx.policy == DuplicatePolicy::CreateAnyway {
        let id = Uuid::now_v7();
        contacts::insert(conn, id, ctx.entity, input).await?;
        if let Some((organization, link)) = organization {
            affiliate(conn, ctx.entity, id, organization, link, false).await?;
        }
        return Ok(Written::Created(id));
    }
    let target = match ctx.policy {
        DuplicatePolicy::UpdateExisting => identifier_match(&duplicates, ctx.entity, false),
        _ => None,
    };
    let rejected = |duplicates: Vec<DuplicateCandidate>| {
        Ok(Written::Rejected(duplicate_problems(ctx.kind, &duplicates, ctx.policy, false), duplicates))
    };
    let Some(id) = target else { return rejected(duplicates) };
    let Some(current) = contacts::load_for_update(conn, id).await? else { return rejected(duplicates) };
    let before = current.to_proto();
    if before.state != ContactState::Active as i32 {
        return rejected(duplicates);
    }
    let next = overlay_contact(before.clone(), row);
    let input = match contacts::validate(&next, "contact", true) {
        Ok(input) => input,
        Err(error) => {
            let mut problems = Vec::new();
            absorb_violations(&mut problems, &error, "contact.", |p| contact_column(p, true, true));
            return Ok(Written::Rejected(problems, Vec::new()));
        }
    };
    contacts::write(conn, id, current.version, &input).await?;
    let after = contacts::load(conn, id).await?.ok_or_else(|| Error::internal("updated row not found"))?;
    audit(conn, "crm.contacts.update", Some(&before), Some(&after.to_proto())).await?;
    if let Some((organization, link)) = organization {
        affiliate(conn, ctx.entity, id, organization, link, true).await?;
    }
    Ok(Written::Updated(id, input.duplicate_keys()))
}

/// `current` with the row's non-empty values; e-mails, phones and tags
/// added, consents and references replaced one by one.
fn overlay_contact(mut c: Contact, row: &Contact) -> Contact {
    if row.civility != 0 {
        c.civility = row.civility;
    }
    for (into, from) in [
        (&mut c.given_name, &row.given_name),
        (&mut c.family_name, &row.family_name),
        (&mut c.job_title, &row.job_title),
    ] {
        if !from.is_empty() {
            *into = from.clone();
        }
    }
    let email_key = |a: &str| validate::normalize_email(a).map(|e| validate::email_match_key(&e)).unwrap_or_default();
    for email in &row.emails {
        if !c.emails.iter().any(|e| email_key(&e.address) == email_key(&email.address)) {
            c.emails.push(ContactEmail { primary: c.emails.is_empty() && email.primary, ..email.clone() });
        }
    }
    let phone_key = |n: &str| validate::normalize_phone(n).unwrap_or_default();
    for phone in &row.phones {
        if !c.phones.iter().any(|p| phone_key(&p.number) == phone_key(&phone.number)) {
            c.phones.push(ContactPhone { primary: c.phones.is_empty() && phone.primary, ..phone.clone() });
        }
    }
    if let Some(from) = &row.address {
        let into = c.address.get_or_insert_with(PostalAddress::default);
        for (into, from) in [
            (&mut into.street_line, &from.street_line),
            (&mut into.complement, &from.complement),
            (&mut into.postal_code, &from.postal_code),
            (&mut into.city, &from.city),
            (&mut into.country_code, &from.country_code),
        ] {
            if !from.is_empty() {
                *into = from.clone();
            }
        }
    }
    for consent in &row.consents {
        match c.consents.iter_mut().find(|k| k.topic == consent.topic && k.channel == consent.channel) {
            Some(existing) if existing.granted != consent.granted => *existing = consent.clone(),
            Some(_) => {}
            None => c.consents.push(consent.clone()),
        }
    }
    for tag in &row.tags {
        if !c.tags.contains(tag) {
            c.tags.push(tag.clone());
        }
    }
    c.external_refs.extend(row.external_refs.clone());
    c
}

/// Creates the affiliation a contact row asks for, audited like a create;
/// for an existing contact (`check`), only when it has no current link
/// with the organisation (the pair locked as `affiliations` does).
async fn affiliate(
    conn: &mut AsyncPgConnection,
    entity: Uuid,
    contact: Uuid,
    organization: Uuid,
    link: &Link,
    check: bool,
) -> Result<(), Error> {
    if check {
        diesel::sql_query("SELECT pg_advisory_xact_lock(hashtextextended('crm.affiliations:' || $1 || ':' || $2, 0))")
            .bind::<Text, _>(contact.to_string())
            .bind::<Text, _>(organization.to_string())
            .execute(conn)
            .await
            .map_err(DbError::from)?;
        let existing: Count = diesel::sql_query(format!(
            "SELECT count(*) AS n FROM affiliations a WHERE a.contact_id = $1 AND a.organization_id = $2
                AND (a.end_date IS NULL OR a.end_date >= {TODAY_SQL})"
        ))
        .bind::<SqlUuid, _>(contact)
        .bind::<SqlUuid, _>(organization)
        .get_result(conn)
        .await
        .map_err(DbError::from)?;
        if existing.n > 0 {
            return Ok(());
        }
    }
    let row = crate::affiliations::NewAffiliation {
        id: Uuid::now_v7(),
        entity,
        contact,
        organization,
        roles: link.roles.clone(),
        job_title: link.job_title.clone(),
        start_date: None,
        end_date: None,
    };
    crate::affiliations::insert(conn, row).await.map(|_| ())
}

/// Creates or rejects one valid membership row through the create path
/// (`memberships::create`, with its audit events); its refusals (a field,
/// an overlapping period) become the row's problems.
async fn write_membership(
    conn: &mut AsyncPgConnection,
    ctx: &Context,
    draft: &MembershipDraft,
    named: &[Named],
    types: &[TypeRow],
) -> Result<Written, Error> {
    let references = resolve(&draft.organization, named)
        .and_then(|organization| Ok((organization, resolve_type(&draft.membership_type, ctx, types)?)));
    let (organization, membership_type) = match references {
        Ok(found) => found,
        Err(p) => return Ok(Written::Rejected(vec![p], Vec::new())),
    };
    let m = Membership {
        organization_id: organization.to_string(),
        membership_type_id: membership_type.to_string(),
        ..draft.membership.clone()
    };
    let id = Uuid::now_v7();
    let created = match memberships::validate_new(&m) {
        Ok(new) => memberships::create(conn, id, ctx.entity, &ctx.ancestors, new, draft.paid_in_full).await,
        Err(error) => Err(error),
    };
    let error = match created {
        Ok(_) => return Ok(Written::Created(id)),
        Err(error) => error,
    };
    let mut problems = Vec::new();
    if error.code() == Code::InvalidArgument && !error.violations().is_empty() {
        let (organization, membership_type) = (draft.organization.column(), draft.membership_type.column());
        absorb_violations(&mut problems, &error, "membership.", |path| {
            membership_column(path, organization, membership_type)
        });
    } else if error.reason() == Some("OVERLAPPING_MEMBERSHIP") {
        problems.push(problem("start_date", "overlapping_membership", error.message()));
    } else {
        return Err(error);
    }
    Ok(Written::Rejected(problems, Vec::new()))
}

/// Creates or rejects one valid interaction row through the create path
/// (`interactions::create`, with its audit event), recorded by the
/// importer; its refusals become the row's problems.
async fn write_interaction(
    conn: &mut AsyncPgConnection,
    ctx: &Context,
    draft: &InteractionDraft,
    named: &[Named],
    contacts: &[NamedContact],
) -> Result<Written, Error> {
    let mut problems = Vec::new();
    let organization = match draft.organization.as_ref().map(|o| resolve(o, named)).transpose() {
        Ok(organization) => organization,
        Err(p) => {
            problems.push(p);
            None
        }
    };
    let contact_ids = resolve_contacts(&draft.contacts, contacts).unwrap_or_else(|p| {
        problems.extend(p);
        Vec::new()
    });
    if !problems.is_empty() {
        return Ok(Written::Rejected(problems, Vec::new()));
    }
    let i = Interaction {
        organization_id: organization.map(|o| o.to_string()).unwrap_or_default(),
        contact_ids: contact_ids.iter().map(Uuid::to_string).collect(),
        ..draft.interaction.clone()
    };
    let (Some(scopes), id) = (&ctx.scopes, Uuid::now_v7()) else {
        return Err(Error::internal("interaction imports need the reference scopes"));
    };
    let created = match interactions::validate(&i, "interaction") {
        Ok(input) => interactions::create(conn, id, ctx.entity, &ctx.author, &input, scopes, &ctx.write).await,
        Err(error) => Err(error),
    };
    match created {
        Ok(_) => Ok(Written::Created(id)),
        Err(error) if error.code() == Code::InvalidArgument && !error.violations().is_empty() => {
            absorb_violations(&mut problems, &error, "interaction.", |path| draft.column(path));
            Ok(Written::Rejected(problems, Vec::new()))
        }
        Err(error) => Err(error),
    }
}

/// Writes the rows of a parsed file; returns their reports.
async fn process(
    conn: &mut AsyncPgConnection,
    ctx: &Context,
    options: &Options,
    parsed: &Parsed,
) -> Result<Vec<Report>, Error> {
    let loaded = loaded(conn, ctx.kind, ctx.entity, &options.key, &parsed.rows).await?;
    let named = match ctx.kind {
        Kind::Organizations => Vec::new(),
        _ => named_organizations(conn, ctx.entity, &parsed.rows).await?,
    };
    let types = named_types(conn, ctx, &parsed.rows).await?;
    let contacts = match ctx.kind {
        Kind::Interactions => named_contacts(conn, ctx.entity, &parsed.rows).await?,
        _ => Vec::new(),
    };
    // Rows of this file already written: hash → record.
    let mut written: HashMap<String, Option<Uuid>> = HashMap::new();
    let mut reports = Vec::with_capacity(parsed.rows.len());
    for chunk in parsed.rows.chunks(SCREEN_BATCH) {
        // Which rows of the chunk look like existing records, in one
        // statement; the others can only duplicate rows written since,
        // which share a key with them (identifier or postal code).
        let hinted = screen(conn, ctx, chunk, &loaded).await?;
        let mut fresh_keys: HashSet<String> = HashSet::new();
        for (row, hinted) in chunk.iter().zip(hinted) {
            let mut report = Report {
                number: row.number,
                hash: row.hash.clone(),
                outcome: ImportRowOutcome::Rejected,
                record: None,
                violations: row.problems.iter().map(|p| ctx.violation(p)).collect(),
                duplicates: Vec::new(),
            };
            if !row.problems.is_empty() {
                reports.push(report);
                continue;
            }
            if let Some(record) = loaded.get(&row.hash).or_else(|| written.get(&row.hash)) {
                report.outcome = ImportRowOutcome::Unchanged;
                report.record = *record;
                reports.push(report);
                continue;
            }
            let keys = match &row.prepared {
                Prepared::Organization(o) => o.1.duplicate_keys(),
                Prepared::Contact(c) => c.1.duplicate_keys(),
                Prepared::Membership(_) | Prepared::Interaction(_) | Prepared::Invalid => Vec::new(),
            };
            let clear = !hinted && !keys.iter().any(|k| fresh_keys.contains(k));
            let cells = Cells { catalogue: ctx.kind.columns(), cells: &row.cells };
            let result = match &row.prepared {
                Prepared::Invalid => Written::Rejected(Vec::new(), Vec::new()),
                Prepared::Organization(o) => write_organization(conn, ctx, &o.0, &o.1, &cells, clear).await?,
                Prepared::Contact(c) => {
                    let (contact, input, link) = c.as_ref();
                    match link.as_ref().map(|l| resolve(&l.organization, &named).map(|id| (id, l))).transpose() {
                        Ok(organization) => write_contact(conn, ctx, contact, input, organization, clear).await?,
                        Err(p) => Written::Rejected(vec![p], Vec::new()),
                    }
                }
                Prepared::Membership(m) => write_membership(conn, ctx, m, &named, &types).await?,
                Prepared::Interaction(i) => write_interaction(conn, ctx, i, &named, &contacts).await?,
            };
            match result {
                Written::Created(id) => {
                    report.outcome = ImportRowOutcome::Created;
                    report.record = Some(id);
                    written.insert(row.hash.clone(), Some(id));
                    fresh_keys.extend(keys);
                }
                Written::Updated(id, after) => {
                    report.outcome = ImportRowOutcome::Updated;
                    report.record = Some(id);
                    written.insert(row.hash.clone(), Some(id));
                    fresh_keys.extend(keys);
                    fresh_keys.extend(after);
                }
                Written::Rejected(problems, duplicates) => {
                    report.violations = problems.iter().map(|p| ctx.violation(p)).collect();
                    report.duplicates = duplicates;
                }
            }
            reports.push(report);
        }
    }
    Ok(reports)
}

/// The start date of a membership row, as written (`YYYY-MM-DD`, so in
/// date order); empty for other rows.
fn start_of(row: &Row) -> &str {
    match &row.prepared {
        Prepared::Membership(m) => &m.membership.start_date,
        _ => "",
    }
}

/// Whether each row of `chunk` has duplicate hints among the records
/// already stored (false for rows that need no check), in one statement.
async fn screen(
    conn: &mut AsyncPgConnection,
    ctx: &Context,
    chunk: &[Row],
    loaded: &HashMap<String, Option<Uuid>>,
) -> Result<Vec<bool>, Error> {
    let mut hinted = vec![false; chunk.len()];
    if ctx.policy == DuplicatePolicy::CreateAnyway {
        return Ok(hinted);
    }
    let checked = |r: &Row| r.problems.is_empty() && !loaded.contains_key(&r.hash);
    match ctx.kind {
        // Memberships and interactions have no duplicate hints (an
        // overlapping period is refused by the create path).
        Kind::Memberships | Kind::Interactions => {}
        Kind::Organizations => {
            let (at, inputs): (Vec<usize>, Vec<&OrganizationInput>) = chunk
                .iter()
                .enumerate()
                .filter(|(_, r)| checked(r))
                .filter_map(|(i, r)| if let Prepared::Organization(o) = &r.prepared { Some((i, &o.1)) } else { None })
                .unzip();
            for (i, flag) in at.into_iter().zip(organizations::have_hints(conn, &inputs).await?) {
                hinted[i] = flag;
            }
        }
        Kind::Contacts => {
            let (at, inputs): (Vec<usize>, Vec<&ContactInput>) = chunk
                .iter()
                .enumerate()
                .filter(|(_, r)| checked(r))
                .filter_map(|(i, r)| if let Prepared::Contact(c) = &r.prepared { Some((i, &c.1)) } else { None })
                .unzip();
            for (i, flag) in at.into_iter().zip(contacts::have_hints(conn, &inputs).await?) {
                hinted[i] = flag;
            }
        }
    }
    Ok(hinted)
}

impl Crm {
    /// Runs an import to its end and returns its job. `ancestry`: where
    /// membership imports find the entity's ancestors (the types they offer).
    pub async fn import<M: UploadMessage>(
        &self,
        caller: &Caller,
        kind: Kind,
        ancestry: Option<&Ancestry>,
        stream: tonic::Streaming<M>,
    ) -> Result<ImportJob, Error> {
        let (options, bytes, sha256) = receive(caller, stream).await?;
        let entity = options.entity;
        let ancestors = match ancestry {
            Some(ancestry) if kind == Kind::Memberships => ancestry.of(entity).await?,
            _ => Vec::new(),
        };
        let acting = caller.with_acting(entity);
        let scopes = match kind {
            Kind::Interactions => Some(self.reference_scopes(&acting).await?),
            _ => None,
        };
        let readable = self.scope(&acting, &kind.permission("read")).await?;
        if options.policy == DuplicatePolicy::UpdateExisting
            && !self.scope(&acting, &kind.permission("update")).await?.allows(entity)
        {
            return Err(Error::permission_denied(format!(
                "DUPLICATE_POLICY_UPDATE_EXISTING needs the {} permission",
                kind.permission("update")
            )));
        }
        let draft = Draft {
            id: Uuid::now_v7(),
            kind,
            size: bytes.len() as i64,
            sha256,
            creator: socle_server::audit::actor(caller.principal.as_ref()),
            options: options.clone(),
        };
        // Decoding, splitting and validating is CPU work: off the runtime.
        let parse_options = options.clone();
        let parsed = tokio::task::spawn_blocking(move || parse(kind, &parse_options, &bytes))
            .await
            .map_err(|e| Error::internal(format!("parsing the file: {e}")))?;
        let write = EntityScope::entity(entity);
        let ctx = Context {
            kind,
            entity,
            policy: options.policy,
            readable,
            write: write.clone(),
            headers: parsed.as_ref().map(|p| p.headers.clone()).unwrap_or_default(),
            ancestors,
            author: draft.creator.clone(),
            scopes,
        };
        let run = draft.clone();
        let result = self
            .db
            .transaction(&write, move |conn| {
                Box::pin(async move {
                    // Runs of one import key one at a time.
                    diesel::sql_query(
                        "SELECT pg_advisory_xact_lock(hashtextextended('crm.imports:' || $1 || ':' || $2 || ':' || $3, 0))",
                    )
                    .bind::<Text, _>(entity.to_string())
                    .bind::<Text, _>((kind.record_kind() as i32).to_string())
                    .bind::<Text, _>(&run.options.key)
                    .execute(conn)
                    .await
                    .map_err(DbError::from)?;
                    if let Some(first) = same_run(conn, &run).await? {
                        return Ok(first.to_proto());
                    }
                    let mut parsed = match parsed {
                        Ok(parsed) => parsed,
                        Err(error) => return Ok(save(conn, &run, Vec::new(), &error, false).await?),
                    };
                    if kind == Kind::Memberships {
                        set_ancestors(conn, &ctx.ancestors).await?;
                        // Oldest periods first, so that each links to the one
                        // it renews whatever the file's order.
                        parsed.rows.sort_by(|a, b| start_of(a).cmp(start_of(b)));
                    }
                    let reports = process(conn, &ctx, &run.options, &parsed).await?;
                    let rejected = reports.iter().any(|r| r.outcome == ImportRowOutcome::Rejected);
                    if run.options.dry_run || (run.options.mode == ImportMode::AllOrNothing && rejected) {
                        return Err(Stop::Rollback(reports));
                    }
                    socle_db::set_scope(conn, &ctx.write).await.map_err(DbError::from)?;
                    Ok(save(conn, &run, reports, "", false).await?)
                })
            })
            .await;
        match result {
            Ok(job) => Ok(job),
            Err(Stop::Failed(error)) => Err(error),
            Err(Stop::Rollback(reports)) => {
                self.db
                    .transaction(&write, move |conn| {
                        Box::pin(async move { save(conn, &draft, reports, "", true).await })
                    })
                    .await
            }
        }
    }

    /// `GetImportJob`.
    pub async fn get_import_job(&self, caller: &Caller, id: &str) -> Result<ImportJob, Error> {
        let id = parse_id("import_job_id", id)?;
        let scope = self.scope(caller, "crm.import_jobs.read").await?;
        let row = self.db.transaction(&scope, move |conn| Box::pin(async move { load_job(conn, id).await })).await?;
        match row {
            Some(row) => Ok(row.to_proto()),
            None => Err(self.not_found(caller, "import_jobs", id, "crm.import_jobs.read", "import job").await),
        }
    }

    /// `ListImportJobs`: newest first.
    pub async fn list_import_jobs(
        &self,
        caller: &Caller,
        r: ListImportJobsRequest,
    ) -> Result<ListImportJobsResponse, Error> {
        let size = page_size(r.page_size)?;
        let entity = caller.entity_or_acting("entity_id", &r.entity_id)?;
        let mut v = Violations::new();
        let kind = match RecordKind::try_from(r.record_kind) {
            Ok(RecordKind::Unspecified) => 0i16,
            Ok(RecordKind::Affiliation) | Err(_) => {
                v.add("record_kind", "seuls ORGANIZATION, CONTACT, MEMBERSHIP et INTERACTION s'importent");
                0
            }
            Ok(kind) => kind as i16,
        };
        let mut states = Vec::new();
        for (i, s) in r.states.iter().enumerate() {
            match ImportJobState::try_from(*s) {
                Ok(ImportJobState::Unspecified) | Err(_) => v.add(format!("states[{i}]"), "état inconnu"),
                Ok(s) => states.push(s as i16),
            }
        }
        v.into_result()?;
        states.sort_unstable();
        states.dedup();
        let key = r.import_key.trim().to_owned();
        let fingerprint = format!("{entity}|{}|{kind}|{key}|{states:?}", r.include_descendants);
        let after = PageToken::<(String, Uuid)>::decode(&r.page_token, &fingerprint)?.map(|t| t.after);
        let scope = self.list_scope(caller, "crm.import_jobs.read", entity, r.include_descendants).await?;
        let entities = scope_ids(&scope, entity);
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM import_jobs j
              WHERE j.entity_id = ANY($1) AND ($2 = 0 OR j.record_kind = $2) AND ($3 = '' OR j.import_key = $3)
                AND (cardinality($4::smallint[]) = 0 OR j.state = ANY($4))
                AND ($5::text IS NULL OR (j.create_time, j.id) < ($5::timestamptz, $6::uuid))
              ORDER BY j.create_time DESC, j.id DESC LIMIT {}",
            size + 1
        );
        let mut rows: Vec<JobRow> = self
            .db
            .transaction(&scope, move |conn| {
                Box::pin(async move {
                    diesel::sql_query(sql)
                        .bind::<Array<SqlUuid>, _>(entities)
                        .bind::<SmallInt, _>(kind)
                        .bind::<Text, _>(key)
                        .bind::<Array<SmallInt>, _>(states)
                        .bind::<Nullable<Text>, _>(after.as_ref().map(|a| a.0.clone()))
                        .bind::<Nullable<SqlUuid>, _>(after.as_ref().map(|a| a.1))
                        .load(conn)
                        .await
                        .map_err(DbError::from)
                })
            })
            .await?;
        let next_page_token = if rows.len() > size {
            rows.truncate(size);
            let last = rows.last().expect("a full page");
            PageToken::encode(
                (last.create_time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true), last.id),
                &fingerprint,
            )
        } else {
            String::new()
        };
        Ok(ListImportJobsResponse { import_jobs: rows.iter().map(JobRow::to_proto).collect(), next_page_token })
    }

    /// `ListImportJobRows`: in file order.
    pub async fn list_import_job_rows(
        &self,
        caller: &Caller,
        r: ListImportJobRowsRequest,
    ) -> Result<ListImportJobRowsResponse, Error> {
        let id = parse_id("import_job_id", &r.import_job_id)?;
        let size = page_size(r.page_size)?;
        let mut v = Violations::new();
        let mut outcomes = Vec::new();
        for (i, o) in r.outcomes.iter().enumerate() {
            match ImportRowOutcome::try_from(*o) {
                Ok(ImportRowOutcome::Unspecified) | Err(_) => v.add(format!("outcomes[{i}]"), "résultat inconnu"),
                Ok(o) => outcomes.push(o as i16),
            }
        }
        v.into_result()?;
        outcomes.sort_unstable();
        outcomes.dedup();
        let fingerprint = format!("{id}|{outcomes:?}");
        let after = PageToken::<i64>::decode(&r.page_token, &fingerprint)?.map(|t| t.after);
        let scope = self.scope(caller, "crm.import_jobs.read").await?;
        let sql = format!(
            "SELECT row_number, outcome, record_id, violations, duplicates FROM import_rows
              WHERE import_job_id = $1 AND (cardinality($2::smallint[]) = 0 OR outcome = ANY($2))
                AND ($3::bigint IS NULL OR row_number > $3)
              ORDER BY row_number LIMIT {}",
            size + 1
        );
        let rows = self
            .db
            .transaction(&scope, move |conn| {
                Box::pin(async move {
                    if load_job(conn, id).await?.is_none() {
                        return Ok(None);
                    }
                    let rows: Vec<ReportRow> = diesel::sql_query(sql)
                        .bind::<SqlUuid, _>(id)
                        .bind::<Array<SmallInt>, _>(outcomes)
                        .bind::<Nullable<BigInt>, _>(after)
                        .load(conn)
                        .await
                        .map_err(DbError::from)?;
                    Ok::<_, Error>(Some(rows))
                })
            })
            .await?;
        let Some(mut rows) = rows else {
            return Err(self.not_found(caller, "import_jobs", id, "crm.import_jobs.read", "import job").await);
        };
        let next_page_token = if rows.len() > size {
            rows.truncate(size);
            PageToken::encode(rows.last().expect("a full page").row_number, &fingerprint)
        } else {
            String::new()
        };
        Ok(ListImportJobRowsResponse { rows: rows.iter().map(ReportRow::to_proto).collect(), next_page_token })
    }
}

#[derive(QueryableByName)]
struct ReportRow {
    #[diesel(sql_type = BigInt)]
    row_number: i64,
    #[diesel(sql_type = SmallInt)]
    outcome: i16,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    record_id: Option<Uuid>,
    #[diesel(sql_type = Jsonb)]
    violations: serde_json::Value,
    #[diesel(sql_type = Jsonb)]
    duplicates: serde_json::Value,
}

impl ReportRow {
    fn to_proto(&self) -> ImportRowResult {
        let violations: Vec<StoredViolation> = serde_json::from_value(self.violations.clone()).unwrap_or_default();
        let duplicates: Vec<StoredCandidate> = serde_json::from_value(self.duplicates.clone()).unwrap_or_default();
        ImportRowResult {
            row_number: self.row_number,
            outcome: i32::from(self.outcome),
            record_id: self.record_id.map(|id| id.to_string()).unwrap_or_default(),
            violations: violations
                .into_iter()
                .map(|v| FieldViolation { field: v.field, reason: v.reason, description: v.description })
                .collect(),
            duplicates: duplicates.iter().map(StoredCandidate::to_proto).collect(),
        }
    }
}

/// The gRPC adapter of the job reports.
#[tonic::async_trait]
impl ImportJobService for Crm {
    async fn get_import_job(
        &self,
        request: Request<GetImportJobRequest>,
    ) -> Result<Response<GetImportJobResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        let result = Crm::get_import_job(self, &caller, &request.get_ref().import_job_id).await;
        reply(result.map(|j| GetImportJobResponse { import_job: Some(j) }), request_id)
    }

    async fn list_import_jobs(
        &self,
        request: Request<ListImportJobsRequest>,
    ) -> Result<Response<ListImportJobsResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        reply(Crm::list_import_jobs(self, &caller, request.into_inner()).await, request_id)
    }

    async fn list_import_job_rows(
        &self,
        request: Request<ListImportJobRowsRequest>,
    ) -> Result<Response<ListImportJobRowsResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        reply(Crm::list_import_job_rows(self, &caller, request.into_inner()).await, request_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_numbered_by_file_line_whatever_the_line_ends() {
        let options = Options {
            entity: Uuid::nil(),
            key: "k".into(),
            mode: ImportMode::BestEffort,
            policy: DuplicatePolicy::Reject,
            dry_run: false,
            encoding: TextEncoding::Unspecified,
            delimiter: String::new(),
            columns: Vec::new(),
            filename: String::new(),
        };
        for text in [
            "legal_name;description\r\nA;x\r\n\r\nB;\"deux\r\nlignes\"\r\nC;z\r\n",
            "legal_name;description\nA;x\n\nB;\"deux\nlignes\"\nC;z",
            "\u{feff}legal_name;description\nA;x\n;\nB;\"deux\nlignes\"\nC;z\n",
        ] {
            let parsed = parse(Kind::Organizations, &options, text.as_bytes()).unwrap();
            let numbers: Vec<i64> = parsed.rows.iter().map(|r| r.number).collect();
            assert_eq!(numbers, [2, 4, 6], "{text:?}");
            assert_eq!(
                parsed.rows[1].cells[ORGANIZATION_COLUMNS.iter().position(|c| c.name == "description").unwrap()],
                "deux\nlignes".replace('\n', if text.contains('\r') { "\r\n" } else { "\n" })
            );
        }
    }

    #[test]
    fn the_columns_option_names_headerless_files_or_overrides_the_header() {
        let options = |columns: &[&str]| Options {
            entity: Uuid::nil(),
            key: "k".into(),
            mode: ImportMode::BestEffort,
            policy: DuplicatePolicy::Reject,
            dry_run: false,
            encoding: TextEncoding::Unspecified,
            delimiter: String::new(),
            columns: columns.iter().map(|c| (*c).to_owned()).collect(),
            filename: String::new(),
        };
        let name = |p: &Parsed, row: usize| p.rows[row].cells[1].clone();
        // No header: every row is data; an empty name skips a column.
        let parsed =
            parse(Kind::Organizations, &options(&["legal_name", "", "naf_code"]), b"Alpha;x;10.71C\nBeta;y;\n")
                .unwrap();
        assert_eq!((parsed.rows.len(), name(&parsed, 0), parsed.rows[0].number), (2, "Alpha".to_owned(), 1));
        assert!(parsed.rows[0].problems.is_empty(), "{:?}", parsed.rows[0].problems);
        // A header of known names is overridden, not read as data.
        let parsed = parse(Kind::Organizations, &options(&["legal_name", "siren"]), b"Nom;Code\nGamma;\n").unwrap();
        assert_eq!(parsed.rows.len(), 2, "Nom;Code is not a header of known columns");
        let parsed =
            parse(Kind::Organizations, &options(&["legal_name", "siren"]), b"Raison sociale;SIREN\nGamma;\n").unwrap();
        assert_eq!((parsed.rows.len(), name(&parsed, 0)), (1, "Gamma".to_owned()));
        assert_eq!(parsed.headers[1], "legal_name", "violations name the overriding columns");
        // File-level errors.
        let error = |text: &[u8]| parse(Kind::Organizations, &options(&[]), text).err().unwrap();
        assert!(error(b"").contains("vide"));
        assert!(error(b"siret\n1\n").contains("legal_name"));
        assert!(error(b"legal_name;siret;SIRET\n").contains("en double"));
    }

    #[test]
    fn delimiters_are_detected_from_the_header_outside_quotes() {
        assert_eq!(detect_delimiter("a;b;c\n1,2;3"), b';');
        assert_eq!(detect_delimiter("a,b,c\n"), b',');
        assert_eq!(detect_delimiter("a\tb\n"), b'\t');
        assert_eq!(detect_delimiter("\"x;y;z\",b,c\n"), b',');
        assert_eq!(detect_delimiter("seule"), b';');
    }

    #[test]
    fn encodings_decode_and_a_utf8_mark_wins() {
        assert_eq!(decode(b"Soci\xe9t\xe9 \x80", TextEncoding::Windows1252).unwrap(), "Société €");
        assert_eq!(decode(b"Soci\xe9t\xe9", TextEncoding::Iso88591).unwrap(), "Société");
        assert_eq!(decode("\u{feff}Société".as_bytes(), TextEncoding::Windows1252).unwrap(), "Société");
        assert!(decode(b"Soci\xe9t\xe9", TextEncoding::Unspecified).unwrap_err().contains("UTF-8"));
    }

    #[test]
    fn cells_parse_enums_refs_and_consents() {
        assert_eq!(headcount("11"), Some(HeadcountBand::From10To19 as i32));
        assert_eq!(headcount("1"), Some(HeadcountBand::From1To2 as i32));
        assert_eq!(headcount("from_10_to_19"), Some(HeadcountBand::From10To19 as i32));
        assert_eq!(headcount("99"), None);
        assert_eq!(civility("Mme"), Some(Civility::Madame as i32));
        assert_eq!(civility("M."), Some(Civility::Monsieur as i32));
        assert_eq!(address_kind("Siège social"), Some(AddressKind::HeadOffice as i32));
        assert_eq!(role("primary_contact"), Some(AffiliationRole::PrimaryContact as i32));
        let refs = refs("dolibarr=12, sage=a\\,b").unwrap();
        assert_eq!(refs["sage"], "a,b");
        assert!(super::refs("pas de signe égal").is_none());
        let c = consent("newsletter:email:non").unwrap();
        assert_eq!((c.topic, c.channel, c.granted), (1, 1, false));
        assert!(consent("newsletter").is_none());
    }

    #[test]
    fn membership_cells_parse_french_dates_amounts_and_statuses() {
        assert_eq!(date_cell("01/02/2025"), "2025-02-01");
        assert_eq!(date_cell("1/2/2025"), "2025-02-01");
        assert_eq!(date_cell("2025-02-01"), "2025-02-01");
        assert_eq!(date_cell("32/13/2025"), "2025-13-32", "left for validation to refuse");
        assert_eq!(amount_cents("150"), Some(15_000));
        assert_eq!(amount_cents("150,5"), Some(15_050));
        assert_eq!(amount_cents("1 250,50 €"), Some(125_050));
        assert_eq!(amount_cents("1\u{202f}250.05"), Some(125_005));
        assert_eq!(amount_cents("EUR 30"), Some(3_000));
        assert_eq!(amount_cents(",50"), Some(50));
        assert_eq!(amount_cents("-5"), Some(-500));
        for unreadable in ["douze", "1,250", "", "€", "1,2,3", "12345678901234"] {
            assert_eq!(amount_cents(unreadable), None, "{unreadable}");
        }
        assert_eq!(payment_status("paid"), Some(PaymentStatus::Paid as i32));
        assert_eq!(payment_status("PAYMENT_STATUS_WAIVED"), Some(PaymentStatus::Waived as i32));
        assert_eq!(payment_status("Partiellement payée"), Some(PaymentStatus::PartiallyPaid as i32));
        assert_eq!(payment_status("Exonéré"), Some(PaymentStatus::Waived as i32));
        assert_eq!(payment_status("payée à moitié"), None);
    }

    #[test]
    fn interaction_cells_parse_paris_times_durations_and_french_kinds() {
        let utc = |text: &str| time_cell(text).map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
        assert_eq!(utc("2025-03-14T09:30:00.000000Z").as_deref(), Some("2025-03-14T09:30:00Z"));
        assert_eq!(utc("2025-03-14T10:30:00+01:00").as_deref(), Some("2025-03-14T09:30:00Z"));
        assert_eq!(utc("14/03/2025 10:30").as_deref(), Some("2025-03-14T09:30:00Z"), "winter: UTC+1");
        assert_eq!(utc("2025-07-02 15:00:30").as_deref(), Some("2025-07-02T13:00:30Z"), "summer: UTC+2");
        assert_eq!(utc("2025-03-30 01:59").as_deref(), Some("2025-03-30T00:59:00Z"), "before the change");
        assert_eq!(utc("2025-03-30 03:00").as_deref(), Some("2025-03-30T01:00:00Z"), "after the change");
        assert_eq!(utc("2025-10-26 04:00").as_deref(), Some("2025-10-26T03:00:00Z"), "winter again");
        assert_eq!(utc("2025-05-01").as_deref(), Some("2025-04-30T22:00:00Z"), "a date alone: midnight in Paris");
        assert_eq!(utc("31/02/2025"), None);
        assert_eq!(utc("demain"), None);
        let seconds = |text: &str| duration_cell(text).map(|d| d.seconds);
        assert_eq!(
            (seconds("0:15:00"), seconds("1:30"), seconds("45"), seconds("90 min")),
            (Some(900), Some(5400), Some(2700), Some(5400))
        );
        assert_eq!((seconds("1:75"), seconds("deux heures"), seconds("-5")), (None, None, None));
        assert_eq!(interaction_kind("Réunion"), Some(InteractionKind::Meeting as i32));
        assert_eq!(interaction_kind("event_attendance"), Some(InteractionKind::EventAttendance as i32));
        assert_eq!(interaction_kind("E-mail"), Some(InteractionKind::Email as i32));
        assert_eq!(direction("sortant"), Some(InteractionDirection::Outbound as i32));
        assert_eq!(interaction_column("contact_ids[1]", "organization_siret", "contact_emails"), "contact_emails");
    }

    #[test]
    fn references_name_the_one_active_organisation() {
        let named = |id: u128, siren: &str, state: OrganizationState| Named {
            id: Uuid::from_u128(id),
            siret: None,
            siren: Some(siren.to_owned()),
            state: state as i16,
            refs: Vec::new(),
        };
        let siren = |s: &str| OrgRef::Siren(s.to_owned());
        let all = [
            named(1, "111", OrganizationState::Active),
            named(2, "222", OrganizationState::Merged),
            named(3, "222", OrganizationState::Active),
            named(4, "333", OrganizationState::Active),
            named(5, "333", OrganizationState::Active),
            named(6, "444", OrganizationState::Merged),
        ];
        let reason = |r: Result<Uuid, Problem>| r.map_err(|p| p.reason);
        assert_eq!(reason(resolve(&siren("111"), &all)), Ok(Uuid::from_u128(1)));
        assert_eq!(reason(resolve(&siren("222"), &all)), Ok(Uuid::from_u128(3)));
        assert_eq!(reason(resolve(&siren("333"), &all)), Err("ambiguous_organization".to_owned()));
        assert_eq!(reason(resolve(&siren("444"), &all)), Err("merged_organization".to_owned()));
        assert_eq!(reason(resolve(&siren("555"), &all)), Err("unknown_organization".to_owned()));
        assert_eq!(
            membership_column("organization_id", "organization_siren", "membership_type_code"),
            "organization_siren"
        );
        assert_eq!(membership_column("dues_amount.amount_cents", "", ""), "dues_amount");
    }

    #[test]
    fn field_paths_map_to_columns() {
        assert_eq!(organization_column("addresses[0].address.postal_code"), "address_postal_code");
        assert_eq!(organization_column("addresses[0].kind"), "address_kind");
        assert_eq!(organization_column("tags[2]"), "tags");
        assert_eq!(organization_column("siret"), "siret");
        assert_eq!(contact_column("emails[0].address", true, true), "email");
        assert_eq!(contact_column("emails[1].address", true, true), "other_emails");
        assert_eq!(contact_column("emails[0].address", false, true), "other_emails");
        assert_eq!(contact_column("address.postal_code", true, true), "address_postal_code");
    }
}

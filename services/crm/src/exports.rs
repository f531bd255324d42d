//! CSV and JSON Lines exports of organisations, contacts, memberships and
//! interactions (`ExportOrganizations`, `ExportContacts`,
//! `ExportMemberships`, `ExportInteractions`), and the CSV columns that
//! imports read back ([`ORGANIZATION_COLUMNS`], [`CONTACT_COLUMNS`],
//! [`MEMBERSHIP_COLUMNS`], [`INTERACTION_COLUMNS`]).
//!
//! An export is streamed: pages of [`PAGE`] records are read with a keyset
//! cursor on the id (UUIDv7, so creation order), each page in its own
//! short transaction with the caller's scope, written out and sent as
//! chunks of about [`CHUNK`] bytes; the whole table is never in memory. The
//! filters are those of the lists (`organizations::where_sql`,
//! `contacts::where_sql`, `memberships::WHERE_SQL`,
//! `interactions::where_sql`), within the part of the entity's subtree
//! where the caller holds the export permission.
//! Memberships are read with the entity's ancestors set, as their list
//! does, so that the types those offer show their code and name.
//!
//! CSV (RFC 4180, CRLF line ends): `;` by default, UTF-8 with a byte order
//! mark by default (so that French spreadsheets open it directly; an
//! explicit `TEXT_ENCODING_UTF8` writes no mark), or Windows-1252 /
//! ISO-8859-1 (characters those cannot hold become `?`). The header row
//! holds the column names below, or their French labels when the columns
//! were requested by label. Cell formats:
//! - lists (`tags`, `other_emails`, `other_phones`, `affiliation_roles`,
//!   `consents`, `external_refs`, `contact_ids`, `contact_emails`,
//!   `participant_user_ids`) are comma-separated inside the cell;
//! - `external_refs`: `system=value` pairs (`,` and `\` in values escaped
//!   with `\`);
//! - `headcount_band`: the INSEE code (`00`, `01` … `53`);
//! - `address_kind`, `affiliation_roles`, `membership_status`, `status`,
//!   `payment_status`, `kind`, `direction`: the enum value's name without
//!   its prefix, in lower case (`head_office`, `primary_contact`, `active`,
//!   `partially_paid`, `event_attendance`, `outbound`);
//! - `civility`: `Madame` or `Monsieur`;
//! - `consents`: `topic:channel` when granted, `topic:channel:non` when
//!   withdrawn (`newsletter:email`, `events:sms:non`);
//! - amounts (`dues_amount`, `amount_paid`): euros with a decimal comma and
//!   two decimals, no thousands separator (`1500,00`);
//! - `duration`: `H:MM:SS` (`0:45:00`, `36:00:00`);
//! - dates: `YYYY-MM-DD`; times: RFC 3339 in UTC.
//!
//! Organisations export their primary address; contacts their primary
//! e-mail and phone (`email`, `phone`), the others in `other_emails` and
//! `other_phones`, and their first current affiliation (by organisation
//! name: `organization_*` and `affiliation_*` columns); memberships their
//! organisation's id, SIRET and SIREN and their type's id and code;
//! interactions their organisation's id and SIRET, their contacts' ids and
//! primary e-mail addresses (a contact without one adds no address), and
//! their author. JSON Lines carries every field of every record (proto3
//! JSON, defaults included).
//!
//! Columns marked output-only are written by exports and ignored by
//! imports, so that an export re-imports as is.

use diesel::{
    QueryableByName,
    pg::Pg,
    sql_types::{Array, Nullable, SmallInt, Text, Uuid as SqlUuid},
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use prost::Message;
use prost_reflect::{DynamicMessage, SerializeOptions};
use socle_db::{Database, DbError, EntityScope};
use socle_errors::Error;
use socle_proto::socle::{crm::v1::*, r#type::v1::Money};
use tonic::Status;
use uuid::Uuid;

use crate::{
    ancestry::set_ancestors,
    common::{Caller, Crm, TODAY_SQL},
    contacts::{self, ContactRow},
    interactions::{self, InteractionRow},
    memberships::{self, Boxed, MembershipRow, Memberships},
    organizations::{self, OrganizationRow, scope_ids},
};

/// Records read per query.
pub const PAGE: usize = 1000;

/// Approximate size of a streamed chunk, in bytes.
pub const CHUNK: usize = 64 * 1024;

/// A CSV column: its stable name, its French label, and whether imports
/// read it (output-only columns are written by exports only).
#[derive(Debug, Clone, Copy)]
pub struct Column {
    /// The stable name, e.g. `legal_name`.
    pub name: &'static str,
    /// The French label, e.g. `Raison sociale`.
    pub label: &'static str,
    /// False for output-only columns (ignored by imports).
    pub input: bool,
}

const fn col(name: &'static str, label: &'static str) -> Column {
    Column { name, label, input: true }
}

const fn out(name: &'static str, label: &'static str) -> Column {
    Column { name, label, input: false }
}

/// The CSV columns of organisations, in export order.
pub const ORGANIZATION_COLUMNS: &[Column] = &[
    out("id", "Identifiant"),
    col("legal_name", "Raison sociale"),
    col("trade_name", "Nom commercial"),
    col("siren", "SIREN"),
    col("siret", "SIRET"),
    col("naf_code", "Code NAF"),
    col("legal_form_code", "Catégorie juridique"),
    col("headcount_band", "Tranche d'effectif"),
    col("address_kind", "Type d'adresse"),
    col("address_street_line", "Adresse"),
    col("address_complement", "Complément d'adresse"),
    col("address_postal_code", "Code postal"),
    col("address_city", "Ville"),
    col("address_country_code", "Pays"),
    col("website", "Site web"),
    col("email", "E-mail"),
    col("phone", "Téléphone"),
    col("tags", "Étiquettes"),
    col("description", "Description"),
    col("external_refs", "Références externes"),
    out("membership_status", "Statut d'adhésion"),
    out("member_since_date", "Adhérent depuis"),
    out("create_time", "Créé le"),
    out("update_time", "Modifié le"),
];

/// The CSV columns of contacts, in export order.
pub const CONTACT_COLUMNS: &[Column] = &[
    out("id", "Identifiant"),
    col("civility", "Civilité"),
    col("given_name", "Prénom"),
    col("family_name", "Nom"),
    col("job_title", "Fonction"),
    col("email", "E-mail"),
    col("other_emails", "Autres e-mails"),
    col("phone", "Téléphone"),
    col("other_phones", "Autres téléphones"),
    col("address_street_line", "Adresse"),
    col("address_complement", "Complément d'adresse"),
    col("address_postal_code", "Code postal"),
    col("address_city", "Ville"),
    col("address_country_code", "Pays"),
    col("consents", "Consentements"),
    col("tags", "Étiquettes"),
    col("external_refs", "Références externes"),
    col("organization_id", "Identifiant de l'organisation"),
    col("organization_siret", "SIRET de l'organisation"),
    col("organization_external_ref", "Référence externe de l'organisation"),
    out("organization_legal_name", "Organisation"),
    col("affiliation_roles", "Rôles dans l'organisation"),
    col("affiliation_job_title", "Fonction dans l'organisation"),
    out("membership_status", "Statut d'adhésion"),
    out("create_time", "Créé le"),
    out("update_time", "Modifié le"),
];

/// The CSV columns of memberships, in export order.
pub const MEMBERSHIP_COLUMNS: &[Column] = &[
    out("id", "Identifiant"),
    col("organization_id", "Identifiant de l'organisation"),
    col("organization_siret", "SIRET de l'organisation"),
    col("organization_siren", "SIREN de l'organisation"),
    col("organization_external_ref", "Référence externe de l'organisation"),
    out("organization_legal_name", "Organisation"),
    col("membership_type_id", "Identifiant du type d'adhésion"),
    col("membership_type_code", "Code du type d'adhésion"),
    out("membership_type_display_name", "Type d'adhésion"),
    col("start_date", "Date de début"),
    col("end_date", "Date de fin"),
    col("dues_amount", "Cotisation"),
    col("amount_paid", "Montant reçu"),
    col("payment_status", "Statut de paiement"),
    col("payment_date", "Date de paiement"),
    col("payment_reference", "Référence de paiement"),
    col("notes", "Notes"),
    out("status", "Statut d'adhésion"),
    out("grace_end_date", "Fin du délai de grâce"),
    out("previous_membership_id", "Adhésion précédente"),
    out("next_membership_id", "Adhésion suivante"),
    out("cancel_date", "Date de résiliation"),
    out("cancel_reason", "Motif de résiliation"),
    out("create_time", "Créé le"),
    out("update_time", "Modifié le"),
];

/// The CSV columns of interactions, in export order.
pub const INTERACTION_COLUMNS: &[Column] = &[
    out("id", "Identifiant"),
    col("kind", "Type"),
    col("occur_time", "Date"),
    col("subject", "Objet"),
    col("body", "Détails"),
    col("duration", "Durée"),
    col("direction", "Sens"),
    col("organization_id", "Identifiant de l'organisation"),
    col("organization_siret", "SIRET de l'organisation"),
    col("organization_external_ref", "Référence externe de l'organisation"),
    out("organization_legal_name", "Organisation"),
    col("contact_ids", "Identifiants des contacts"),
    col("contact_emails", "E-mails des contacts"),
    col("event_name", "Événement"),
    col("location", "Lieu"),
    col("participant_user_ids", "Participants"),
    col("tags", "Étiquettes"),
    out("author_id", "Auteur"),
    out("create_time", "Créé le"),
    out("update_time", "Modifié le"),
];

/// Common spellings of column names in files made by hand, by folded key.
const ALIASES: &[(&str, &str)] = &[
    ("nom", "family_name"),
    ("nomdefamille", "family_name"),
    ("courriel", "email"),
    ("mail", "email"),
    ("adressemail", "email"),
    ("adresseemail", "email"),
    ("tel", "phone"),
    ("telephonefixe", "phone"),
    ("cp", "address_postal_code"),
    ("commune", "address_city"),
    ("codeape", "naf_code"),
    ("ape", "naf_code"),
    ("tags", "tags"),
    ("titre", "civility"),
];

/// A comparison key: folded (accents, case) and reduced to letters and
/// digits, so that `E-mail`, `e_mail` and `EMAIL` meet.
pub fn key(text: &str) -> String {
    crate::validate::fold(text.trim()).chars().filter(char::is_ascii_alphanumeric).collect()
}

/// The column of `columns` named `text` (by name, French label or a common
/// alias), and whether it was named by its label.
pub fn find_column(columns: &[Column], text: &str) -> Option<(usize, bool)> {
    let k = key(text);
    if k.is_empty() {
        return None;
    }
    if let Some(i) = columns.iter().position(|c| key(c.name) == k) {
        return Some((i, false));
    }
    if let Some(i) = columns.iter().position(|c| key(c.label) == k) {
        return Some((i, true));
    }
    let alias = ALIASES.iter().find(|(a, _)| *a == k)?.1;
    columns.iter().position(|c| c.name == alias).map(|i| (i, true))
}

// ---------------------------------------------------------------------------
// Cell formats, shared with imports
// ---------------------------------------------------------------------------

/// INSEE codes of the headcount bands.
pub const HEADCOUNT_CODES: &[(HeadcountBand, &str)] = &[
    (HeadcountBand::None, "00"),
    (HeadcountBand::From1To2, "01"),
    (HeadcountBand::From3To5, "02"),
    (HeadcountBand::From6To9, "03"),
    (HeadcountBand::From10To19, "11"),
    (HeadcountBand::From20To49, "12"),
    (HeadcountBand::From50To99, "21"),
    (HeadcountBand::From100To199, "22"),
    (HeadcountBand::From200To249, "31"),
    (HeadcountBand::From250To499, "32"),
    (HeadcountBand::From500To999, "41"),
    (HeadcountBand::From1000To1999, "42"),
    (HeadcountBand::From2000To4999, "51"),
    (HeadcountBand::From5000To9999, "52"),
    (HeadcountBand::From10000, "53"),
];

/// An enum value's name without `prefix`, in lower case
/// (`ADDRESS_KIND_HEAD_OFFICE` → `head_office`); empty for unspecified.
pub fn short_name(full: &str, prefix: &str) -> String {
    let short = full.strip_prefix(prefix).unwrap_or(full);
    if short == "UNSPECIFIED" { String::new() } else { short.to_ascii_lowercase() }
}

/// Joins list items into one cell.
pub fn join_list<S: AsRef<str>>(items: &[S]) -> String {
    items.iter().map(AsRef::as_ref).filter(|s| !s.is_empty()).collect::<Vec<_>>().join(", ")
}

/// The `external_refs` cell: `system=value` pairs, sorted by system.
pub fn format_refs(refs: &std::collections::HashMap<String, String>) -> String {
    let mut pairs: Vec<_> = refs.iter().collect();
    pairs.sort();
    pairs
        .into_iter()
        .map(|(k, v)| format!("{k}={}", v.replace('\\', "\\\\").replace(',', "\\,")))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The `consents` cell.
pub fn format_consents(consents: &[CommunicationConsent]) -> String {
    consents
        .iter()
        .map(|c| {
            let topic = short_name(ConsentTopic::try_from(c.topic).unwrap_or_default().as_str_name(), "CONSENT_TOPIC_");
            let channel =
                short_name(ConsentChannel::try_from(c.channel).unwrap_or_default().as_str_name(), "CONSENT_CHANNEL_");
            if c.granted { format!("{topic}:{channel}") } else { format!("{topic}:{channel}:non") }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn time(t: &Option<prost_types::Timestamp>) -> String {
    t.as_ref()
        .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
        .unwrap_or_default()
}

fn membership(status: i32) -> String {
    short_name(MembershipStatus::try_from(status).unwrap_or_default().as_str_name(), "MEMBERSHIP_STATUS_")
}

/// The cells of an organisation, one per [`ORGANIZATION_COLUMNS`] entry.
pub fn organization_cells(o: &Organization) -> Vec<String> {
    let primary = o.addresses.iter().find(|a| a.primary).or(<[OrganizationAddress]>::first(&o.addresses));
    let postal = primary.and_then(|a| a.address.clone()).unwrap_or_default();
    let kind = primary
        .map(|a| short_name(AddressKind::try_from(a.kind).unwrap_or_default().as_str_name(), "ADDRESS_KIND_"))
        .unwrap_or_default();
    let band = HEADCOUNT_CODES.iter().find(|(b, _)| *b as i32 == o.headcount_band).map(|(_, c)| *c).unwrap_or("");
    ORGANIZATION_COLUMNS
        .iter()
        .map(|c| match c.name {
            "id" => o.id.clone(),
            "legal_name" => o.legal_name.clone(),
            "trade_name" => o.trade_name.clone(),
            "siren" => o.siren.clone(),
            "siret" => o.siret.clone(),
            "naf_code" => o.naf_code.clone(),
            "legal_form_code" => o.legal_form_code.clone(),
            "headcount_band" => band.to_owned(),
            "address_kind" => kind.clone(),
            "address_street_line" => postal.street_line.clone(),
            "address_complement" => postal.complement.clone(),
            "address_postal_code" => postal.postal_code.clone(),
            "address_city" => postal.city.clone(),
            "address_country_code" => {
                if primary.is_some() {
                    postal.country_code.clone()
                } else {
                    String::new()
                }
            }
            "website" => o.website.clone(),
            "email" => o.email.clone(),
            "phone" => o.phone.clone(),
            "tags" => join_list(&o.tags),
            "description" => o.description.clone(),
            "external_refs" => format_refs(&o.external_refs),
            "membership_status" => membership(o.membership_status),
            "member_since_date" => o.member_since_date.clone(),
            "create_time" => time(&o.create_time),
            "update_time" => time(&o.update_time),
            _ => String::new(),
        })
        .collect()
}

/// The current affiliation a contact's CSV row shows.
#[derive(Debug, Clone, Default, QueryableByName)]
pub struct LinkRow {
    #[diesel(sql_type = SqlUuid)]
    contact_id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    organization_id: Uuid,
    #[diesel(sql_type = Text)]
    legal_name: String,
    #[diesel(sql_type = Nullable<Text>)]
    siret: Option<String>,
    #[diesel(sql_type = Array<SmallInt>)]
    roles: Vec<i16>,
    #[diesel(sql_type = Text)]
    job_title: String,
}

/// The cells of a contact, one per [`CONTACT_COLUMNS`] entry.
pub fn contact_cells(c: &Contact, link: Option<&LinkRow>) -> Vec<String> {
    let mut emails: Vec<&ContactEmail> = c.emails.iter().collect();
    emails.sort_by_key(|e| !e.primary);
    let mut phones: Vec<&ContactPhone> = c.phones.iter().collect();
    phones.sort_by_key(|p| !p.primary);
    let address = c.address.clone().unwrap_or_default();
    CONTACT_COLUMNS
        .iter()
        .map(|col| match col.name {
            "id" => c.id.clone(),
            "civility" => match Civility::try_from(c.civility) {
                Ok(Civility::Madame) => "Madame".to_owned(),
                Ok(Civility::Monsieur) => "Monsieur".to_owned(),
                _ => String::new(),
            },
            "given_name" => c.given_name.clone(),
            "family_name" => c.family_name.clone(),
            "job_title" => c.job_title.clone(),
            "email" => <[&ContactEmail]>::first(&emails).map(|e| e.address.clone()).unwrap_or_default(),
            "other_emails" => join_list(&emails.iter().skip(1).map(|e| e.address.clone()).collect::<Vec<_>>()),
            "phone" => <[&ContactPhone]>::first(&phones).map(|p| p.number.clone()).unwrap_or_default(),
            "other_phones" => join_list(&phones.iter().skip(1).map(|p| p.number.clone()).collect::<Vec<_>>()),
            "address_street_line" => address.street_line.clone(),
            "address_complement" => address.complement.clone(),
            "address_postal_code" => address.postal_code.clone(),
            "address_city" => address.city.clone(),
            "address_country_code" => address.country_code.clone(),
            "consents" => format_consents(&c.consents),
            "tags" => join_list(&c.tags),
            "external_refs" => format_refs(&c.external_refs),
            "organization_id" => link.map(|l| l.organization_id.to_string()).unwrap_or_default(),
            "organization_siret" => link.and_then(|l| l.siret.clone()).unwrap_or_default(),
            "organization_external_ref" => String::new(),
            "organization_legal_name" => link.map(|l| l.legal_name.clone()).unwrap_or_default(),
            "affiliation_roles" => link
                .map(|l| {
                    let names: Vec<String> = l
                        .roles
                        .iter()
                        .map(|r| {
                            short_name(
                                AffiliationRole::try_from(i32::from(*r)).unwrap_or_default().as_str_name(),
                                "AFFILIATION_ROLE_",
                            )
                        })
                        .collect();
                    join_list(&names)
                })
                .unwrap_or_default(),
            "affiliation_job_title" => link.map(|l| l.job_title.clone()).unwrap_or_default(),
            "membership_status" => membership(c.membership_status),
            "create_time" => time(&c.create_time),
            "update_time" => time(&c.update_time),
            _ => String::new(),
        })
        .collect()
}

/// Euros from cents, with a decimal comma and no thousands separator
/// (`1500,00`), as French spreadsheets read them.
pub fn format_amount(cents: i64) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    format!("{sign}{},{:02}", cents.unsigned_abs() / 100, cents.unsigned_abs() % 100)
}

/// What a membership's CSV row shows besides the record: its
/// organisation's identifiers and its type's code.
#[derive(Debug, Clone, Default)]
pub struct MembershipRefs {
    /// The organisation's SIRET, if known.
    pub organization_siret: String,
    /// The organisation's SIREN, if known.
    pub organization_siren: String,
    /// The membership type's code.
    pub membership_type_code: String,
}

/// The cells of a membership, one per [`MEMBERSHIP_COLUMNS`] entry.
pub fn membership_cells(m: &Membership, refs: &MembershipRefs) -> Vec<String> {
    let amount = |money: &Option<Money>| money.as_ref().map(|m| format_amount(m.amount_cents)).unwrap_or_default();
    MEMBERSHIP_COLUMNS
        .iter()
        .map(|c| match c.name {
            "id" => m.id.clone(),
            "organization_id" => m.organization_id.clone(),
            "organization_siret" => refs.organization_siret.clone(),
            "organization_siren" => refs.organization_siren.clone(),
            "organization_legal_name" => m.organization_legal_name.clone(),
            "membership_type_id" => m.membership_type_id.clone(),
            "membership_type_code" => refs.membership_type_code.clone(),
            "membership_type_display_name" => m.membership_type_display_name.clone(),
            "start_date" => m.start_date.clone(),
            "end_date" => m.end_date.clone(),
            "dues_amount" => amount(&m.dues_amount),
            "amount_paid" => amount(&m.amount_paid),
            "payment_status" => short_name(
                PaymentStatus::try_from(m.payment_status).unwrap_or_default().as_str_name(),
                "PAYMENT_STATUS_",
            ),
            "payment_date" => m.payment_date.clone(),
            "payment_reference" => m.payment_reference.clone(),
            "notes" => m.notes.clone(),
            "status" => membership(m.status),
            "grace_end_date" => m.grace_end_date.clone(),
            "previous_membership_id" => m.previous_membership_id.clone(),
            "next_membership_id" => m.next_membership_id.clone(),
            "cancel_date" => m.cancel_date.clone(),
            "cancel_reason" => m.cancel_reason.clone(),
            "create_time" => time(&m.create_time),
            "update_time" => time(&m.update_time),
            _ => String::new(),
        })
        .collect()
}

/// A duration as `H:MM:SS` (hours not wrapped: `36:00:00`).
pub fn format_duration(d: &prost_types::Duration) -> String {
    let s = d.seconds.max(0);
    format!("{}:{:02}:{:02}", s / 3600, s % 3600 / 60, s % 60)
}

/// An interaction with what its CSV row shows besides the record: its
/// organisation's SIRET and its contacts' primary e-mail addresses, in the
/// order of `contact_ids` (empty for a contact without one).
#[derive(QueryableByName)]
pub struct InteractionLine {
    #[diesel(embed)]
    record: InteractionRow,
    #[diesel(sql_type = Text)]
    organization_siret: String,
    #[diesel(sql_type = Array<Text>)]
    contact_emails: Vec<String>,
}

/// The columns of [`InteractionLine`] besides the row's, over
/// `interactions::FROM`.
const INTERACTION_LINE_COLUMNS: &str = "coalesce(o.siret, '') AS organization_siret,
    coalesce((SELECT array_agg(coalesce((SELECT e->>'address' FROM jsonb_array_elements(c.emails) e
                                          WHERE (e->>'primary')::boolean LIMIT 1), '')
                               ORDER BY ic.ordinal, ic.contact_id)
                FROM interaction_contacts ic JOIN contacts c ON c.id = ic.contact_id
               WHERE ic.interaction_id = i.id), '{}') AS contact_emails";

/// The cells of an interaction, one per [`INTERACTION_COLUMNS`] entry.
pub fn interaction_cells(i: &Interaction, line: &InteractionLine) -> Vec<String> {
    INTERACTION_COLUMNS
        .iter()
        .map(|c| match c.name {
            "id" => i.id.clone(),
            "kind" => {
                short_name(InteractionKind::try_from(i.kind).unwrap_or_default().as_str_name(), "INTERACTION_KIND_")
            }
            "occur_time" => time(&i.occur_time),
            "subject" => i.subject.clone(),
            "body" => i.body.clone(),
            "duration" => i.duration.as_ref().map(format_duration).unwrap_or_default(),
            "direction" => short_name(
                InteractionDirection::try_from(i.direction).unwrap_or_default().as_str_name(),
                "INTERACTION_DIRECTION_",
            ),
            "organization_id" => i.organization_id.clone(),
            "organization_siret" => line.organization_siret.clone(),
            "organization_legal_name" => i.organization_legal_name.clone(),
            "contact_ids" => join_list(&i.contact_ids),
            "contact_emails" => join_list(&line.contact_emails),
            "event_name" => i.event_name.clone(),
            "location" => i.location.clone(),
            "participant_user_ids" => join_list(&i.participant_user_ids),
            "tags" => join_list(&i.tags),
            "author_id" => i.author.as_ref().map(|a| a.id.clone()).unwrap_or_default(),
            "create_time" => time(&i.create_time),
            "update_time" => time(&i.update_time),
            _ => String::new(),
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Writers
// ---------------------------------------------------------------------------

/// How the records are written.
#[derive(Debug, Clone)]
enum Format {
    Csv { columns: Vec<(usize, bool)>, encoding: TextEncoding, bom: bool, delimiter: u8 },
    JsonLines { message: prost_reflect::MessageDescriptor },
}

impl Format {
    /// Validates the format options of an export request.
    fn new(
        catalogue: &'static [Column],
        message: &str,
        format: i32,
        columns: &[String],
        encoding: i32,
        delimiter: &str,
    ) -> Result<Format, Error> {
        let mut v = socle_api::Violations::new();
        let format = ExportFormat::try_from(format).unwrap_or_else(|_| {
            v.add("format", "format inconnu");
            ExportFormat::Unspecified
        });
        let encoding = TextEncoding::try_from(encoding).unwrap_or_else(|_| {
            v.add("encoding", "encodage inconnu");
            TextEncoding::Unspecified
        });
        let delimiter = match delimiter {
            "" | ";" => b';',
            "," => b',',
            "\t" | "\\t" | "tab" => b'\t',
            _ => {
                v.add("delimiter", "séparateur attendu : « ; », « , » ou une tabulation");
                b';'
            }
        };
        let mut chosen = Vec::new();
        for (i, name) in columns.iter().enumerate() {
            match find_column(catalogue, name) {
                Some(found) => chosen.push(found),
                None => v.add(
                    format!("columns[{i}]"),
                    format!(
                        "colonne inconnue « {name} » ; colonnes possibles : {}",
                        catalogue.iter().map(|c| c.name).collect::<Vec<_>>().join(", ")
                    ),
                ),
            }
        }
        v.into_result()?;
        if chosen.is_empty() {
            chosen = (0..catalogue.len()).map(|i| (i, false)).collect();
        }
        Ok(match format {
            ExportFormat::JsonLines => {
                let descriptor = socle_proto::descriptor_pool()
                    .get_message_by_name(message)
                    .ok_or_else(|| Error::internal(format!("{message} is not in the descriptor pool")))?;
                Format::JsonLines { message: descriptor }
            }
            _ => Format::Csv {
                columns: chosen,
                bom: encoding == TextEncoding::Unspecified,
                encoding: if encoding == TextEncoding::Unspecified { TextEncoding::Utf8 } else { encoding },
                delimiter,
            },
        })
    }

    fn content_type(&self) -> &'static str {
        match self {
            Format::JsonLines { .. } => "application/jsonl",
            Format::Csv { encoding: TextEncoding::Windows1252, .. } => "text/csv; charset=windows-1252",
            Format::Csv { encoding: TextEncoding::Iso88591, .. } => "text/csv; charset=iso-8859-1",
            Format::Csv { .. } => "text/csv; charset=utf-8",
        }
    }

    fn extension(&self) -> &'static str {
        match self {
            Format::JsonLines { .. } => "jsonl",
            Format::Csv { .. } => "csv",
        }
    }
}

/// Text in `encoding`: UTF-8 as is; Windows-1252 and ISO-8859-1 with `?`
/// for the characters they cannot hold.
pub fn encode(text: &str, encoding: TextEncoding) -> Vec<u8> {
    match encoding {
        TextEncoding::Iso88591 => text.chars().map(|c| u8::try_from(u32::from(c)).unwrap_or(b'?')).collect(),
        TextEncoding::Windows1252 => {
            let mut encoder = encoding_rs::WINDOWS_1252.new_encoder();
            let mut out = Vec::with_capacity(text.len());
            let mut rest = text;
            loop {
                let mut buffer = [0u8; 4096];
                let (result, read, written) = encoder.encode_from_utf8_without_replacement(rest, &mut buffer, true);
                out.extend_from_slice(&buffer[..written]);
                rest = &rest[read..];
                match result {
                    encoding_rs::EncoderResult::InputEmpty => break,
                    encoding_rs::EncoderResult::OutputFull => {}
                    encoding_rs::EncoderResult::Unmappable(_) => out.push(b'?'),
                }
            }
            out
        }
        _ => text.as_bytes().to_vec(),
    }
}

/// Writes records in a format into a byte buffer.
struct Writer {
    format: Format,
    catalogue: &'static [Column],
    buffer: Vec<u8>,
}

impl Writer {
    fn new(format: Format, catalogue: &'static [Column]) -> Writer {
        Writer { format, catalogue, buffer: Vec::new() }
    }

    /// The byte order mark and the header row (CSV).
    fn start(&mut self) -> Result<(), Error> {
        if let Format::Csv { columns, bom, .. } = &self.format {
            if *bom {
                self.buffer.extend_from_slice(b"\xEF\xBB\xBF");
            }
            let header: Vec<&str> = columns
                .iter()
                .map(|(i, label)| if *label { self.catalogue[*i].label } else { self.catalogue[*i].name })
                .collect();
            self.csv_row(&header)?;
        }
        Ok(())
    }

    fn csv_row<S: AsRef<str>>(&mut self, cells: &[S]) -> Result<(), Error> {
        let Format::Csv { encoding, delimiter, .. } = &self.format else { return Ok(()) };
        let mut csv = csv::WriterBuilder::new()
            .delimiter(*delimiter)
            .terminator(csv::Terminator::CRLF)
            .quote_style(csv::QuoteStyle::Necessary)
            .from_writer(Vec::new());
        csv.write_record(cells.iter().map(|c| c.as_ref())).map_err(|e| Error::internal(e.to_string()))?;
        let bytes = csv.into_inner().map_err(|e| Error::internal(e.to_string()))?;
        let text = String::from_utf8(bytes).map_err(|e| Error::internal(e.to_string()))?;
        self.buffer.extend(encode(&text, *encoding));
        Ok(())
    }

    /// One record: `cells` (CSV) or `message` (JSON Lines).
    fn record<M: Message>(&mut self, message: &M, cells: impl FnOnce() -> Vec<String>) -> Result<(), Error> {
        match &self.format {
            Format::JsonLines { message: descriptor } => {
                let dynamic = DynamicMessage::decode(descriptor.clone(), message.encode_to_vec().as_slice())
                    .map_err(|e| Error::internal(e.to_string()))?;
                let mut serializer = serde_json::Serializer::new(&mut self.buffer);
                dynamic
                    .serialize_with_options(&mut serializer, &SerializeOptions::new().skip_default_fields(false))
                    .map_err(|e| Error::internal(e.to_string()))?;
                self.buffer.push(b'\n');
                Ok(())
            }
            Format::Csv { columns, .. } => {
                let all = cells();
                let chosen: Vec<String> = columns.iter().map(|(i, _)| all[*i].clone()).collect();
                self.csv_row(&chosen)
            }
        }
    }

    fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buffer)
    }
}

// ---------------------------------------------------------------------------
// Streaming
// ---------------------------------------------------------------------------

/// One streamed message: the bytes, and on the first the media type and
/// file name, on the last the record count.
pub struct Piece {
    chunk: Vec<u8>,
    content_type: String,
    filename: String,
    record_count: i64,
}

/// The stream of an export's messages.
pub type Pieces<M> = tonic::codegen::BoxStream<M>;

macro_rules! from_piece {
    ($($t:ty),*) => {$(
        impl From<Piece> for $t {
            fn from(p: Piece) -> Self {
                Self { chunk: p.chunk, content_type: p.content_type, filename: p.filename, record_count: p.record_count }
            }
        }
    )*};
}
from_piece!(ExportOrganizationsResponse, ExportContactsResponse, ExportMembershipsResponse, ExportInteractionsResponse);

/// What is exported.
#[derive(Clone)]
enum Source {
    Organizations(organizations::Filters),
    Contacts(contacts::Filters),
    /// With the ancestors whose offered types the rows may use.
    Memberships(memberships::Filters, Vec<Uuid>),
    Interactions(interactions::Filters),
}

/// One page of records, after `after`, as export records.
async fn page(
    db: &Database,
    scope: &EntityScope,
    source: &Source,
    entities: Vec<Uuid>,
    after: Option<Uuid>,
) -> Result<Vec<(Uuid, Record)>, Error> {
    let source = source.clone();
    db.transaction(scope, move |conn| {
        Box::pin(async move {
            match source {
                Source::Organizations(f) => {
                    let sql = format!(
                        "SELECT {}, {} FROM organizations o WHERE {} AND ($16::text IS NULL OR o.id > $17::uuid)
                         ORDER BY o.id LIMIT {PAGE}",
                        organizations::COLUMNS,
                        organizations::computed_columns(),
                        organizations::where_sql()
                    );
                    let query = organizations::bind_filters(diesel::sql_query(sql).into_boxed(), entities, &f);
                    let rows: Vec<OrganizationRow> = load_after(conn, query, after).await?;
                    Ok(rows.iter().map(|r| (r.id, Record::Organization(Box::new(r.to_proto())))).collect())
                }
                Source::Contacts(f) => {
                    let sql = format!(
                        "SELECT {}, {} FROM contacts c WHERE {} AND ($10::text IS NULL OR c.id > $11::uuid)
                         ORDER BY c.id LIMIT {PAGE}",
                        contacts::COLUMNS,
                        contacts::computed_columns(),
                        contacts::where_sql()
                    );
                    let query = contacts::bind_filters(diesel::sql_query(sql).into_boxed(), entities, &f);
                    let rows: Vec<ContactRow> = load_after(conn, query, after).await?;
                    // The current affiliations of the page, in one statement.
                    let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
                    let links: Vec<LinkRow> = if ids.is_empty() {
                        Vec::new()
                    } else {
                        diesel::sql_query(format!(
                            "SELECT a.contact_id, a.organization_id, o.legal_name, o.siret, a.roles, a.job_title
                               FROM affiliations a JOIN organizations o ON o.id = a.organization_id
                              WHERE a.contact_id = ANY($1) AND (a.end_date IS NULL OR a.end_date >= {TODAY_SQL})
                              ORDER BY a.contact_id, o.name_key, a.id"
                        ))
                        .bind::<Array<SqlUuid>, _>(&ids)
                        .load(conn)
                        .await
                        .map_err(DbError::from)?
                    };
                    Ok(rows
                        .iter()
                        .map(|r| {
                            let link = links.iter().find(|l| l.contact_id == r.id).cloned();
                            (r.id, Record::Contact(Box::new(r.to_proto()), link))
                        })
                        .collect())
                }
                Source::Memberships(f, ancestors) => {
                    set_ancestors(conn, &ancestors).await?;
                    let sql = format!(
                        "SELECT * FROM {} WHERE {} AND ($10::text IS NULL OR m.id > $11::uuid)
                         ORDER BY m.id LIMIT {PAGE}",
                        memberships::source(),
                        memberships::WHERE_SQL
                    );
                    let query = memberships::bind_filters(diesel::sql_query(sql).into_boxed(), entities, &f);
                    let rows: Vec<MembershipRow> = load_after(conn, query, after).await?;
                    Ok(rows
                        .iter()
                        .map(|r| {
                            let refs = MembershipRefs {
                                organization_siret: r.organization_siret.clone(),
                                organization_siren: r.organization_siren.clone(),
                                membership_type_code: r.membership_type_code.clone(),
                            };
                            (r.id, Record::Membership(Box::new(r.to_proto()), refs))
                        })
                        .collect())
                }
                Source::Interactions(f) => {
                    let sql = format!(
                        "SELECT {}, {}, {INTERACTION_LINE_COLUMNS} FROM {} WHERE {} AND ($11::text IS NULL OR i.id > $12::uuid)
                         ORDER BY i.id LIMIT {PAGE}",
                        interactions::COLUMNS,
                        interactions::COMPUTED,
                        interactions::FROM,
                        interactions::where_sql()
                    );
                    let query = interactions::bind_filters(diesel::sql_query(sql).into_boxed(), entities, &f);
                    let lines: Vec<InteractionLine> = load_after(conn, query, after).await?;
                    Ok(lines
                        .into_iter()
                        .map(|line| (line.record.id, Record::Interaction(Box::new(line.record.to_proto()), Box::new(line))))
                        .collect())
                }
            }
        })
    })
    .await
}

/// The rows of a page statement whose keyset binds (the last id, as text
/// then as a uuid; `None` on the first page) come after its filters.
async fn load_after<T>(conn: &mut AsyncPgConnection, query: Boxed<'_>, after: Option<Uuid>) -> Result<Vec<T>, Error>
where
    T: QueryableByName<Pg> + Send + 'static,
{
    Ok(query
        .bind::<Nullable<Text>, _>(after.map(|a| a.to_string()))
        .bind::<Nullable<SqlUuid>, _>(after)
        .load(conn)
        .await
        .map_err(DbError::from)?)
}

/// An exported record.
enum Record {
    Organization(Box<Organization>),
    Contact(Box<Contact>, Option<LinkRow>),
    Membership(Box<Membership>, MembershipRefs),
    Interaction(Box<Interaction>, Box<InteractionLine>),
}

/// Runs an export: pages read one after the other, pieces sent as they
/// fill. Stops when the receiver is gone (the client left).
async fn run(
    db: Database,
    scope: EntityScope,
    entities: Vec<Uuid>,
    source: Source,
    mut writer: Writer,
    first: (String, String),
    tx: tokio::sync::mpsc::Sender<Result<Piece, Status>>,
) {
    let result: Result<(), Error> = async {
        writer.start()?;
        let (content_type, filename) = first;
        // The first piece goes at once: the headers of a REST download.
        let piece = Piece { chunk: writer.take(), content_type, filename, record_count: 0 };
        if tx.send(Ok(piece)).await.is_err() {
            return Ok(());
        }
        let mut count = 0i64;
        let mut after = None;
        loop {
            let records = page(&db, &scope, &source, entities.clone(), after).await?;
            let full = records.len() == PAGE;
            for (id, record) in records {
                match &record {
                    Record::Organization(o) => writer.record(o.as_ref(), || organization_cells(o))?,
                    Record::Contact(c, link) => writer.record(c.as_ref(), || contact_cells(c, link.as_ref()))?,
                    Record::Membership(m, refs) => writer.record(m.as_ref(), || membership_cells(m, refs))?,
                    Record::Interaction(i, line) => writer.record(i.as_ref(), || interaction_cells(i, line))?,
                }
                count += 1;
                after = Some(id);
                if writer.buffer.len() >= CHUNK {
                    let piece = Piece {
                        chunk: writer.take(),
                        content_type: String::new(),
                        filename: String::new(),
                        record_count: 0,
                    };
                    if tx.send(Ok(piece)).await.is_err() {
                        return Ok(());
                    }
                }
            }
            if !full {
                break;
            }
        }
        let last =
            Piece { chunk: writer.take(), content_type: String::new(), filename: String::new(), record_count: count };
        let _ = tx.send(Ok(last)).await;
        Ok(())
    }
    .await;
    if let Err(error) = result {
        tracing::warn!(error = %error, "export failed");
        let _ = tx.send(Err(error.into_status(None))).await;
    }
}

/// What an export writes: the permission it needs, its CSV columns, its
/// JSON Lines message and its file name's stem.
struct Exported {
    permission: &'static str,
    catalogue: &'static [Column],
    message: &'static str,
    stem: &'static str,
}

const ORGANIZATIONS: Exported = Exported {
    permission: "crm.organizations.export",
    catalogue: ORGANIZATION_COLUMNS,
    message: "socle.crm.v1.Organization",
    stem: "organisations",
};
const CONTACTS: Exported = Exported {
    permission: "crm.contacts.export",
    catalogue: CONTACT_COLUMNS,
    message: "socle.crm.v1.Contact",
    stem: "contacts",
};
const MEMBERSHIPS: Exported = Exported {
    permission: "crm.memberships.export",
    catalogue: MEMBERSHIP_COLUMNS,
    message: "socle.crm.v1.Membership",
    stem: "adhesions",
};
const INTERACTIONS: Exported = Exported {
    permission: "crm.interactions.export",
    catalogue: INTERACTION_COLUMNS,
    message: "socle.crm.v1.Interaction",
    stem: "interactions",
};

/// The options every export request carries.
struct Options<'a> {
    entity_id: &'a str,
    include_descendants: bool,
    format: i32,
    columns: &'a [String],
    encoding: i32,
    delimiter: &'a str,
}

/// The [`Options`] of an export request.
macro_rules! options {
    ($r:expr) => {
        Options {
            entity_id: &$r.entity_id,
            include_descendants: $r.include_descendants,
            format: $r.format,
            columns: &$r.columns,
            encoding: $r.encoding,
            delimiter: &$r.delimiter,
        }
    };
}

/// Validates the options, starts an export of `source` and returns its
/// stream of messages.
async fn start<M: From<Piece> + Send + 'static>(
    crm: &Crm,
    caller: &Caller,
    what: &Exported,
    o: Options<'_>,
    source: Source,
) -> Result<Pieces<M>, Error> {
    let format = Format::new(what.catalogue, what.message, o.format, o.columns, o.encoding, o.delimiter)?;
    let entity = caller.entity_or_acting("entity_id", o.entity_id)?;
    // Within the caller's scope: the entity, or the part of its subtree
    // where the caller may export.
    let scope = crm.list_scope(caller, what.permission, entity, o.include_descendants).await?;
    let entities = scope_ids(&scope, entity);
    let filename = format!("{}-{}.{}", what.stem, chrono::Utc::now().format("%Y-%m-%d"), format.extension());
    let first = (format.content_type().to_owned(), filename);
    let writer = Writer::new(format, what.catalogue);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Piece, Status>>(4);
    tokio::spawn(run(crm.db.clone(), scope, entities, source, writer, first, tx));
    let stream = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|piece| (piece, rx)) });
    Ok(Box::pin(futures::StreamExt::map(stream, |piece| piece.map(M::from))))
}

impl Crm {
    /// `ExportOrganizations`.
    pub async fn export_organizations(
        &self,
        caller: &Caller,
        r: ExportOrganizationsRequest,
    ) -> Result<Pieces<ExportOrganizationsResponse>, Error> {
        let filters = organizations::filters(
            &r.tags,
            &r.membership_statuses,
            &r.membership_type_id,
            &r.naf_codes,
            &r.department_codes,
            "",
            "",
            &r.headcount_bands,
            "",
            false,
        )?;
        start(self, caller, &ORGANIZATIONS, options!(r), Source::Organizations(filters)).await
    }

    /// `ExportContacts`.
    pub async fn export_contacts(
        &self,
        caller: &Caller,
        r: ExportContactsRequest,
    ) -> Result<Pieces<ExportContactsResponse>, Error> {
        let filters = contacts::filters(
            &r.organization_id,
            &r.tags,
            &r.membership_statuses,
            r.consent_topic,
            r.consent_channel,
            "",
            false,
        )?;
        start(self, caller, &CONTACTS, options!(r), Source::Contacts(filters)).await
    }

    /// `ExportInteractions`: the filters of `ListInteractions`.
    pub async fn export_interactions(
        &self,
        caller: &Caller,
        r: ExportInteractionsRequest,
    ) -> Result<Pieces<ExportInteractionsResponse>, Error> {
        let filters = interactions::filters(&ListInteractionsRequest {
            organization_id: r.organization_id.clone(),
            contact_id: r.contact_id.clone(),
            kinds: r.kinds.clone(),
            start_time: r.start_time,
            end_time: r.end_time,
            tags: r.tags.clone(),
            ..ListInteractionsRequest::default()
        })?;
        start(self, caller, &INTERACTIONS, options!(r), Source::Interactions(filters)).await
    }
}

impl Memberships {
    /// `ExportMemberships`: the filters of `ListMemberships`.
    pub async fn export_memberships(
        &self,
        caller: &Caller,
        r: ExportMembershipsRequest,
    ) -> Result<Pieces<ExportMembershipsResponse>, Error> {
        let filters = memberships::filters(&ListMembershipsRequest {
            organization_id: r.organization_id.clone(),
            membership_type_id: r.membership_type_id.clone(),
            statuses: r.statuses.clone(),
            payment_statuses: r.payment_statuses.clone(),
            active_on_date: r.active_on_date.clone(),
            ..ListMembershipsRequest::default()
        })?;
        // The types the entity's ancestors offer, as the list reads them.
        let ancestors = self.ancestry.of(caller.entity_or_acting("entity_id", &r.entity_id)?).await?;
        start(self, caller, &MEMBERSHIPS, options!(r), Source::Memberships(filters, ancestors)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_found_by_name_label_or_alias() {
        assert_eq!(find_column(ORGANIZATION_COLUMNS, "legal_name"), Some((1, false)));
        assert_eq!(find_column(ORGANIZATION_COLUMNS, " RAISON SOCIALE "), Some((1, true)));
        assert_eq!(
            find_column(ORGANIZATION_COLUMNS, "Courriel").map(|c| ORGANIZATION_COLUMNS[c.0].name),
            Some("email")
        );
        assert_eq!(find_column(CONTACT_COLUMNS, "Prénom").map(|c| CONTACT_COLUMNS[c.0].name), Some("given_name"));
        assert_eq!(find_column(ORGANIZATION_COLUMNS, "couleur"), None);
        assert_eq!(find_column(ORGANIZATION_COLUMNS, ""), None);
    }

    #[test]
    fn single_byte_encodings_replace_what_they_cannot_hold() {
        assert_eq!(encode("Société €", TextEncoding::Windows1252), b"Soci\xe9t\xe9 \x80");
        assert_eq!(encode("Société €", TextEncoding::Iso88591), b"Soci\xe9t\xe9 ?");
        assert_eq!(encode("日本", TextEncoding::Windows1252), b"??");
    }

    #[test]
    fn refs_escape_commas() {
        let refs = [("sage".to_owned(), "a,b\\c".to_owned()), ("dolibarr".to_owned(), "12".to_owned())].into();
        assert_eq!(format_refs(&refs), "dolibarr=12, sage=a\\,b\\\\c");
    }
}

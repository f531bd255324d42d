//! Validation and normalisation of French CRM data: company identifiers
//! (SIREN, SIRET, NAF/APE code, legal form), contact details (e-mail, phone,
//! postal code, website), tags, person names and dates.
//!
//! Every `normalize_*` function returns the canonical form to store, or a
//! short machine reason (`invalid_siret`, …) that [`describe`] turns into a
//! French sentence for the UI. The module only uses `std`.

// ---------------------------------------------------------------------------
// Reasons
// ---------------------------------------------------------------------------

/// The French sentence shown to users for a machine `reason` returned by this
/// module (unknown reasons get a generic sentence).
pub fn describe(reason: &str) -> &'static str {
    match reason {
        "siren_format" => "SIREN invalide : 9 chiffres attendus",
        "invalid_siren" => "SIREN invalide : 9 chiffres dont la clé de contrôle (Luhn) est fausse",
        "siret_format" => "SIRET invalide : 14 chiffres attendus",
        "invalid_siret" => "SIRET invalide : 14 chiffres dont la clé de contrôle (Luhn) est fausse",
        "invalid_naf" => {
            "Code NAF invalide : format attendu 2 chiffres, un point, 2 chiffres et une lettre (ex. 10.71C), \
             dans une division existante de la NAF rév. 2"
        }
        "invalid_legal_form" => {
            "Catégorie juridique invalide : 4 chiffres attendus, le premier différent de 0 (nomenclature INSEE, niveau III)"
        }
        "invalid_email" => "Adresse e-mail invalide : format attendu nom@domaine.fr",
        "invalid_phone" => {
            "Numéro de téléphone invalide : saisir un numéro français à 10 chiffres (ex. 04 78 00 00 00) \
             ou un numéro international commençant par + ou 00 (ex. +32 2 555 12 12)"
        }
        "invalid_postal_code" => "Code postal invalide : 5 chiffres attendus",
        "invalid_website" => {
            "Site web invalide : adresse http ou https avec un nom de domaine attendue (ex. https://www.exemple.fr)"
        }
        "invalid_tag" => {
            "Étiquette invalide : 1 à 50 caractères, uniquement des lettres, des chiffres, des tirets et des tirets bas"
        }
        "too_many_tags" => "Trop d'étiquettes : 50 au maximum",
        "invalid_name" => "Nom invalide : 1 à 100 caractères, sans chiffres ni caractères de contrôle",
        _ => "Valeur invalide",
    }
}

// ---------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------

/// Removes the separators people type inside identifiers: any whitespace
/// (including non-breaking and narrow non-breaking spaces), dots and dashes.
fn strip_separators(input: &str) -> String {
    input.chars().filter(|c| !(c.is_whitespace() || matches!(c, '.' | '-'))).collect()
}

/// Whether `s` is non-empty and made of ASCII digits only.
fn all_ascii_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// The sum of the digits of an all-ASCII-digit string.
fn digit_sum(digits: &str) -> u32 {
    digits.bytes().map(|b| u32::from(b - b'0')).sum()
}

// ---------------------------------------------------------------------------
// SIREN / SIRET
// ---------------------------------------------------------------------------

/// The SIREN of La Poste, whose establishments (SIRET) do not all follow the
/// Luhn rule.
const LA_POSTE_SIREN: &str = "356000000";

/// Whether `digits` (ASCII digits only, non-empty) passes the Luhn check used
/// by SIREN and SIRET: doubling every second digit from the right, the sum
/// of the digits is a multiple of 10. Anything else returns `false`.
pub fn luhn_valid(digits: &str) -> bool {
    if !all_ascii_digits(digits) {
        return false;
    }
    let sum: u32 = digits
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let digit = u32::from(b - b'0');
            if i % 2 == 1 {
                let doubled = digit * 2;
                if doubled > 9 { doubled - 9 } else { doubled }
            } else {
                digit
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// The Luhn key of `payload` (ASCII digits): the digit that, appended,
/// makes the number pass [`luhn_valid`] (SIREN and SIRET generation in
/// demo data and tests).
pub fn luhn_check_digit(payload: &str) -> u32 {
    (0..10).find(|k| luhn_valid(&format!("{payload}{k}"))).unwrap_or(0)
}

/// Normalises a SIREN (company number): removes spaces, dots and dashes and
/// requires 9 ASCII digits (`siren_format`) with a valid Luhn key
/// (`invalid_siren`); La Poste's SIREN `356000000` is always accepted.
pub fn normalize_siren(input: &str) -> Result<String, &'static str> {
    let siren = strip_separators(input);
    if siren.len() != 9 || !all_ascii_digits(&siren) {
        return Err("siren_format");
    }
    if siren != LA_POSTE_SIREN && !luhn_valid(&siren) {
        return Err("invalid_siren");
    }
    Ok(siren)
}

/// Normalises a SIRET (establishment number): removes spaces, dots and
/// dashes and requires 14 ASCII digits (`siret_format`). The number must be
/// Luhn-valid and so must its SIREN (first 9 digits); for La Poste
/// establishments (SIRET starting with `356000000`) a sum of the 14 digits
/// that is a multiple of 5 is accepted instead of the Luhn key. Otherwise
/// `invalid_siret`.
pub fn normalize_siret(input: &str) -> Result<String, &'static str> {
    let siret = strip_separators(input);
    if siret.len() != 14 || !all_ascii_digits(&siret) {
        return Err("siret_format");
    }
    let valid = if siret.starts_with(LA_POSTE_SIREN) {
        luhn_valid(&siret) || digit_sum(&siret).is_multiple_of(5)
    } else {
        luhn_valid(&siret) && luhn_valid(siren_of_siret(&siret))
    };
    if valid { Ok(siret) } else { Err("invalid_siret") }
}

/// The SIREN part (first 9 characters) of a normalised SIRET; a shorter or
/// non-ASCII input is returned unchanged.
pub fn siren_of_siret(siret: &str) -> &str {
    siret.get(..9).unwrap_or(siret)
}

// ---------------------------------------------------------------------------
// NAF / APE code
// ---------------------------------------------------------------------------

/// The divisions (first two digits) of the NAF rév. 2, as inclusive ranges.
const NAF_DIVISIONS: &[(u8, u8)] = &[
    (1, 3),   // A: agriculture, sylviculture et pêche
    (5, 9),   // B: industries extractives
    (10, 33), // C: industrie manufacturière
    (35, 35), // D: électricité, gaz, vapeur et air conditionné
    (36, 39), // E: eau, assainissement, déchets et dépollution
    (41, 43), // F: construction
    (45, 47), // G: commerce ; réparation d'automobiles et de motocycles
    (49, 53), // H: transports et entreposage
    (55, 56), // I: hébergement et restauration
    (58, 63), // J: information et communication
    (64, 66), // K: activités financières et d'assurance
    (68, 68), // L: activités immobilières
    (69, 75), // M: activités spécialisées, scientifiques et techniques
    (77, 82), // N: activités de services administratifs et de soutien
    (84, 84), // O: administration publique
    (85, 85), // P: enseignement
    (86, 88), // Q: santé humaine et action sociale
    (90, 93), // R: arts, spectacles et activités récréatives
    (94, 96), // S: autres activités de services
    (97, 98), // T: activités des ménages en tant qu'employeurs
    (99, 99), // U: activités extra-territoriales
];

/// Official INSEE labels (NAF rév. 2, long wording) of the sub-classes most
/// common among member companies, sorted by code for binary search.
const NAF_LABELS: &[(&str, &str)] = &[
    ("10.11Z", "Transformation et conservation de la viande de boucherie"),
    ("10.13A", "Préparation industrielle de produits à base de viande"),
    ("10.13B", "Charcuterie"),
    ("10.51A", "Fabrication de lait liquide et de produits frais"),
    ("10.51C", "Fabrication de fromage"),
    ("10.71A", "Fabrication industrielle de pain et de pâtisserie fraîche"),
    ("10.71B", "Cuisson de produits de boulangerie"),
    ("10.71C", "Boulangerie et boulangerie-pâtisserie"),
    ("10.71D", "Pâtisserie"),
    ("10.85Z", "Fabrication de plats préparés"),
    ("11.02B", "Vinification"),
    ("16.23Z", "Fabrication de charpentes et d'autres menuiseries"),
    ("18.12Z", "Autre imprimerie (labeur)"),
    ("22.29A", "Fabrication de pièces techniques à base de matières plastiques"),
    ("25.11Z", "Fabrication de structures métalliques et de parties de structures"),
    ("25.12Z", "Fabrication de portes et fenêtres en métal"),
    ("25.62A", "Décolletage"),
    ("25.62B", "Mécanique industrielle"),
    ("33.12Z", "Réparation de machines et équipements mécaniques"),
    ("41.10A", "Promotion immobilière de logements"),
    ("41.20A", "Construction de maisons individuelles"),
    ("41.20B", "Construction d'autres bâtiments"),
    ("42.11Z", "Construction de routes et autoroutes"),
    ("43.11Z", "Travaux de démolition"),
    ("43.12A", "Travaux de terrassement courants et travaux préparatoires"),
    ("43.21A", "Travaux d'installation électrique dans tous locaux"),
    ("43.22A", "Travaux d'installation d'eau et de gaz en tous locaux"),
    ("43.22B", "Travaux d'installation d'équipements thermiques et de climatisation"),
    ("43.29A", "Travaux d'isolation"),
    ("43.31Z", "Travaux de plâtrerie"),
    ("43.32A", "Travaux de menuiserie bois et PVC"),
    ("43.32B", "Travaux de menuiserie métallique et serrurerie"),
    ("43.33Z", "Travaux de revêtement des sols et des murs"),
    ("43.34Z", "Travaux de peinture et vitrerie"),
    ("43.39Z", "Autres travaux de finition"),
    ("43.91A", "Travaux de charpente"),
    ("43.91B", "Travaux de couverture par éléments"),
    ("43.99A", "Travaux d'étanchéification"),
    ("43.99C", "Travaux de maçonnerie générale et gros œuvre de bâtiment"),
    ("45.11Z", "Commerce de voitures et de véhicules automobiles légers"),
    ("45.20A", "Entretien et réparation de véhicules automobiles légers"),
    ("45.20B", "Entretien et réparation d'autres véhicules automobiles"),
    ("46.19B", "Autres intermédiaires du commerce en produits divers"),
    ("46.69B", "Commerce de gros (commerce interentreprises) de fournitures et équipements industriels divers"),
    ("46.73A", "Commerce de gros (commerce interentreprises) de bois et de matériaux de construction"),
    ("46.90Z", "Commerce de gros (commerce interentreprises) non spécialisé"),
    ("47.11A", "Commerce de détail de produits surgelés"),
    ("47.11B", "Commerce d'alimentation générale"),
    ("47.11C", "Supérettes"),
    ("47.11D", "Supermarchés"),
    ("47.11E", "Magasins multi-commerces"),
    ("47.11F", "Hypermarchés"),
    ("47.22Z", "Commerce de détail de viandes et de produits à base de viande en magasin spécialisé"),
    ("47.24Z", "Commerce de détail de pain, pâtisserie et confiserie en magasin spécialisé"),
    ("47.26Z", "Commerce de détail de produits à base de tabac en magasin spécialisé"),
    ("47.71Z", "Commerce de détail d'habillement en magasin spécialisé"),
    ("47.73Z", "Commerce de détail de produits pharmaceutiques en magasin spécialisé"),
    ("47.78A", "Commerces de détail d'optique"),
    ("47.78C", "Autres commerces de détail spécialisés divers"),
    ("47.91B", "Vente à distance sur catalogue spécialisé"),
    ("49.32Z", "Transports de voyageurs par taxis"),
    ("49.39A", "Transports routiers réguliers de voyageurs"),
    ("49.41A", "Transports routiers de fret interurbains"),
    ("49.41B", "Transports routiers de fret de proximité"),
    ("49.42Z", "Services de déménagement"),
    ("52.10B", "Entreposage et stockage non frigorifique"),
    ("52.29A", "Messagerie, fret express"),
    ("52.29B", "Affrètement et organisation des transports"),
    ("55.10Z", "Hôtels et hébergement similaire"),
    ("56.10A", "Restauration traditionnelle"),
    ("56.10B", "Cafétérias et autres libres-services"),
    ("56.10C", "Restauration de type rapide"),
    ("56.21Z", "Services des traiteurs"),
    ("56.29A", "Restauration collective sous contrat"),
    ("56.30Z", "Débits de boissons"),
    ("58.29C", "Édition de logiciels applicatifs"),
    ("62.01Z", "Programmation informatique"),
    ("62.02A", "Conseil en systèmes et logiciels informatiques"),
    ("62.03Z", "Gestion d'installations informatiques"),
    ("62.09Z", "Autres activités informatiques"),
    ("63.11Z", "Traitement de données, hébergement et activités connexes"),
    ("64.20Z", "Activités des sociétés holding"),
    ("66.22Z", "Activités des agents et courtiers d'assurances"),
    ("68.10Z", "Activités des marchands de biens immobiliers"),
    ("68.20A", "Location de logements"),
    ("68.20B", "Location de terrains et d'autres biens immobiliers"),
    ("68.31Z", "Agences immobilières"),
    ("68.32A", "Administration d'immeubles et autres biens immobiliers"),
    ("69.10Z", "Activités juridiques"),
    ("69.20Z", "Activités comptables"),
    ("70.10Z", "Activités des sièges sociaux"),
    ("70.21Z", "Conseil en relations publiques et communication"),
    ("70.22Z", "Conseil pour les affaires et autres conseils de gestion"),
    ("71.11Z", "Activités d'architecture"),
    ("71.12A", "Activité des géomètres"),
    ("71.12B", "Ingénierie, études techniques"),
    ("71.20B", "Analyses, essais et inspections techniques"),
    ("73.11Z", "Activités des agences de publicité"),
    ("74.10Z", "Activités spécialisées de design"),
    ("77.11A", "Location de courte durée de voitures et de véhicules automobiles légers"),
    ("78.10Z", "Activités des agences de placement de main-d'œuvre"),
    ("78.20Z", "Activités des agences de travail temporaire"),
    ("80.10Z", "Activités de sécurité privée"),
    ("81.21Z", "Nettoyage courant des bâtiments"),
    ("81.22Z", "Autres activités de nettoyage des bâtiments et nettoyage industriel"),
    ("81.30Z", "Services d'aménagement paysager"),
    ("82.11Z", "Services administratifs combinés de bureau"),
    ("82.99Z", "Autres activités de soutien aux entreprises n.c.a."),
    ("85.53Z", "Enseignement de la conduite"),
    ("85.59A", "Formation continue d'adultes"),
    ("85.59B", "Autres enseignements"),
    ("86.10Z", "Activités hospitalières"),
    ("86.21Z", "Activité des médecins généralistes"),
    ("86.23Z", "Pratique dentaire"),
    ("86.90D", "Activités des infirmiers et des sages-femmes"),
    ("87.10A", "Hébergement médicalisé pour personnes âgées"),
    ("88.10A", "Aide à domicile"),
    ("93.12Z", "Activités de clubs de sports"),
    ("94.11Z", "Activités des organisations patronales et consulaires"),
    ("94.12Z", "Activités des organisations professionnelles"),
    ("94.99Z", "Autres organisations fonctionnant par adhésion volontaire"),
    ("96.02A", "Coiffure"),
    ("96.02B", "Soins de beauté"),
    ("96.03Z", "Services funéraires"),
];

/// Normalises a NAF rév. 2 (APE) code to `NN.NNX`: accepts `1071C`,
/// `10.71C`, `10.71c` or ` 10 71 C` (whitespace is ignored, the dot is
/// optional, the letter is upper-cased) and requires the division (first two
/// digits) to exist in the NAF rév. 2 (`invalid_naf`).
pub fn normalize_naf(input: &str) -> Result<String, &'static str> {
    const ERR: &str = "invalid_naf";
    let compact: String = input.chars().filter(|c| !c.is_whitespace()).collect();
    let bytes = compact.as_bytes();
    let (division, class, letter) = match bytes {
        [d1, d2, b'.', c1, c2, l] | [d1, d2, c1, c2, l] => ([*d1, *d2], [*c1, *c2], *l),
        _ => return Err(ERR),
    };
    if !division.iter().chain(class.iter()).all(u8::is_ascii_digit) || !letter.is_ascii_alphabetic() {
        return Err(ERR);
    }
    let number = (division[0] - b'0') * 10 + (division[1] - b'0');
    if !NAF_DIVISIONS.iter().any(|&(low, high)| (low..=high).contains(&number)) {
        return Err(ERR);
    }
    let mut code = String::with_capacity(6);
    code.extend([division[0], division[1], b'.', class[0], class[1], letter.to_ascii_uppercase()].map(char::from));
    Ok(code)
}

/// The official INSEE label of a NAF rév. 2 code (in any form accepted by
/// [`normalize_naf`]) when it is in the curated table of common codes; valid
/// codes outside the table have no label.
pub fn naf_label(code: &str) -> Option<&'static str> {
    let code = normalize_naf(code).ok()?;
    NAF_LABELS.binary_search_by(|(c, _)| (*c).cmp(code.as_str())).ok().map(|i| NAF_LABELS[i].1)
}

// ---------------------------------------------------------------------------
// Legal form (catégorie juridique)
// ---------------------------------------------------------------------------

/// Official INSEE labels (catégories juridiques, niveau III) of the common
/// legal forms, sorted by code for binary search. 5498 and 5720 are no
/// longer in INSEE's current nomenclature but still appear in older
/// records, so they keep their historical label.
const LEGAL_FORM_LABELS: &[(&str, &str)] = &[
    ("1000", "Entrepreneur individuel"),
    ("5202", "Société en nom collectif"),
    ("5306", "Société en commandite simple"),
    ("5308", "Société en commandite par actions"),
    ("5385", "Société d'exercice libéral en commandite par actions"),
    ("5458", "SARL coopérative de production (SCOP)"),
    ("5485", "Société d'exercice libéral à responsabilité limitée"),
    ("5498", "SARL unipersonnelle"),
    ("5499", "Société à responsabilité limitée (sans autre indication)"),
    ("5599", "SA à conseil d'administration (s.a.i.)"),
    ("5699", "SA à directoire (s.a.i.)"),
    ("5710", "SAS, société par actions simplifiée"),
    ("5720", "Société par actions simplifiée à associé unique ou société par actions simplifiée unipersonnelle"),
    ("5785", "Société d'exercice libéral par action simplifiée"),
    ("5800", "Société européenne"),
    ("6220", "Groupement d'intérêt économique (GIE)"),
    ("6317", "Société coopérative agricole"),
    ("6533", "Groupement agricole d'exploitation en commun (GAEC)"),
    ("6540", "Société civile immobilière"),
    ("6589", "Société civile de moyens"),
    ("6598", "Exploitation agricole à responsabilité limitée"),
    ("6599", "Autre société civile"),
    ("7381", "Organisme consulaire"),
    ("8210", "Mutuelle"),
    ("8410", "Syndicat de salariés"),
    ("8420", "Syndicat patronal"),
    ("8450", "Ordre professionnel ou assimilé"),
    ("8490", "Autre organisme professionnel"),
    ("9220", "Association déclarée"),
    ("9223", "Groupement d'employeurs"),
    ("9230", "Association déclarée, reconnue d'utilité publique"),
    ("9300", "Fondation"),
];

/// Normalises an INSEE legal form (catégorie juridique, niveau III): the
/// trimmed input must be 4 ASCII digits, the first one 1–9
/// (`invalid_legal_form`; the code 0000, funds without legal personality,
/// is deliberately refused).
pub fn normalize_legal_form(input: &str) -> Result<String, &'static str> {
    let code = input.trim();
    if code.len() == 4 && all_ascii_digits(code) && !code.starts_with('0') {
        Ok(code.to_string())
    } else {
        Err("invalid_legal_form")
    }
}

/// The official INSEE label of a legal form code when it is in the curated
/// table of common forms.
pub fn legal_form_label(code: &str) -> Option<&'static str> {
    let code = code.trim();
    LEGAL_FORM_LABELS.binary_search_by(|(c, _)| (*c).cmp(code)).ok().map(|i| LEGAL_FORM_LABELS[i].1)
}

// ---------------------------------------------------------------------------
// Domain names (e-mail and website)
// ---------------------------------------------------------------------------

/// Whether `domain` (already lower-cased) is an ASCII host name: 1–253
/// characters, at least two labels of 1–63 characters among `[a-z0-9-]`
/// that neither start nor end with `-`, and a top-level domain of at least
/// two letters or in punycode (`xn--…`). Internationalised names must be
/// given in punycode.
fn valid_domain(domain: &str) -> bool {
    if domain.is_empty() || domain.len() > 253 {
        return false;
    }
    let labels: Vec<&str> = domain.split('.').collect();
    let labels_ok = labels.iter().all(|label| {
        (1..=63).contains(&label.len())
            && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    });
    let tld_ok = labels.last().is_some_and(|tld| {
        (tld.len() >= 2 && tld.bytes().all(|b| b.is_ascii_lowercase())) || (tld.starts_with("xn--") && tld.len() > 4)
    });
    labels.len() >= 2 && labels_ok && tld_ok
}

/// Lower-cases (ASCII) and validates a domain name.
fn normalize_domain(domain: &str) -> Option<String> {
    let domain = domain.to_ascii_lowercase();
    valid_domain(&domain).then_some(domain)
}

// ---------------------------------------------------------------------------
// E-mail
// ---------------------------------------------------------------------------

/// Characters that cannot appear in an unquoted local part (RFC 5322
/// `specials`); quoted local parts are not supported.
const EMAIL_LOCAL_SPECIALS: &[char] = &['(', ')', '<', '>', '[', ']', ':', ';', '@', '\\', ',', '"'];

/// Normalises an e-mail address: trims it, requires exactly one `@`, a
/// local part of 1–64 bytes without whitespace, control characters or
/// RFC 5322 specials, not starting or ending with `.` and without `..`, and
/// a valid domain name (see the module's domain rules), 254 bytes at most in
/// total (`invalid_email`). The local part keeps its case, the domain is
/// lower-cased.
pub fn normalize_email(input: &str) -> Result<String, &'static str> {
    const ERR: &str = "invalid_email";
    let (local, domain) = input.trim().split_once('@').ok_or(ERR)?;
    let local_ok = (1..=64).contains(&local.len())
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && !local.chars().any(|c| c.is_whitespace() || c.is_control() || EMAIL_LOCAL_SPECIALS.contains(&c));
    if !local_ok {
        return Err(ERR);
    }
    // A second `@` lands in the domain, which the domain rules refuse.
    let domain = normalize_domain(domain).ok_or(ERR)?;
    let email = format!("{local}@{domain}");
    if email.len() > 254 { Err(ERR) } else { Ok(email) }
}

/// The key used to detect duplicate e-mail addresses: the normalised address
/// fully lower-cased (most mail servers ignore the case of the local part).
pub fn email_match_key(normalized: &str) -> String {
    normalized.to_lowercase()
}

// ---------------------------------------------------------------------------
// Phone
// ---------------------------------------------------------------------------

/// The country code of a French overseas number, from the first three digits
/// of its 9-digit national significant number (the national number without
/// its trunk `0`); `None` for metropolitan France.
fn overseas_country_code(national: &str) -> Option<&'static str> {
    match national.get(..3)? {
        // Réunion (262, 263, 692, 693) and Mayotte (269, 639).
        "262" | "263" | "692" | "693" | "269" | "639" => Some("262"),
        // Guadeloupe, Saint-Martin, Saint-Barthélemy.
        "590" | "690" | "691" => Some("590"),
        // Guyane.
        "594" | "694" => Some("594"),
        // Martinique.
        "596" | "696" | "697" => Some("596"),
        _ => None,
    }
}

/// Whether `national` is a 9-digit French national significant number (the
/// national number without its trunk `0`).
fn french_significant_number(national: &str) -> bool {
    national.len() == 9 && all_ascii_digits(national) && !national.starts_with('0')
}

/// Normalises a phone number to E.164 (`+` and digits). Spaces, non-breaking
/// spaces, dots, dashes and parentheses are ignored, and a `(0)` trunk
/// prefix after an international prefix is dropped. Accepted forms:
///
/// - French national numbers, 10 digits starting with `0` then 1–9
///   (`04 78 00 00 00` → `+33478000000`); overseas prefixes get their own
///   country code (`02 62 20 30 40` → `+262262203040`: Réunion and Mayotte
///   +262, Guadeloupe +590, Guyane +594, Martinique +596);
/// - `+33` or `0033` followed by 9 digits (a French overseas number written
///   with +33 is rewritten with its own country code, so every form of the
///   same line gives the same string); `+262`, `+590`, `+594` and `+596`
///   are followed by 9 digits too;
/// - other international numbers, `+` or `00` then 8–15 digits, the first
///   one not 0.
///
/// Anything else, letters included, is `invalid_phone`.
pub fn normalize_phone(input: &str) -> Result<String, &'static str> {
    const ERR: &str = "invalid_phone";
    let compact: String = input.chars().filter(|c| !(c.is_whitespace() || matches!(c, '.' | '-'))).collect();
    let international = compact.strip_prefix('+').or_else(|| compact.strip_prefix("00"));
    let (is_international, rest) = match international {
        Some(rest) => (true, rest.replacen("(0)", "", 1)),
        None => (false, compact.clone()),
    };
    let digits: String = rest.chars().filter(|c| !matches!(c, '(' | ')')).collect();
    if !all_ascii_digits(&digits) {
        return Err(ERR);
    }
    if !is_international {
        // French national number: trunk `0` then the significant number.
        let national = digits.strip_prefix('0').filter(|n| french_significant_number(n)).ok_or(ERR)?;
        let country = overseas_country_code(national).unwrap_or("33");
        return Ok(format!("+{country}{national}"));
    }
    if digits.starts_with('0') {
        return Err(ERR);
    }
    if let Some(national) = digits.strip_prefix("33") {
        if !french_significant_number(national) {
            return Err(ERR);
        }
        let country = overseas_country_code(national).unwrap_or("33");
        return Ok(format!("+{country}{national}"));
    }
    for overseas in ["262", "590", "594", "596"] {
        if let Some(national) = digits.strip_prefix(overseas) {
            return if french_significant_number(national) { Ok(format!("+{digits}")) } else { Err(ERR) };
        }
    }
    if (8..=15).contains(&digits.len()) { Ok(format!("+{digits}")) } else { Err(ERR) }
}

// ---------------------------------------------------------------------------
// Postal code and department
// ---------------------------------------------------------------------------

/// Normalises a French postal code: whitespace (including non-breaking
/// spaces) is removed and 5 ASCII digits must remain
/// (`invalid_postal_code`).
pub fn normalize_postal_code(input: &str) -> Result<String, &'static str> {
    let code: String = input.chars().filter(|c| !c.is_whitespace()).collect();
    if code.len() == 5 && all_ascii_digits(&code) { Ok(code) } else { Err("invalid_postal_code") }
}

/// The department derived from a French postal code, for the country `FR`
/// (case-insensitive) or an empty country: `2A` (below 20200) or `2B` for
/// Corsica, three digits overseas (971–976, 984, 986–988), otherwise the
/// first two digits (01–95). `None` for other countries, invalid postal
/// codes and prefixes that are not departments (Monaco's 980, 00, 96, 99).
/// The postal code is the post office's: a few communes are served from a
/// neighbouring department, and Saint-Barthélemy and Saint-Martin give 971.
pub fn department_of(postal_code: &str, country_code: &str) -> Option<String> {
    let country = country_code.trim();
    if !(country.is_empty() || country.eq_ignore_ascii_case("FR")) {
        return None;
    }
    let code = normalize_postal_code(postal_code).ok()?;
    let department = match &code[..2] {
        "20" if code.as_str() < "20200" => "2A",
        "20" => "2B",
        "97" | "98" => match &code[..3] {
            overseas @ ("971" | "972" | "973" | "974" | "975" | "976" | "984" | "986" | "987" | "988") => overseas,
            _ => return None,
        },
        "00" | "96" | "99" => return None,
        metropolitan => metropolitan,
    };
    Some(department.to_string())
}

// ---------------------------------------------------------------------------
// Website
// ---------------------------------------------------------------------------

/// Whether `s` is a URI scheme token (a letter, then letters, digits, `+`,
/// `-` or `.`).
fn is_scheme(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// Normalises a website address: trims it, prepends `https://` when there
/// is no scheme, requires `http` or `https`, a host that is a domain name
/// (same rules as e-mail domains; no IP address, no user information) with
/// an optional port 1–65535, and no whitespace or control characters. The
/// scheme and host are lower-cased, the path, query and fragment are kept;
/// 2048 bytes at most (`invalid_website`).
pub fn normalize_website(input: &str) -> Result<String, &'static str> {
    const ERR: &str = "invalid_website";
    let url = input.trim();
    if url.is_empty() || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ERR);
    }
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) if is_scheme(scheme) => (scheme.to_ascii_lowercase(), rest),
        _ => ("https".to_string(), url),
    };
    if scheme != "http" && scheme != "https" {
        return Err(ERR);
    }
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    if authority.contains('@') {
        return Err(ERR);
    }
    let (host, port) = match authority.split_once(':') {
        Some((host, port)) => {
            let valid_port = port.len() <= 5 && all_ascii_digits(port) && port.parse::<u16>().is_ok_and(|p| p != 0);
            if !valid_port {
                return Err(ERR);
            }
            (host, Some(port))
        }
        None => (authority, None),
    };
    let host = normalize_domain(host).ok_or(ERR)?;
    let port = port.map(|p| format!(":{p}")).unwrap_or_default();
    let website = format!("{scheme}://{host}{port}{tail}");
    if website.len() > 2048 { Err(ERR) } else { Ok(website) }
}

// ---------------------------------------------------------------------------
// Tags
// ---------------------------------------------------------------------------

/// The maximum number of tags on one record.
const MAX_TAGS: usize = 50;

/// Normalises a tag: trims and lower-cases it and turns each internal run of
/// whitespace into one `-`; the result must have 1–50 characters, all
/// letters (accented ones included), ASCII digits, `-` or `_`
/// (`invalid_tag`).
pub fn normalize_tag(input: &str) -> Result<String, &'static str> {
    let tag = input.to_lowercase().split_whitespace().collect::<Vec<_>>().join("-");
    let length = tag.chars().count();
    let chars_ok = tag.chars().all(|c| c.is_alphabetic() || c.is_ascii_digit() || matches!(c, '-' | '_'));
    if (1..=50).contains(&length) && chars_ok { Ok(tag) } else { Err("invalid_tag") }
}

/// Normalises a list of tags with [`normalize_tag`], keeping the first
/// occurrence of duplicates in their original order. Errors carry the index
/// of the first invalid tag, or `(50, "too_many_tags")` when more than 50
/// distinct tags remain.
pub fn normalize_tags(input: &[String]) -> Result<Vec<String>, (usize, &'static str)> {
    let mut tags: Vec<String> = Vec::with_capacity(input.len().min(MAX_TAGS));
    for (index, raw) in input.iter().enumerate() {
        let tag = normalize_tag(raw).map_err(|reason| (index, reason))?;
        if !tags.contains(&tag) {
            tags.push(tag);
        }
    }
    if tags.len() > MAX_TAGS {
        return Err((MAX_TAGS, "too_many_tags"));
    }
    Ok(tags)
}

// ---------------------------------------------------------------------------
// Folding
// ---------------------------------------------------------------------------

/// Lower-cases `text` and strips French diacritics (à â ä á ã å ç é è ê ë í
/// ì î ï ñ ó ò ô ö õ ú ù û ü ý ÿ), with œ → oe and æ → ae, to build
/// accent- and case-insensitive comparison keys in Rust.
///
/// It agrees letter by letter with the SQL function `socle_fold` (`lower()`
/// then `translate()`, in `socle-db`) except for the ligatures: SQL's
/// `translate()` maps one character to one, so `socle_fold` gives œ → o and
/// æ → a. Keys built here must therefore not be compared with keys built by
/// `socle_fold` for text containing œ or æ. (SQL `lower()` also depends on
/// the database's character-type locale for non-ASCII capitals.)
pub fn fold(text: &str) -> String {
    let mut folded = String::with_capacity(text.len());
    for c in text.chars().flat_map(char::to_lowercase) {
        match c {
            'à' | 'â' | 'ä' | 'á' | 'ã' | 'å' => folded.push('a'),
            'ç' => folded.push('c'),
            'é' | 'è' | 'ê' | 'ë' => folded.push('e'),
            'í' | 'ì' | 'î' | 'ï' => folded.push('i'),
            'ñ' => folded.push('n'),
            'ó' | 'ò' | 'ô' | 'ö' | 'õ' => folded.push('o'),
            'ú' | 'ù' | 'û' | 'ü' => folded.push('u'),
            'ý' | 'ÿ' => folded.push('y'),
            'œ' => folded.push_str("oe"),
            'æ' => folded.push_str("ae"),
            other => folded.push(other),
        }
    }
    folded
}

// ---------------------------------------------------------------------------
// Person names
// ---------------------------------------------------------------------------

/// Normalises a person's given or family name: trims it and collapses each
/// internal run of whitespace (tabs and line breaks included) into one
/// space; the result must have 1–100 characters, no control character and
/// no digit (`invalid_name`). The case is kept as given.
pub fn normalize_person_name(input: &str) -> Result<String, &'static str> {
    let name = input.split_whitespace().collect::<Vec<_>>().join(" ");
    let length = name.chars().count();
    if (1..=100).contains(&length) && !name.chars().any(|c| c.is_control() || c.is_numeric()) {
        Ok(name)
    } else {
        Err("invalid_name")
    }
}

// ---------------------------------------------------------------------------
// Dates
// ---------------------------------------------------------------------------

/// Whether `year` is a leap year of the Gregorian calendar.
fn is_leap_year(year: u32) -> bool {
    year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400))
}

/// The number of days of `month` (1–12) in `year`.
fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap_year(year) => 29,
        2 => 28,
        _ => 0,
    }
}

/// Whether `input` is a real calendar date written `YYYY-MM-DD` (leap years
/// included) with a year from 1900 to 2200.
pub fn valid_date(input: &str) -> bool {
    let number = |range: std::ops::Range<usize>| -> Option<u32> {
        let part = input.get(range)?;
        if all_ascii_digits(part) { part.parse().ok() } else { None }
    };
    let bytes = input.as_bytes();
    if bytes.len() != 10 || bytes[4] != b'-' || bytes[7] != b'-' {
        return false;
    }
    let (Some(year), Some(month), Some(day)) = (number(0..4), number(5..7), number(8..10)) else {
        return false;
    };
    (1900..=2200).contains(&year) && (1..=12).contains(&month) && (1..=days_in_month(year, month)).contains(&day)
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    /// Every reason this module returns.
    const REASONS: &[&str] = &[
        "siren_format",
        "invalid_siren",
        "siret_format",
        "invalid_siret",
        "invalid_naf",
        "invalid_legal_form",
        "invalid_email",
        "invalid_phone",
        "invalid_postal_code",
        "invalid_website",
        "invalid_tag",
        "too_many_tags",
        "invalid_name",
    ];

    /// Appends the digit that makes `prefix` Luhn-valid.
    fn with_luhn_key(prefix: &str) -> String {
        (0..=9).map(|d| format!("{prefix}{d}")).find(|candidate| luhn_valid(candidate)).unwrap()
    }

    // --- describe ---

    #[test]
    fn every_reason_has_a_french_description() {
        for reason in REASONS {
            let text = describe(reason);
            assert_ne!(text, describe("no_such_reason"), "{reason} has no description");
            assert!(!text.is_empty());
        }
        assert_eq!(describe("no_such_reason"), "Valeur invalide");
        assert_eq!(describe("invalid_siret"), "SIRET invalide : 14 chiffres dont la clé de contrôle (Luhn) est fausse");
    }

    // --- Luhn ---

    #[test]
    fn luhn_known_values() {
        assert!(luhn_valid("732829320"));
        assert!(!luhn_valid("732829321"));
        assert!(luhn_valid("73282932000074"));
        assert!(luhn_valid("0"));
        assert!(luhn_valid("18")); // 1*2 + 8 = 10
        assert!(!luhn_valid("19"));
        assert!(luhn_valid("79927398713")); // The textbook example.
        assert!(!luhn_valid("79927398710"));
    }

    #[test]
    fn luhn_rejects_non_digits_and_empty() {
        assert!(!luhn_valid(""));
        assert!(!luhn_valid("7328 29320"));
        assert!(!luhn_valid("73282932a"));
        assert!(!luhn_valid("٧٣٢٨٢٩٣٢٠")); // Arabic-Indic digits.
    }

    #[test]
    fn luhn_key_helper_is_consistent() {
        assert_eq!(with_luhn_key("73282932"), "732829320");
        assert_eq!(with_luhn_key("7328293200007"), "73282932000074");
    }

    // --- SIREN ---

    #[test]
    fn siren_valid_and_cleaned() {
        assert_eq!(normalize_siren("732829320"), Ok("732829320".to_string()));
        assert_eq!(normalize_siren(" 732 829 320 "), Ok("732829320".to_string()));
        assert_eq!(normalize_siren("732\u{a0}829\u{a0}320"), Ok("732829320".to_string()));
        assert_eq!(normalize_siren("732\u{202f}829\u{202f}320"), Ok("732829320".to_string()));
        assert_eq!(normalize_siren("732.829.320"), Ok("732829320".to_string()));
        assert_eq!(normalize_siren("732-829-320"), Ok("732829320".to_string()));
    }

    #[test]
    fn siren_invalid_key() {
        assert!(!luhn_valid("732829321"));
        assert_eq!(normalize_siren("732829321"), Err("invalid_siren"));
    }

    #[test]
    fn siren_format_errors() {
        assert_eq!(normalize_siren(""), Err("siren_format"));
        assert_eq!(normalize_siren("73282932"), Err("siren_format"));
        assert_eq!(normalize_siren("7328293200"), Err("siren_format"));
        assert_eq!(normalize_siren("73282932O"), Err("siren_format"));
        assert_eq!(normalize_siren("732_829_320"), Err("siren_format"));
        assert_eq!(normalize_siren("٧٣٢٨٢٩٣٢٠"), Err("siren_format"));
    }

    #[test]
    fn siren_la_poste_accepted() {
        assert_eq!(normalize_siren("356 000 000"), Ok("356000000".to_string()));
    }

    // --- SIRET ---

    #[test]
    fn siret_valid_and_cleaned() {
        assert!(luhn_valid("73282932000074"));
        assert_eq!(normalize_siret("73282932000074"), Ok("73282932000074".to_string()));
        assert_eq!(normalize_siret("732 829 320 00074"), Ok("73282932000074".to_string()));
        assert_eq!(normalize_siret("732.829.320-00074"), Ok("73282932000074".to_string()));
    }

    #[test]
    fn siret_invalid_key() {
        assert!(!luhn_valid("73282932000075"));
        assert_eq!(normalize_siret("73282932000075"), Err("invalid_siret"));
    }

    #[test]
    fn siret_format_errors() {
        assert_eq!(normalize_siret(""), Err("siret_format"));
        assert_eq!(normalize_siret("732829320"), Err("siret_format"));
        assert_eq!(normalize_siret("7328293200007"), Err("siret_format"));
        assert_eq!(normalize_siret("732829320000744"), Err("siret_format"));
        assert_eq!(normalize_siret("7328293200007A"), Err("siret_format"));
    }

    #[test]
    fn siret_requires_a_valid_siren() {
        let siret = with_luhn_key("7328293210007");
        assert!(luhn_valid(&siret));
        assert!(!luhn_valid(siren_of_siret(&siret)));
        assert_eq!(normalize_siret(&siret), Err("invalid_siret"));
    }

    #[test]
    fn siret_la_poste_head_office() {
        // The head office is accepted; it happens to pass the Luhn check
        // while its digit sum (26) is not a multiple of 5.
        let head_office = "35600000000048";
        assert!(luhn_valid(head_office));
        assert_eq!(digit_sum(head_office), 26);
        assert_eq!(normalize_siret(head_office), Ok(head_office.to_string()));
        assert_eq!(normalize_siret("356 000 000 00048"), Ok(head_office.to_string()));
    }

    #[test]
    fn siret_la_poste_multiple_of_five_rule() {
        let establishment = "35600000000001";
        assert!(!luhn_valid(establishment));
        assert_eq!(digit_sum(establishment) % 5, 0);
        assert_eq!(normalize_siret(establishment), Ok(establishment.to_string()));
    }

    #[test]
    fn siret_la_poste_rejected_when_both_rules_fail() {
        let siret = "35600000000049";
        assert!(!luhn_valid(siret));
        assert_ne!(digit_sum(siret) % 5, 0);
        assert_eq!(normalize_siret(siret), Err("invalid_siret"));
    }

    #[test]
    fn siret_multiple_of_five_rule_is_only_for_la_poste() {
        let siret = (0..=9)
            .map(|d| format!("7328293200007{d}"))
            .find(|s| !luhn_valid(s) && digit_sum(s).is_multiple_of(5))
            .unwrap();
        assert_eq!(normalize_siret(&siret), Err("invalid_siret"));
    }

    #[test]
    fn siren_of_siret_takes_nine_chars() {
        assert_eq!(siren_of_siret("73282932000074"), "732829320");
        assert_eq!(siren_of_siret("7328"), "7328");
        assert_eq!(siren_of_siret(""), "");
        assert_eq!(siren_of_siret("éééééééé"), "éééééééé");
    }

    // --- NAF ---

    #[test]
    fn naf_accepted_forms() {
        for input in ["1071C", "10.71C", "10.71c", " 10 71 C", "10.71 C", "1071c\t"] {
            assert_eq!(normalize_naf(input), Ok("10.71C".to_string()), "{input:?}");
        }
        assert_eq!(normalize_naf("01.11Z"), Ok("01.11Z".to_string()));
        assert_eq!(normalize_naf("99.00z"), Ok("99.00Z".to_string()));
    }

    #[test]
    fn naf_rejected_forms() {
        for input in [
            "", "1071", "10.71", "107C", "10711C", "10.71CC", "1.071C", "10-71C", "10..71C", "AB.CDE", "10.7AC",
            "10.71É", "10.711",
        ] {
            assert_eq!(normalize_naf(input), Err("invalid_naf"), "{input:?}");
        }
    }

    #[test]
    fn naf_divisions() {
        let valid: Vec<u8> = (0..100).filter(|d| normalize_naf(&format!("{d:02}.00Z")).is_ok()).collect();
        let expected: Vec<u8> = [1..=3, 5..=9, 10..=33, 35..=39, 41..=43, 45..=47, 49..=53, 55..=56, 58..=66, 68..=75]
            .into_iter()
            .chain([77..=82, 84..=88, 90..=99])
            .flatten()
            .collect();
        assert_eq!(valid, expected);
        for missing in [0, 4, 34, 40, 44, 48, 54, 57, 67, 76, 83, 89] {
            assert_eq!(normalize_naf(&format!("{missing:02}.00Z")), Err("invalid_naf"));
        }
    }

    #[test]
    fn naf_labels_table_is_sorted_and_valid() {
        assert!(NAF_LABELS.windows(2).all(|w| w[0].0 < w[1].0), "NAF_LABELS must be sorted without duplicates");
        for (code, label) in NAF_LABELS {
            assert_eq!(normalize_naf(code).as_deref(), Ok(*code));
            assert!(!label.is_empty() && label.trim() == *label);
            assert_eq!(naf_label(code), Some(*label));
        }
    }

    #[test]
    fn naf_label_lookup() {
        assert_eq!(naf_label("10.71C"), Some("Boulangerie et boulangerie-pâtisserie"));
        assert_eq!(naf_label("1071d"), Some("Pâtisserie"));
        assert_eq!(naf_label(" 56 10 A"), Some("Restauration traditionnelle"));
        assert_eq!(naf_label("94.11Z"), Some("Activités des organisations patronales et consulaires"));
        assert_eq!(naf_label("62.01Z"), Some("Programmation informatique"));
        // Valid but not in the table.
        assert!(normalize_naf("01.11Z").is_ok());
        assert_eq!(naf_label("01.11Z"), None);
        // Invalid.
        assert_eq!(naf_label("04.00Z"), None);
        assert_eq!(naf_label("nonsense"), None);
    }

    // --- Legal form ---

    #[test]
    fn legal_form_validation() {
        assert_eq!(normalize_legal_form("5710"), Ok("5710".to_string()));
        assert_eq!(normalize_legal_form(" 9220 "), Ok("9220".to_string()));
        assert_eq!(normalize_legal_form("1000"), Ok("1000".to_string()));
        for input in ["", "0000", "0123", "571", "57100", "57a0", "57 10", "５７１０"] {
            assert_eq!(normalize_legal_form(input), Err("invalid_legal_form"), "{input:?}");
        }
    }

    #[test]
    fn legal_form_labels_table_is_sorted_and_valid() {
        assert!(LEGAL_FORM_LABELS.windows(2).all(|w| w[0].0 < w[1].0));
        for (code, label) in LEGAL_FORM_LABELS {
            assert_eq!(normalize_legal_form(code).as_deref(), Ok(*code));
            assert!(!label.is_empty() && label.trim() == *label);
            assert_eq!(legal_form_label(code), Some(*label));
        }
    }

    #[test]
    fn legal_form_label_lookup() {
        assert_eq!(legal_form_label("5499"), Some("Société à responsabilité limitée (sans autre indication)"));
        assert_eq!(legal_form_label("5498"), Some("SARL unipersonnelle"));
        assert_eq!(legal_form_label("5710"), Some("SAS, société par actions simplifiée"));
        assert_eq!(legal_form_label(" 9220"), Some("Association déclarée"));
        assert_eq!(legal_form_label("8420"), Some("Syndicat patronal"));
        assert_eq!(legal_form_label("5599"), Some("SA à conseil d'administration (s.a.i.)"));
        assert_eq!(legal_form_label("1234"), None);
        assert_eq!(legal_form_label(""), None);
    }

    // --- E-mail ---

    #[test]
    fn email_valid() {
        assert_eq!(normalize_email("jean.dupont@example.fr"), Ok("jean.dupont@example.fr".to_string()));
        assert_eq!(normalize_email("  Jean.Dupont@Example.FR \n"), Ok("Jean.Dupont@example.fr".to_string()));
        assert_eq!(normalize_email("a+tag@sub.example.co.uk"), Ok("a+tag@sub.example.co.uk".to_string()));
        assert_eq!(normalize_email("o'brien@example.ie"), Ok("o'brien@example.ie".to_string()));
        assert_eq!(normalize_email("x@my-host.example.com"), Ok("x@my-host.example.com".to_string()));
        assert_eq!(normalize_email("contact@xn--caf-dma.fr"), Ok("contact@xn--caf-dma.fr".to_string()));
        assert_eq!(normalize_email("contact@example.xn--p1ai"), Ok("contact@example.xn--p1ai".to_string()));
        assert_eq!(normalize_email("élodie@example.fr"), Ok("élodie@example.fr".to_string()));
    }

    #[test]
    fn email_invalid() {
        for input in [
            "",
            "plainaddress",
            "@example.fr",
            "jean@",
            "jean@@example.fr",
            "jean@dupont@example.fr",
            "jean dupont@example.fr",
            "jean\u{7}@example.fr",
            ".jean@example.fr",
            "jean.@example.fr",
            "jean..dupont@example.fr",
            "jean,dupont@example.fr",
            "<jean@example.fr>",
            "\"jean\"@example.fr",
            "jean@localhost",
            "jean@example",
            "jean@example.f",
            "jean@example.123",
            "jean@-example.fr",
            "jean@example-.fr",
            "jean@exa_mple.fr",
            "jean@example..fr",
            "jean@.example.fr",
            "jean@example.fr.",
            "jean@café.fr",
            "jean@exa mple.fr",
            "jean@[192.168.0.1]",
            "jean@192.168.0.1",
        ] {
            assert_eq!(normalize_email(input), Err("invalid_email"), "{input:?}");
        }
    }

    #[test]
    fn email_length_limits() {
        let local_64 = "a".repeat(64);
        assert!(normalize_email(&format!("{local_64}@example.fr")).is_ok());
        assert_eq!(normalize_email(&format!("{}@example.fr", "a".repeat(65))), Err("invalid_email"));
        let label_63 = "b".repeat(63);
        assert!(normalize_email(&format!("a@{label_63}.fr")).is_ok());
        assert_eq!(normalize_email(&format!("a@{}.fr", "b".repeat(64))), Err("invalid_email"));
        // 64 + 1 + 189 = 254 bytes: accepted; one more byte: refused.
        let domain_189 = format!("{}.{}.{}.fr", "c".repeat(62), "c".repeat(62), "c".repeat(60));
        assert_eq!(domain_189.len(), 189);
        let email_254 = format!("{local_64}@{domain_189}");
        assert_eq!(email_254.len(), 254);
        assert!(normalize_email(&email_254).is_ok());
        let domain_190 = format!("{}.{}.{}.fr", "c".repeat(62), "c".repeat(62), "c".repeat(61));
        assert_eq!(normalize_email(&format!("{local_64}@{domain_190}")), Err("invalid_email"));
    }

    #[test]
    fn email_domain_length_limit() {
        let label = "d".repeat(63);
        let domain_253 = format!("{label}.{label}.{label}.{}.fr", "d".repeat(58));
        assert_eq!(domain_253.len(), 253);
        assert!(valid_domain(&domain_253));
        let domain_254 = format!("{label}.{label}.{label}.{}.fr", "d".repeat(59));
        assert!(!valid_domain(&domain_254));
    }

    #[test]
    fn email_match_key_lowercases_everything() {
        let normalized = normalize_email("Jean.DUPONT@Example.fr").unwrap();
        assert_eq!(normalized, "Jean.DUPONT@example.fr");
        assert_eq!(email_match_key(&normalized), "jean.dupont@example.fr");
        assert_eq!(email_match_key("Élodie@example.fr"), "élodie@example.fr");
    }

    // --- Phone ---

    #[test]
    fn phone_french_national() {
        assert_eq!(normalize_phone("04 78 00 00 00"), Ok("+33478000000".to_string()));
        assert_eq!(normalize_phone("06.12.34.56.78"), Ok("+33612345678".to_string()));
        assert_eq!(normalize_phone("06-12-34-56-78"), Ok("+33612345678".to_string()));
        assert_eq!(normalize_phone("0612345678"), Ok("+33612345678".to_string()));
        assert_eq!(normalize_phone("01\u{a0}23\u{a0}45\u{a0}67\u{a0}89"), Ok("+33123456789".to_string()));
        assert_eq!(normalize_phone("(04) 78 00 00 00"), Ok("+33478000000".to_string()));
        assert_eq!(normalize_phone("09 70 00 00 00"), Ok("+33970000000".to_string()));
        assert_eq!(normalize_phone("0800 00 00 00"), Ok("+33800000000".to_string()));
    }

    #[test]
    fn phone_french_international_forms() {
        assert_eq!(normalize_phone("+33 (0)6 12 34 56 78"), Ok("+33612345678".to_string()));
        assert_eq!(normalize_phone("+33 (0) 4 78 00 00 00"), Ok("+33478000000".to_string()));
        assert_eq!(normalize_phone("0033612345678"), Ok("+33612345678".to_string()));
        assert_eq!(normalize_phone("00 33 6 12 34 56 78"), Ok("+33612345678".to_string()));
        assert_eq!(normalize_phone("+33 6 12 34 56 78"), Ok("+33612345678".to_string()));
        assert_eq!(normalize_phone("+33612345678"), Ok("+33612345678".to_string()));
    }

    #[test]
    fn phone_french_overseas() {
        assert_eq!(normalize_phone("02 62 20 30 40"), Ok("+262262203040".to_string()));
        assert_eq!(normalize_phone("0263 20 30 40"), Ok("+262263203040".to_string()));
        assert_eq!(normalize_phone("06 92 12 34 56"), Ok("+262692123456".to_string()));
        assert_eq!(normalize_phone("06 93 12 34 56"), Ok("+262693123456".to_string()));
        assert_eq!(normalize_phone("02 69 61 00 00"), Ok("+262269610000".to_string()));
        assert_eq!(normalize_phone("06 39 12 34 56"), Ok("+262639123456".to_string()));
        assert_eq!(normalize_phone("05 90 12 34 56"), Ok("+590590123456".to_string()));
        assert_eq!(normalize_phone("06 90 12 34 56"), Ok("+590690123456".to_string()));
        assert_eq!(normalize_phone("06 91 12 34 56"), Ok("+590691123456".to_string()));
        assert_eq!(normalize_phone("05 94 12 34 56"), Ok("+594594123456".to_string()));
        assert_eq!(normalize_phone("06 94 12 34 56"), Ok("+594694123456".to_string()));
        assert_eq!(normalize_phone("05 96 12 34 56"), Ok("+596596123456".to_string()));
        assert_eq!(normalize_phone("06 96 12 34 56"), Ok("+596696123456".to_string()));
        assert_eq!(normalize_phone("06 97 12 34 56"), Ok("+596697123456".to_string()));
        // Same line written in international forms.
        assert_eq!(normalize_phone("+262 262 20 30 40"), Ok("+262262203040".to_string()));
        assert_eq!(normalize_phone("+262 (0)262 20 30 40"), Ok("+262262203040".to_string()));
        assert_eq!(normalize_phone("+33 2 62 20 30 40"), Ok("+262262203040".to_string()));
        // Twelve digits: one pair too many.
        assert_eq!(normalize_phone("0262 20 30 40 50"), Err("invalid_phone"));
        assert_eq!(normalize_phone("+262 262 20 30 40 50"), Err("invalid_phone"));
    }

    #[test]
    fn phone_other_international() {
        assert_eq!(normalize_phone("+32 2 555 12 12"), Ok("+3225551212".to_string()));
        assert_eq!(normalize_phone("0032 2 555 12 12"), Ok("+3225551212".to_string()));
        assert_eq!(normalize_phone("+44 (0)20 7946 0000"), Ok("+442079460000".to_string()));
        assert_eq!(normalize_phone("+1 (212) 555-0100"), Ok("+12125550100".to_string()));
        assert_eq!(normalize_phone("+41 22 000 00 00"), Ok("+41220000000".to_string()));
        // E.164 bounds: 8 to 15 digits.
        assert_eq!(normalize_phone("+12345678"), Ok("+12345678".to_string()));
        assert_eq!(normalize_phone("+123456789012345"), Ok("+123456789012345".to_string()));
        assert_eq!(normalize_phone("+1234567"), Err("invalid_phone"));
        assert_eq!(normalize_phone("+1234567890123456"), Err("invalid_phone"));
    }

    #[test]
    fn phone_rejected() {
        for input in [
            "",
            "12345",
            "06 12 34 56",
            "06 12 34 56 78 9",
            "00 12 34 5",
            "6 12 34 56 78",
            "+33 06 12 34 56 78",
            "+33 6 12 34 56",
            "+33 0 12 34 56 78",
            "+0 123 456 789",
            "000 33 6 12 34 56 78",
            "+",
            "00",
            "++33612345678",
            "+33 6 12 34 56 7A",
            "06 12 34 56 ab",
            "O6 12 34 56 78",
            "06/12/34/56/78",
            "06 12 34 56 78 poste 12",
            "33+612345678",
        ] {
            assert_eq!(normalize_phone(input), Err("invalid_phone"), "{input:?}");
        }
    }

    // --- Postal code and department ---

    #[test]
    fn postal_code_validation() {
        assert_eq!(normalize_postal_code("69001"), Ok("69001".to_string()));
        assert_eq!(normalize_postal_code(" 69 001 "), Ok("69001".to_string()));
        assert_eq!(normalize_postal_code("01\u{a0}000"), Ok("01000".to_string()));
        for input in ["", "6900", "690011", "69-001", "69.001", "6900A", "F-69001"] {
            assert_eq!(normalize_postal_code(input), Err("invalid_postal_code"), "{input:?}");
        }
    }

    #[test]
    fn department_metropolitan() {
        assert_eq!(department_of("69001", "FR").as_deref(), Some("69"));
        assert_eq!(department_of("01000", "").as_deref(), Some("01"));
        assert_eq!(department_of("75008", "fr").as_deref(), Some("75"));
        assert_eq!(department_of("95000", " FR ").as_deref(), Some("95"));
        assert_eq!(department_of("69 001", "FR").as_deref(), Some("69"));
    }

    #[test]
    fn department_corsica() {
        assert_eq!(department_of("20000", "FR").as_deref(), Some("2A"));
        assert_eq!(department_of("20090", "FR").as_deref(), Some("2A"));
        assert_eq!(department_of("20199", "FR").as_deref(), Some("2A"));
        assert_eq!(department_of("20200", "FR").as_deref(), Some("2B"));
        assert_eq!(department_of("20600", "FR").as_deref(), Some("2B"));
    }

    #[test]
    fn department_overseas() {
        for (postal_code, department) in [
            ("97100", "971"),
            ("97200", "972"),
            ("97300", "973"),
            ("97400", "974"),
            ("97500", "975"),
            ("97600", "976"),
            ("98600", "986"),
            ("98714", "987"),
            ("98800", "988"),
        ] {
            assert_eq!(department_of(postal_code, "FR").as_deref(), Some(department), "{postal_code}");
        }
        assert_eq!(department_of("98000", "FR"), None); // Monaco
        assert_eq!(department_of("97900", "FR"), None);
    }

    #[test]
    fn department_none() {
        assert_eq!(department_of("69001", "BE"), None);
        assert_eq!(department_of("1000", "BE"), None);
        assert_eq!(department_of("6900", "FR"), None);
        assert_eq!(department_of("00100", "FR"), None);
        assert_eq!(department_of("96000", "FR"), None);
        assert_eq!(department_of("99000", "FR"), None);
        assert_eq!(department_of("", ""), None);
    }

    // --- Website ---

    #[test]
    fn website_valid() {
        assert_eq!(normalize_website("example.fr"), Ok("https://example.fr".to_string()));
        assert_eq!(normalize_website("  www.Example.FR/Contact  "), Ok("https://www.example.fr/Contact".to_string()));
        assert_eq!(normalize_website("HTTP://WWW.EXAMPLE.FR"), Ok("http://www.example.fr".to_string()));
        assert_eq!(
            normalize_website("https://example.fr:8443/a/B?q=Xy&r=1#Top"),
            Ok("https://example.fr:8443/a/B?q=Xy&r=1#Top".to_string())
        );
        assert_eq!(normalize_website("example.fr?q=1"), Ok("https://example.fr?q=1".to_string()));
        assert_eq!(
            normalize_website("example.fr/go?to=http://other.fr"),
            Ok("https://example.fr/go?to=http://other.fr".to_string())
        );
        assert_eq!(normalize_website("https://xn--caf-dma.fr/"), Ok("https://xn--caf-dma.fr/".to_string()));
    }

    #[test]
    fn website_invalid() {
        for input in [
            "",
            "   ",
            "ftp://example.fr",
            "mailto:contact@example.fr",
            "javascript:alert(1)",
            "https://",
            "https://localhost",
            "https://192.168.0.1",
            "https://[::1]/",
            "https://user:pass@example.fr",
            "https://example.fr:",
            "https://example.fr:0",
            "https://example.fr:65536",
            "https://example.fr:80a",
            "https://exa mple.fr",
            "https://example.fr/a b",
            "https://-example.fr",
            "https://example..fr",
            "https://café.fr",
            "//example.fr",
        ] {
            assert_eq!(normalize_website(input), Err("invalid_website"), "{input:?}");
        }
    }

    #[test]
    fn website_length_limit() {
        let base = "https://example.fr/";
        let path_ok = "a".repeat(2048 - base.len());
        assert!(normalize_website(&format!("{base}{path_ok}")).is_ok());
        assert_eq!(normalize_website(&format!("{base}{path_ok}a")), Err("invalid_website"));
    }

    // --- Tags ---

    #[test]
    fn tag_normalisation() {
        assert_eq!(normalize_tag("  Adhérent  2024 "), Ok("adhérent-2024".to_string()));
        assert_eq!(normalize_tag("Comité\tDirecteur\n Régional"), Ok("comité-directeur-régional".to_string()));
        assert_eq!(normalize_tag("BTP_Île-de-France"), Ok("btp_île-de-france".to_string()));
        assert_eq!(normalize_tag("ŒUVRE"), Ok("œuvre".to_string()));
        assert_eq!(normalize_tag(&"é".repeat(50)), Ok("é".repeat(50)));
    }

    #[test]
    fn tag_rejected() {
        for input in ["", "   ", "a/b", "a.b", "#tag", "adhérent!", "l'équipe", "tag\u{0}x"] {
            assert_eq!(normalize_tag(input), Err("invalid_tag"), "{input:?}");
        }
        assert_eq!(normalize_tag(&"a".repeat(51)), Err("invalid_tag"));
    }

    #[test]
    fn tags_dedup_keeps_first_order() {
        let input: Vec<String> = ["Zeta", "alpha", "ZETA", " Alpha ", "beta"].map(String::from).to_vec();
        assert_eq!(normalize_tags(&input), Ok(vec!["zeta".to_string(), "alpha".to_string(), "beta".to_string()]));
        assert_eq!(normalize_tags(&[]), Ok(Vec::new()));
    }

    #[test]
    fn tags_report_first_invalid_index() {
        let input: Vec<String> = ["ok", "also-ok", "bad/tag", "worse!"].map(String::from).to_vec();
        assert_eq!(normalize_tags(&input), Err((2, "invalid_tag")));
    }

    #[test]
    fn tags_limit() {
        let fifty: Vec<String> = (0..50).map(|i| format!("tag-{i}")).collect();
        assert_eq!(normalize_tags(&fifty).map(|t| t.len()), Ok(50));
        let mut fifty_one = fifty.clone();
        fifty_one.push("tag-50".to_string());
        assert_eq!(normalize_tags(&fifty_one), Err((50, "too_many_tags")));
        // Duplicates do not count towards the limit.
        let mut with_duplicates = fifty.clone();
        with_duplicates.extend(fifty.iter().map(|t| t.to_uppercase()));
        assert_eq!(normalize_tags(&with_duplicates).map(|t| t.len()), Ok(50));
    }

    // --- Folding ---

    #[test]
    fn fold_examples() {
        assert_eq!(fold("Éléonore Dupré-Lefèvre"), "eleonore dupre-lefevre");
        assert_eq!(fold("FRANÇOIS"), "francois");
        assert_eq!(fold("Œuvre cœur"), "oeuvre coeur");
        assert_eq!(fold("Lætitia"), "laetitia");
        assert_eq!(fold("ÀÂÄÇÉÈÊËÎÏÔÖÙÛÜŸ"), "aaaceeeeiioouuuy");
        assert_eq!(fold("Straße 42"), "straße 42");
        assert_eq!(fold(""), "");
    }

    #[test]
    fn fold_agrees_with_socle_fold_except_ligatures() {
        // The two literals of `translate()` in `socle_fold` (socle-db).
        let from = "àâäáãåçéèêëíìîïñóòôöõúùûüýÿœæ";
        let to = "aaaaaaceeeeiiiinooooouuuuyyoa";
        assert_eq!(from.chars().count(), to.chars().count());
        for (source, sql) in from.chars().zip(to.chars()) {
            let rust = fold(&source.to_string());
            match source {
                'œ' => assert_eq!((rust.as_str(), sql), ("oe", 'o')),
                'æ' => assert_eq!((rust.as_str(), sql), ("ae", 'a')),
                _ => assert_eq!(rust, sql.to_string(), "{source}"),
            }
            // Upper-case letters fold like their lower-case forms.
            let upper: String = source.to_uppercase().collect();
            assert_eq!(fold(&upper), rust, "{upper}");
        }
    }

    // --- Person names ---

    #[test]
    fn person_name_valid() {
        assert_eq!(normalize_person_name("  Jean-Pierre  "), Ok("Jean-Pierre".to_string()));
        assert_eq!(normalize_person_name("de  La\tFontaine"), Ok("de La Fontaine".to_string()));
        assert_eq!(normalize_person_name("D'Artagnan"), Ok("D'Artagnan".to_string()));
        assert_eq!(normalize_person_name("N’Diaye"), Ok("N’Diaye".to_string()));
        assert_eq!(normalize_person_name("MARIE-ÉLODIE"), Ok("MARIE-ÉLODIE".to_string()));
        assert_eq!(normalize_person_name("Zoë\u{a0}Lefèvre"), Ok("Zoë Lefèvre".to_string()));
        assert_eq!(normalize_person_name(&"é".repeat(100)), Ok("é".repeat(100)));
    }

    #[test]
    fn person_name_rejected() {
        for input in ["", "   ", "Louis 14", "Jean2", "Ⅻ", "Jean\u{0}", "Jean\u{1b}[31m"] {
            assert_eq!(normalize_person_name(input), Err("invalid_name"), "{input:?}");
        }
        assert_eq!(normalize_person_name(&"a".repeat(101)), Err("invalid_name"));
    }

    // --- Dates ---

    #[test]
    fn dates_valid() {
        for input in ["1900-01-01", "2024-02-29", "2000-02-29", "2200-12-31", "2025-04-30", "1999-12-31"] {
            assert!(valid_date(input), "{input}");
        }
    }

    #[test]
    fn dates_invalid() {
        for input in [
            "",
            "1899-12-31",
            "2201-01-01",
            "1900-02-29",
            "2100-02-29",
            "2023-02-29",
            "2024-02-30",
            "2024-04-31",
            "2024-13-01",
            "2024-00-10",
            "2024-01-00",
            "2024-1-01",
            "2024-01-1",
            "24-01-01",
            "2024/01/01",
            "2024-01-01T00:00",
            " 2024-01-01",
            "2024-+1-01",
            "２０２４-01-01",
            "2024-é1-01",
        ] {
            assert!(!valid_date(input), "{input:?}");
        }
    }

    #[test]
    fn leap_years() {
        assert!(is_leap_year(2000));
        assert!(is_leap_year(2024));
        assert!(!is_leap_year(1900));
        assert!(!is_leap_year(2100));
        assert!(!is_leap_year(2023));
        assert_eq!((1..=12).map(|m| days_in_month(2024, m)).sum::<u32>(), 366);
        assert_eq!((1..=12).map(|m| days_in_month(2023, m)).sum::<u32>(), 365);
    }
}

//! `cargo xtask bench crm`: the CRM's lists and search at scale, through
//! the real edge with real tokens and access decisions.
//!
//! 100,000 organisations and 300,000 contacts (each affiliated with one
//! organisation) are loaded with set-based SQL into the CRM database of a
//! secured platform, spread over three branches. Then, `RUN` each in
//! `ROUNDS` turns (the series take turns, so that a background load weighs
//! on all of them alike), with `CLIENTS` requests in flight:
//!
//! - REST list (`GET /api/v1/organizations`, first page of 50) and REST
//!   search (`POST /api/v1/crm:search`) through the edge: throughput and
//!   p50/p95/p99 latency;
//! - the same list over gRPC straight to the CRM service (no edge): the
//!   edge's ratio, REST via the edge / direct gRPC (aim ≥ 0.85);
//! - pgbench running the list's own SQL (`socle_crm::organizations::first_page_sql_for`)
//!   in the same transaction shape (scope set, then the statement), as the
//!   application role, with as many clients: the REST ratio against the
//!   database alone (aim ≥ 0.8).
//!
//! Everything shares this machine's cores (client, edge, services,
//! PostgreSQL): the ratios, measured in the same run, are the result; the
//! absolute figures only describe this machine.

use std::{
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use reqwest::Method;
use serde_json::json;
use socle_proto::socle::crm::v1::{ListOrganizationsRequest, organization_service_client::OrganizationServiceClient};
use socle_testkit::{Service, secure::SecurePlatform};

/// Each measured series runs this long in total, in `ROUNDS` turns.
const RUN: Duration = Duration::from_secs(15);
const ROUNDS: u32 = 3;
const CLIENTS: usize = 8;
const ORGANIZATIONS: i64 = 100_000;
const CONTACTS: i64 = 300_000;
/// French family names (the most frequent ones), for realistic diversity.
const FAMILIES: &str = "['Martin','Bernard','Thomas','Petit','Robert','Richard','Durand','Dubois','Moreau','Laurent','Simon','Michel','Lefèvre','Leroy','Roux','David','Bertrand','Morel','Fournier','Girard','Bonnet','Dupont','Lambert','Fontaine','Rousseau','Vincent','Muller','Lefèbvre','Faure','André','Mercier','Blanc','Guérin','Boyer','Garnier','Chevalier','François','Legrand','Gauthier','Garcia','Perrin','Robin','Clément','Morin','Nicolas','Henry','Roussel','Mathieu','Gautier','Masson','Marchand','Duval','Denis','Dumont','Marie','Lemaire','Noël','Meyer','Dufour','Meunier','Brun','Blanchard','Giraud','Joly','Rivière','Lucas','Brunet','Gaillard','Barbier','Arnaud','Martinez','Gérard','Roche','Renard','Schmitt','Roy','Leroux','Colin','Vidal','Caron','Picard','Roger','Fabre','Aubert','Lemoine','Renaud','Dumas','Lacroix','Olivier','Philippe','Bourgeois','Pierre','Benoît','Rey','Leclerc','Payet','Rolland','Leclercq','Guillaume','Lecomte','Lopez','Jean','Dupuy','Guillot','Hubert','Berger','Carpentier','Sanchez','Dupuis','Moulin','Louis','Deschamps','Huet','Vasseur','Perez','Boucher','Fleury','Royer','Klein','Jacquet','Adam','Paris','Poirier','Marty','Aubry','Guyot','Carré','Charles','Renault','Charpentier','Ménard','Maillard','Baron','Bertin','Bailly','Hervé','Schneider','Fernandez','Le Gall','Collet','Léger','Bouvier','Julien','Prévost','Millet','Perrot','Daniel','Le Roux','Cousin','Germain','Breton']";
const FAMILY_COUNT: usize = 151;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Calls, failures and latencies of one measured series, over one or more
/// rounds.
#[derive(Default)]
struct Series {
    latencies: Vec<Duration>,
    elapsed: Duration,
    failures: usize,
    first_failure: Option<String>,
}

impl Series {
    /// Successful calls per second.
    fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn report(&mut self, name: &str) {
        self.latencies.sort();
        println!(
            "  {name:<34} {:8.1} req/s   p50 {:>7.2} ms  p95 {:>7.2} ms  p99 {:>7.2} ms",
            self.rate(),
            percentile(&self.latencies, 0.50).as_secs_f64() * 1e3,
            percentile(&self.latencies, 0.95).as_secs_f64() * 1e3,
            percentile(&self.latencies, 0.99).as_secs_f64() * 1e3,
        );
        if let Some(first) = &self.first_failure {
            println!("  {:<34} {} failed calls, the first: {first}", "", self.failures);
        }
    }
}

/// Warms `call` up (caches, connections, plans): 20 calls, all must succeed.
async fn warm_up<F, Fut>(call: &F) -> anyhow::Result<()>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    for i in 0..20 {
        call(i).await?;
    }
    Ok(())
}

/// One round: `CLIENTS` loops calling `call` for `run`, added to `series`.
/// Failed calls are counted (with the first failure), not timed: the rate
/// counts successes only.
async fn round<F, Fut>(series: &mut Series, call: Arc<F>, run: Duration)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..CLIENTS {
        let call = call.clone();
        tasks.push(tokio::spawn(async move {
            let (mut latencies, mut failures, mut first_failure) = (Vec::new(), 0usize, None);
            let mut i = worker;
            while started.elapsed() < run {
                let t = Instant::now();
                match call(i).await {
                    Ok(()) => latencies.push(t.elapsed()),
                    Err(error) => {
                        failures += 1;
                        first_failure.get_or_insert(error.to_string());
                    }
                }
                i += CLIENTS;
            }
            (latencies, failures, first_failure)
        }));
    }
    for task in tasks {
        match task.await {
            Ok((latencies, failed, first)) => {
                series.latencies.extend(latencies);
                series.failures += failed;
                if series.first_failure.is_none() {
                    series.first_failure = first;
                }
            }
            Err(error) => {
                series.failures += 1;
                series.first_failure.get_or_insert(error.to_string());
            }
        }
    }
    series.elapsed += started.elapsed();
}

/// Reads a response whole; an error, with the body, unless it succeeded.
async fn ok(response: reqwest::Response, what: &str) -> anyhow::Result<()> {
    let status = response.status();
    let body = response.bytes().await?;
    anyhow::ensure!(status.is_success(), "{what}: HTTP {status}: {}", String::from_utf8_lossy(&body));
    Ok(())
}

/// Loads the dataset with set-based SQL as the database owner.
async fn load(owner_url: &str, branches: &[String]) -> anyhow::Result<()> {
    use diesel_async::{AsyncConnection, SimpleAsyncConnection};
    let mut conn = diesel_async::AsyncPgConnection::establish(owner_url).await?;
    let entities = format!("ARRAY['{}']::uuid[]", branches.join("','"));
    let families = FAMILIES;
    let family_count = FAMILY_COUNT;
    let sql = format!(
        "
        INSERT INTO organizations (id, entity_id, legal_name, trade_name, siren, siret, naf_code, headcount_band,
                                   addresses, email, phone, tags, postal_code, city, department_code)
        SELECT md5('org' || g)::uuid, ({entities})[1 + (g / 30) % 3],
               (ARRAY['Boulangerie','Garage','Transports','Atelier','Cabinet','Imprimerie','Menuiserie','Café',
                      'Hôtel','Pharmacie','Électricité','Plomberie','Boucherie','Charcuterie','Fromagerie',
                      'Restaurant','Brasserie','Coiffure','Fleuriste','Librairie','Maçonnerie','Charpente',
                      'Peinture','Serrurerie','Carrosserie','Pressing','Optique','Auto-école','Traiteur',
                      'Conseil'])[1 + g % 30] || ' ' ||
               (ARRAY{families})[1 + (g / 30) % {family_count}] ||
               (ARRAY['',' et Fils',' SARL',' SAS',' & Associés',' du Centre',' de la Gare',' des Halles',
                      ' Frères',' et Cie',' du Parc',' de l''Église',' Saint-Jean',' du Marché',' des Quais',
                      ' Croix-Rousse',' Bellecour',' Part-Dieu',' Confluence',' Presqu''île'])[1 + (g / 4500) % 20],
               '', lpad(g::text, 9, '0'), lpad(g::text, 9, '0') || '00017',
               (ARRAY['10.71C','45.20A','49.41A','62.01Z','69.20Z','18.12Z','43.32A','56.30Z','55.10Z','47.73Z',
                      '43.21A','43.22A'])[1 + g % 12],
               1 + g % 15,
               jsonb_build_array(jsonb_build_object('kind', 1, 'primary', true, 'street_line', g || ' rue de la République',
                   'postal_code', (ARRAY['6900','5900','3300'])[1 + (g / 30) % 3] || (1 + g % 9), 'city',
                   (ARRAY['Lyon','Lille','Bordeaux'])[1 + (g / 30) % 3], 'country_code', 'FR')),
               'contact' || g || '@entreprise.fr', '+3347' || lpad(g::text, 7, '0'),
               ARRAY[(ARRAY['artisanat','industrie','commerce','services'])[1 + g % 4]],
               (ARRAY['6900','5900','3300'])[1 + (g / 30) % 3] || (1 + g % 9),
               (ARRAY['Lyon','Lille','Bordeaux'])[1 + (g / 30) % 3], (ARRAY['69','59','33'])[1 + (g / 30) % 3]
          FROM generate_series(0, {orgs} - 1) AS g;
        INSERT INTO contacts (id, entity_id, civility, given_name, family_name, job_title, emails, email_keys,
                              phones, phone_keys)
        SELECT md5('contact' || g)::uuid, ({entities})[1 + ((g % {orgs}) / 30) % 3], 1 + g % 2,
               (ARRAY['Camille','Dominique','Claude','Stéphane','Marie','Jean','Anne','Pierre','Sophie','Luc',
                      'Nathalie','Philippe','Isabelle','Laurent','Sylvie','Nicolas','Catherine','Éric','Valérie',
                      'Olivier','Sandrine','Christophe','Céline','Julien','Émilie','Thomas','Julie','Mathieu',
                      'Aurélie','Sébastien','Hélène','François','Chloé','Antoine','Manon','Hugo','Léa','Louis',
                      'Inès','Gabriel'])[1 + g % 40],
               (ARRAY{families})[1 + (g / 40) % {family_count}],
               (ARRAY['Gérant','DRH','Comptable','Assistante','Directrice'])[1 + g % 5],
               jsonb_build_array(jsonb_build_object('address', 'p' || g || '@entreprise.fr', 'kind', 1, 'primary', true)),
               ARRAY['p' || g || '@entreprise.fr'],
               jsonb_build_array(jsonb_build_object('number', '+336' || lpad(g::text, 8, '0'), 'kind', 1, 'primary', true)),
               ARRAY['+336' || lpad(g::text, 8, '0')]
          FROM generate_series(0, {contacts} - 1) AS g;
        INSERT INTO affiliations (id, entity_id, contact_id, organization_id, roles, job_title)
        SELECT md5('aff' || g)::uuid, ({entities})[1 + ((g % {orgs}) / 30) % 3], md5('contact' || g)::uuid,
               md5('org' || (g % {orgs}))::uuid, ARRAY[5]::smallint[], ''
          FROM generate_series(0, {contacts} - 1) AS g;
        ANALYZE organizations; ANALYZE contacts; ANALYZE affiliations;",
        orgs = ORGANIZATIONS,
        contacts = CONTACTS,
    );
    conn.batch_execute(&sql).await?;
    Ok(())
}

/// pgbench on `script` for `run`, with `CLIENTS` clients: the number of
/// transactions and the time they took.
fn pgbench(url: &str, script: &str, run: Duration) -> anyhow::Result<(f64, Duration)> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("list.sql");
    std::fs::write(&file, script)?;
    let output = Command::new("pgbench")
        .args(["-n", "-M", "extended", "-c", &CLIENTS.to_string(), "-j", "2", "-T", &run.as_secs().to_string(), "-f"])
        .arg(&file)
        .arg(url)
        .output()
        .map_err(|e| anyhow::anyhow!("pgbench is required (PostgreSQL's client tools): {e}"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(output.status.success(), "pgbench failed: {}", String::from_utf8_lossy(&output.stderr));
    let tps: f64 = text
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.trim_start_matches("tps = ").split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no tps in pgbench's output: {text}"))?;
    Ok((tps * run.as_secs_f64(), run))
}

pub async fn crm() -> anyhow::Result<()> {
    println!(
        "crm benchmark: {ORGANIZATIONS} organisations, {CONTACTS} contacts, {CLIENTS} clients, {}s per measure in {ROUNDS} rounds",
        RUN.as_secs()
    );
    let p = SecurePlatform::start().await?;
    let mut branches = Vec::new();
    for code in ["ARA-LYON", "HDF-LILLE", "NAQ-BORDEAUX"] {
        branches.push(p.create_entity(&p.root, "ENTITY_KIND_BRANCH", code).await?);
    }
    let lyon = branches[0].clone();
    let (user, token) = p.user_with_password("staff.lyon@socle.test", &lyon).await?;
    p.grant_user(user, "staff", &lyon, "GRANT_SCOPE_SUBTREE").await?;
    let crm = &p.services[&Service::Crm];
    let started = Instant::now();
    load(&crm.database.owner_url, &branches).await?;
    println!("  loaded in {:.1} s", started.elapsed().as_secs_f64());

    let http = reqwest::Client::builder().pool_max_idle_per_host(CLIENTS).build()?;
    let edge = p.edge.url();
    // Sanity: the page is full, and only Lyon's.
    let page: serde_json::Value = http
        .get(format!("{edge}/api/v1/organizations?pageSize=50"))
        .bearer_auth(&token)
        .header("x-socle-entity", &lyon)
        .send()
        .await?
        .json()
        .await?;
    let orgs = page["organizations"].as_array().map(Vec::len).unwrap_or(0);
    anyhow::ensure!(orgs == 50, "expected a full page: {page}");
    anyhow::ensure!(page["organizations"].as_array().into_iter().flatten().all(|o| o["entityId"] == lyon.as_str()));
    // And every query finds something.
    let queries =
        ["boulangerie martin", "garage dubois", "transport", "imprimerie leroy 12", "cafe simon", "pharmacie"];
    for query in queries {
        let found: serde_json::Value = http
            .post(format!("{edge}/api/v1/crm:search"))
            .bearer_auth(&token)
            .header("x-socle-entity", &lyon)
            .json(&json!({ "query": query, "pageSize": 20 }))
            .send()
            .await?
            .json()
            .await?;
        anyhow::ensure!(found["hits"].as_array().is_some_and(|h| !h.is_empty()), "no hit for {query}: {found}");
    }

    let list = {
        let (http, edge, token, lyon) = (http.clone(), edge.clone(), token.clone(), lyon.clone());
        Arc::new(move |_: usize| {
            let request = http
                .request(Method::GET, format!("{edge}/api/v1/organizations?pageSize=50"))
                .bearer_auth(&token)
                .header("x-socle-entity", &lyon);
            async move { ok(request.send().await?, "list").await }
        })
    };
    let search = {
        let (http, edge, token, lyon) = (http.clone(), edge.clone(), token.clone(), lyon.clone());
        Arc::new(move |i: usize| {
            let request = http
                .request(Method::POST, format!("{edge}/api/v1/crm:search"))
                .bearer_auth(&token)
                .header("x-socle-entity", &lyon)
                .json(&json!({ "query": queries[i % queries.len()], "pageSize": 20 }));
            async move { ok(request.send().await?, "search").await }
        })
    };
    let channel = tonic::transport::Endpoint::from_shared(crm.url())?.connect().await?;
    let grpc = {
        let (token, lyon) = (token.clone(), lyon.clone());
        Arc::new(move |_: usize| {
            let mut client = OrganizationServiceClient::new(channel.clone());
            let mut request = tonic::Request::new(ListOrganizationsRequest { page_size: 50, ..Default::default() });
            let bearer = format!("Bearer {token}");
            let entity = lyon.clone();
            async move {
                request.metadata_mut().insert("authorization", bearer.parse()?);
                request.metadata_mut().insert("x-socle-entity", entity.parse()?);
                client.list_organizations(request).await?;
                Ok(())
            }
        })
    };
    let sql = socle_crm::organizations::first_page_sql_for(uuid::Uuid::parse_str(&lyon)?, 50);
    let script = format!(
        "BEGIN;\nSELECT set_config('socle.entity_scope', '{lyon}', true);\n{};\nCOMMIT;\n",
        sql.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    let database_url = crm.database.app_url_with_password();

    warm_up(&*list).await?;
    warm_up(&*search).await?;
    warm_up(&*grpc).await?;
    // The compared series take turns, round after round, so that whatever
    // else the machine does weighs on all of them alike.
    let slot = RUN / ROUNDS;
    let (mut rest_list, mut rest_search, mut direct) = (Series::default(), Series::default(), Series::default());
    let (mut transactions, mut database_time) = (0.0, Duration::ZERO);
    for _ in 0..ROUNDS {
        round(&mut rest_list, list.clone(), slot).await;
        round(&mut direct, grpc.clone(), slot).await;
        let (tx, took) = pgbench(&database_url, &script, slot)?;
        transactions += tx;
        database_time += took;
        round(&mut rest_search, search.clone(), slot).await;
    }
    rest_list.report("REST list (edge, page of 50)");
    rest_search.report("REST search (edge, 20 hits)");
    direct.report("gRPC list (crm directly)");
    let database = transactions / database_time.as_secs_f64();
    println!("  {:<34} {database:8.1} tx/s", "pgbench, the list's SQL");
    println!("  ratio REST list / pgbench           {:8.2}   (aim ≥ 0.80)", rest_list.rate() / database);
    println!("  ratio REST via edge / direct gRPC   {:8.2}   (aim ≥ 0.85)", rest_list.rate() / direct.rate());
    Ok(())
}

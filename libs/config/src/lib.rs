//! Layered configuration and typed secrets.
//!
//! Layers, lowest precedence first:
//!
//! 1. the defaults of the configuration type (`Default`),
//! 2. a TOML file (`socle.toml`, or the file named by `SOCLE_CONFIG`),
//! 3. `SOCLE_*` environment variables, `__` separating levels
//!    (`SOCLE_DATABASE__MAX_CONNECTIONS=20` sets `database.max_connections`),
//! 4. Vault: when `vault.address` is set, the KV secret at
//!    `vault.mount`/`vault.config_path` holds dotted keys that override
//!    everything (`"database.max_connections" = "20"`).
//!
//! Configuration types use `#[serde(deny_unknown_fields)]`, so an unknown key
//! or an invalid value stops start-up with an error naming the key and where
//! it came from.
//!
//! Secrets never appear in configuration as values: a [`SecretRef`] holds a
//! locator (`vault:<mount>/<path>#<key>` or `file:<key>` for the local
//! development secrets file) and only a [`SecretResolver`] turns it into a
//! [`SecretString`], whose `Debug` prints `[REDACTED]`. Services keep
//! locators in their raw configuration and resolved secrets in their
//! validated configuration, so an unresolved secret cannot be used.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    path::{Path, PathBuf},
    str::FromStr,
    sync::Mutex,
};

use figment::{
    Figment, Profile, Provider,
    providers::{Format, Serialized, Toml},
    value::{Dict, Map, Value},
};
pub use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};

/// The prefix of configuration environment variables.
pub const ENV_PREFIX: &str = "SOCLE_";
/// The environment variable naming the configuration file.
pub const CONFIG_FILE_ENV: &str = "SOCLE_CONFIG";

/// Why configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A key is unknown, missing or has an invalid value. The message names
    /// the key and the layer it came from.
    #[error("invalid configuration: {0}")]
    Invalid(Box<figment::Error>),
    /// Vault could not be read.
    #[error("vault: cannot read `{path}`: {reason}")]
    Vault {
        /// The mount and path that were read.
        path: String,
        /// Why (never contains secret values).
        reason: String,
    },
    /// A secret locator is malformed or names nothing.
    #[error("secret `{locator}`: {reason}")]
    Secret {
        /// The locator (never the value).
        locator: String,
        /// What is wrong.
        reason: String,
    },
    /// The development secrets file cannot be read.
    #[error("secrets file `{path}`: {reason}")]
    SecretsFile {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

impl ConfigError {
    /// An invalid-configuration error with a message naming the key.
    pub fn invalid(message: impl Into<String>) -> Self {
        ConfigError::Invalid(Box::new(figment::Error::from(message.into())))
    }
}

impl From<figment::Error> for ConfigError {
    fn from(error: figment::Error) -> Self {
        ConfigError::Invalid(Box::new(error))
    }
}

/// Where configuration comes from. Build it with [`Sources::from_process`]
/// in `main`; tests build it by hand and never touch the process environment.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// The TOML file, if any. A missing file is an error only when it was
    /// named explicitly.
    pub file: Option<PathBuf>,
    /// Whether a missing `file` is an error.
    pub file_required: bool,
    /// `SOCLE_*` variables (other variables are ignored).
    pub env: Vec<(String, String)>,
}

impl Sources {
    /// The process environment, and the file named by `SOCLE_CONFIG`
    /// (required) or `./socle.toml` (optional).
    pub fn from_process() -> Self {
        let env: Vec<(String, String)> = std::env::vars().filter(|(k, _)| k.starts_with(ENV_PREFIX)).collect();
        let named = env.iter().find(|(k, _)| k == CONFIG_FILE_ENV).map(|(_, v)| PathBuf::from(v));
        Sources {
            file_required: named.is_some(),
            file: Some(named.unwrap_or_else(|| PathBuf::from("socle.toml"))),
            env,
        }
    }

    /// Sources with only the given file.
    pub fn file(path: impl Into<PathBuf>) -> Self {
        Sources { file: Some(path.into()), file_required: true, env: Vec::new() }
    }

    /// Adds an environment variable (tests).
    pub fn with_env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
}

/// How to reach Vault. `address` unset means no Vault layer.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VaultSettings {
    /// `http(s)://host:port`; unset disables Vault.
    pub address: Option<String>,
    /// The token; from `SOCLE_VAULT__TOKEN` in practice, never from a file
    /// in the repository.
    #[serde(skip_serializing)]
    pub token: Option<SecretString>,
    /// The KV mount holding Socle's secrets (default `secret`).
    pub mount: Option<String>,
    /// The path, under `mount`, of the configuration overrides of this
    /// service (e.g. `socle/crm/config`; keep secrets at another path, such
    /// as `socle/crm/secrets`); unset means no override layer.
    pub config_path: Option<String>,
    /// KV engine version: 2 (HashiCorp Vault default) or 1.
    pub kv_version: Option<u8>,
}

impl fmt::Debug for VaultSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VaultSettings")
            .field("address", &self.address)
            .field("token", &self.token.as_ref().map(|_| "[REDACTED]"))
            .field("mount", &self.mount)
            .field("config_path", &self.config_path)
            .field("kv_version", &self.kv_version)
            .finish()
    }
}

impl VaultSettings {
    fn mount(&self) -> &str {
        self.mount.as_deref().unwrap_or("secret")
    }
}

/// The local development secrets file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecretsSettings {
    /// A TOML file of `key = "value"` pairs, for `file:<key>` locators.
    pub file: Option<PathBuf>,
}

/// The part of every configuration that the loader itself needs.
pub trait HasSecretSources {
    /// Vault settings.
    fn vault(&self) -> &VaultSettings;
    /// Development secrets file settings.
    fn secrets(&self) -> &SecretsSettings;
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Bootstrap {
    vault: VaultSettings,
}

/// Loads `T` from every layer and returns it with a resolver for its secrets.
pub async fn load<T>(sources: &Sources) -> Result<(T, SecretResolver), ConfigError>
where
    T: DeserializeOwned + Serialize + Default + HasSecretSources,
{
    load_with_defaults(T::default(), sources).await
}

/// Like [`load`], with the given defaults as the lowest layer.
pub async fn load_with_defaults<T>(defaults: T, sources: &Sources) -> Result<(T, SecretResolver), ConfigError>
where
    T: DeserializeOwned + Serialize + HasSecretSources,
{
    let mut figment = Figment::from(Serialized::defaults(defaults));
    if let Some(file) = &sources.file {
        if file.exists() {
            figment = figment.merge(Toml::file_exact(file));
        } else if sources.file_required {
            return Err(figment::Error::from(format!("configuration file `{}` does not exist", file.display())).into());
        }
    }
    figment = figment.merge(EnvLayer::new(&sources.env));

    // Vault is configured by the lower layers; its own values override them.
    let bootstrap: Bootstrap = figment.extract()?;
    let vault = VaultAccess::connect(&bootstrap.vault)?;
    if let (Some(access), Some(path)) = (&vault, &bootstrap.vault.config_path) {
        let values = access.read(path).await?;
        figment = figment.merge(VaultLayer { path: format!("{}/{path}", access.mount), values });
    }

    let config: T = figment.extract()?;
    let resolver = SecretResolver::new(vault, config.secrets().file.clone())?;
    Ok((config, resolver))
}

/// `SOCLE_A__B_C=v` → `a.b_c = v`, parsed like figment's own env provider.
struct EnvLayer {
    dict: Dict,
}

impl EnvLayer {
    fn new(vars: &[(String, String)]) -> Self {
        let mut dict = Dict::new();
        for (key, value) in vars {
            let Some(rest) = key.strip_prefix(ENV_PREFIX) else { continue };
            if key == CONFIG_FILE_ENV || rest.is_empty() {
                continue;
            }
            let path = rest.to_ascii_lowercase().replace("__", ".");
            let parsed = Value::from_str(value).expect("infallible");
            let nested = figment::util::nest(&path, parsed).into_dict().expect("non-empty key");
            dict = merge_dicts(dict, nested);
        }
        EnvLayer { dict }
    }
}

fn merge_dicts(mut base: Dict, other: Dict) -> Dict {
    for (k, v) in other {
        match (base.remove(&k), v) {
            (Some(Value::Dict(_, a)), Value::Dict(tag, b)) => {
                base.insert(k, Value::Dict(tag, merge_dicts(a, b)));
            }
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
    base
}

impl Provider for EnvLayer {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named("`SOCLE_*` environment variable").interpolater(|_, keys| {
            format!("{ENV_PREFIX}{}", keys.iter().map(|k| k.to_ascii_uppercase()).collect::<Vec<_>>().join("__"))
        })
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.dict.clone()))
    }
}

struct VaultLayer {
    path: String,
    values: BTreeMap<String, String>,
}

impl Provider for VaultLayer {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named(format!("Vault secret `{}`", self.path))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut dict = Dict::new();
        for (key, value) in &self.values {
            let parsed = Value::from_str(value).expect("infallible");
            let nested = figment::util::nest(key, parsed).into_dict().expect("non-empty key");
            dict = merge_dicts(dict, nested);
        }
        Ok(Profile::Default.collect(dict))
    }
}

struct VaultAccess {
    client: VaultClient,
    mount: String,
    kv_version: u8,
}

impl VaultAccess {
    fn connect(settings: &VaultSettings) -> Result<Option<Self>, ConfigError> {
        let Some(address) = &settings.address else { return Ok(None) };
        let token = settings.token.as_ref().ok_or_else(|| ConfigError::Vault {
            path: address.clone(),
            reason: "vault.address is set but vault.token is not (set SOCLE_VAULT__TOKEN)".into(),
        })?;
        let kv_version = settings.kv_version.unwrap_or(2);
        if kv_version != 1 && kv_version != 2 {
            return Err(figment::Error::from(format!("vault.kv_version must be 1 or 2, not {kv_version}")).into());
        }
        let client_settings = VaultClientSettingsBuilder::default()
            .address(address.as_str())
            .token(token.expose_secret())
            .build()
            .map_err(|e| ConfigError::Vault { path: address.clone(), reason: e.to_string() })?;
        let client = VaultClient::new(client_settings)
            .map_err(|e| ConfigError::Vault { path: address.clone(), reason: e.to_string() })?;
        Ok(Some(VaultAccess { client, mount: settings.mount().to_owned(), kv_version }))
    }

    async fn read(&self, path: &str) -> Result<BTreeMap<String, String>, ConfigError> {
        self.read_at(&self.mount, path).await
    }

    async fn read_at(&self, mount: &str, path: &str) -> Result<BTreeMap<String, String>, ConfigError> {
        let result: Result<HashMap<String, serde_json::Value>, _> = match self.kv_version {
            1 => vaultrs::kv1::get(&self.client, mount, path).await,
            _ => vaultrs::kv2::read(&self.client, mount, path).await,
        };
        let values = result
            .map_err(|e| ConfigError::Vault { path: format!("{mount}/{path}"), reason: describe_vault_error(&e) })?;
        Ok(values
            .into_iter()
            .map(|(k, v)| {
                let v = match v {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                };
                (k, v)
            })
            .collect())
    }
}

/// Vault client errors can embed response bodies; keep only their kind.
fn describe_vault_error(error: &vaultrs::error::ClientError) -> String {
    use vaultrs::error::ClientError as E;
    match error {
        E::APIError { code, .. } if *code == 404 => "not found".into(),
        E::APIError { code, .. } if *code == 403 => "permission denied (check the token and its policy)".into(),
        E::APIError { code, .. } => format!("vault answered HTTP {code}"),
        E::RestClientError { .. } => "vault is unreachable or answered unexpectedly".into(),
        E::JsonParseError { .. } => "unexpected response from vault".into(),
        _ => "vault request failed".into(),
    }
}

/// A reference to a secret, as written in configuration: `vault:<mount>/<path>#<key>`
/// or `file:<key>`. It prints as its locator; the value is only available
/// through a [`SecretResolver`].
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SecretRef(Locator);

#[derive(Clone, PartialEq, Eq)]
enum Locator {
    Vault { mount: String, path: String, key: String },
    File { key: String },
}

impl SecretRef {
    /// Parses a locator.
    pub fn parse(locator: &str) -> Result<Self, String> {
        if let Some(rest) = locator.strip_prefix("vault:") {
            let (location, key) =
                rest.split_once('#').ok_or_else(|| format!("`{locator}`: expected vault:<mount>/<path>#<key>"))?;
            let (mount, path) =
                location.split_once('/').ok_or_else(|| format!("`{locator}`: expected vault:<mount>/<path>#<key>"))?;
            if mount.is_empty() || path.is_empty() || key.is_empty() {
                return Err(format!("`{locator}`: expected vault:<mount>/<path>#<key>"));
            }
            Ok(SecretRef(Locator::Vault { mount: mount.into(), path: path.into(), key: key.into() }))
        } else if let Some(key) = locator.strip_prefix("file:") {
            if key.is_empty() {
                return Err(format!("`{locator}`: expected file:<key>"));
            }
            Ok(SecretRef(Locator::File { key: key.into() }))
        } else {
            Err("a secret must be a locator (`vault:<mount>/<path>#<key>` or `file:<key>`), never a literal value"
                .into())
        }
    }
}

impl TryFrom<String> for SecretRef {
    type Error = String;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        SecretRef::parse(&value)
    }
}

impl From<SecretRef> for String {
    fn from(value: SecretRef) -> Self {
        value.to_string()
    }
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Locator::Vault { mount, path, key } => write!(f, "vault:{mount}/{path}#{key}"),
            Locator::File { key } => write!(f, "file:{key}"),
        }
    }
}

impl fmt::Debug for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretRef({self})")
    }
}

/// Turns [`SecretRef`]s into [`SecretString`]s, once, at start-up.
pub struct SecretResolver {
    vault: Option<VaultAccess>,
    file: Option<(PathBuf, BTreeMap<String, String>)>,
    cache: Mutex<HashMap<(String, String), BTreeMap<String, String>>>,
}

impl fmt::Debug for SecretResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretResolver")
            .field("vault", &self.vault.as_ref().map(|v| &v.mount))
            .field("file", &self.file.as_ref().map(|(p, _)| p))
            .finish()
    }
}

impl SecretResolver {
    fn new(vault: Option<VaultAccess>, file: Option<PathBuf>) -> Result<Self, ConfigError> {
        let file = match file {
            None => None,
            Some(path) => Some((path.clone(), read_secrets_file(&path)?)),
        };
        Ok(SecretResolver { vault, file, cache: Mutex::new(HashMap::new()) })
    }

    /// Resolves one secret.
    pub async fn resolve(&self, secret: &SecretRef) -> Result<SecretString, ConfigError> {
        let missing = |reason: &str| ConfigError::Secret { locator: secret.to_string(), reason: reason.into() };
        match &secret.0 {
            Locator::File { key } => {
                let (_, values) = self.file.as_ref().ok_or_else(|| missing("no secrets.file is configured"))?;
                let value = values.get(key).ok_or_else(|| missing("no such key in the secrets file"))?;
                Ok(SecretString::from(value.clone()))
            }
            Locator::Vault { mount, path, key } => {
                let vault = self.vault.as_ref().ok_or_else(|| missing("no vault.address is configured"))?;
                let cache_key = (mount.clone(), path.clone());
                let cached = self.cache.lock().expect("cache lock").get(&cache_key).cloned();
                let values = match cached {
                    Some(values) => values,
                    None => {
                        let values = vault.read_at(mount, path).await?;
                        self.cache.lock().expect("cache lock").insert(cache_key, values.clone());
                        values
                    }
                };
                let value = values.get(key).ok_or_else(|| missing("no such key at this vault path"))?;
                Ok(SecretString::from(value.clone()))
            }
        }
    }

    /// Resolves an optional secret.
    pub async fn resolve_opt(&self, secret: Option<&SecretRef>) -> Result<Option<SecretString>, ConfigError> {
        match secret {
            None => Ok(None),
            Some(s) => self.resolve(s).await.map(Some),
        }
    }
}

fn read_secrets_file(path: &Path) -> Result<BTreeMap<String, String>, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::SecretsFile { path: path.into(), reason: e.kind().to_string() })?;
    let table: toml::Table = text.parse().map_err(|_| ConfigError::SecretsFile {
        path: path.into(),
        // toml's message quotes the offending line, which may hold a secret.
        reason: "not a valid TOML table".into(),
    })?;
    table
        .into_iter()
        .map(|(k, v)| match v {
            toml::Value::String(s) => Ok((k, s)),
            _ => Err(ConfigError::SecretsFile { path: path.into(), reason: format!("`{k}` must be a string") }),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locators_parse_and_print_without_values() {
        let r = SecretRef::parse("vault:secret/socle/crm#db_password").unwrap();
        assert_eq!(r.to_string(), "vault:secret/socle/crm#db_password");
        assert!(SecretRef::parse("hunter2").unwrap_err().contains("never a literal value"));
        assert!(SecretRef::parse("vault:secret#k").is_err());
        assert!(SecretRef::parse("file:").is_err());
    }

    #[test]
    fn env_keys_nest_on_double_underscore() {
        let layer = EnvLayer::new(&[
            ("SOCLE_DATABASE__MAX_CONNECTIONS".into(), "20".into()),
            ("SOCLE_DATABASE__URL".into(), "postgres://x".into()),
            ("OTHER".into(), "1".into()),
        ]);
        let Value::Dict(_, db) = &layer.dict["database"] else { panic!("not a dict") };
        assert_eq!(db["max_connections"].to_u128(), Some(20));
        assert_eq!(db["url"].as_str(), Some("postgres://x"));
        assert!(!layer.dict.contains_key("other"));
    }
}

//! REST routes built from the `(socle.api.v1.http)` options of every RPC
//! found in the descriptor pool.

use std::collections::BTreeMap;

use prost_reflect::{Cardinality, DescriptorPool, FieldDescriptor, Kind, MethodDescriptor};
use socle_proto::options::{HttpRule, Pattern, access_rule, http_rule};

/// One segment of a path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Must equal this text.
    Literal(String),
    /// Binds the segment to a top-level request field.
    Variable(String),
}

/// A parsed path template such as `/api/v1/widgets/{widget_id}:polish`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    /// The template as written.
    pub text: String,
    /// Its segments.
    pub segments: Vec<Segment>,
    /// The custom verb after the last `:`, if any.
    pub verb: Option<String>,
}

impl PathTemplate {
    /// Parses a template.
    pub fn parse(text: &str) -> Result<Self, String> {
        let path = text.strip_prefix('/').ok_or_else(|| format!("`{text}` must start with `/`"))?;
        // The verb is after a `:` in the last segment, outside any `{...}`.
        let (path, verb) = match path.rfind(':') {
            Some(i) if !path[i..].contains('}') && !path[i..].contains('/') => {
                (&path[..i], Some(path[i + 1..].to_owned()))
            }
            _ => (path, None),
        };
        let mut segments = Vec::new();
        for raw in path.split('/') {
            if raw.is_empty() {
                return Err(format!("`{text}` has an empty segment"));
            }
            if let Some(name) = raw.strip_prefix('{').and_then(|r| r.strip_suffix('}')) {
                if name.is_empty() || name.contains(['.', '=', '*']) {
                    return Err(format!("`{text}`: only `{{field}}` variables of top-level fields are supported"));
                }
                segments.push(Segment::Variable(name.to_owned()));
            } else if raw.contains(['{', '}', '*']) {
                return Err(format!("`{text}`: unsupported segment `{raw}`"));
            } else {
                segments.push(Segment::Literal(raw.to_owned()));
            }
        }
        Ok(PathTemplate { text: text.to_owned(), segments, verb })
    }

    /// Matches a request path, returning the (percent-decoded) variables.
    pub fn matches(&self, path: &str) -> Option<Vec<(String, String)>> {
        let path = path.strip_prefix('/')?;
        let (path, verb) = match (&self.verb, path.rfind(':')) {
            (Some(_), Some(i)) if !path[i..].contains('/') => (&path[..i], Some(&path[i + 1..])),
            (Some(_), _) => return None,
            (None, _) => (path, None),
        };
        if verb != self.verb.as_deref() {
            return None;
        }
        let mut parts = path.split('/');
        let mut vars = Vec::new();
        for segment in &self.segments {
            let part = parts.next()?;
            match segment {
                Segment::Literal(lit) => {
                    if part != lit {
                        return None;
                    }
                }
                Segment::Variable(name) => {
                    if part.is_empty() {
                        return None;
                    }
                    vars.push((name.clone(), percent_decode(part)?));
                }
            }
        }
        parts.next().is_none().then_some(vars)
    }

    /// The template with variables renamed to their JSON names, for OpenAPI.
    pub fn openapi_path(&self, method: &MethodDescriptor) -> String {
        let mut out = String::new();
        for segment in &self.segments {
            out.push('/');
            match segment {
                Segment::Literal(lit) => out.push_str(lit),
                Segment::Variable(name) => {
                    let json = method
                        .input()
                        .get_field_by_name(name)
                        .map(|f| f.json_name().to_owned())
                        .unwrap_or_else(|| name.clone());
                    out.push('{');
                    out.push_str(&json);
                    out.push('}');
                }
            }
        }
        if let Some(verb) = &self.verb {
            out.push(':');
            out.push_str(verb);
        }
        out
    }

    /// The names of the bound fields.
    pub fn variables(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Variable(name) => Some(name.as_str()),
            Segment::Literal(_) => None,
        })
    }
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Where the HTTP body goes in the request message.
#[derive(Debug, Clone)]
pub enum BodyRule {
    /// No body.
    None,
    /// The whole request message (minus path variables).
    All,
    /// One message field.
    Field(FieldDescriptor),
}

/// A REST route to an RPC.
#[derive(Debug, Clone)]
pub struct Route {
    /// The HTTP verb.
    pub verb: http::Method,
    /// The path template.
    pub template: PathTemplate,
    /// The RPC.
    pub method: MethodDescriptor,
    /// The body binding.
    pub body: BodyRule,
    /// The response field returned as the body, if not the whole response.
    pub response_body: Option<FieldDescriptor>,
    /// Whether the RPC is public (OpenAPI security).
    pub public: bool,
    /// The permission declared, if any (OpenAPI extension).
    pub permission: Option<String>,
}

impl Route {
    /// The gRPC path of the RPC.
    pub fn grpc_path(&self) -> String {
        format!("/{}/{}", self.method.parent_service().full_name(), self.method.name())
    }
}

/// An HTTP rule given in configuration for an RPC whose proto we do not own
/// (like `grpc.health.v1.Health.Check`), in the spirit of the `http.rules`
/// of a Google service configuration.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtraHttpRule {
    /// The RPC, `package.Service.Method`.
    pub selector: String,
    /// Verb: `get`, `post`, `put`, `patch` or `delete`.
    pub verb: String,
    /// Path template.
    pub path: String,
    /// Body binding (`*`, a field, or empty).
    #[serde(default)]
    pub body: String,
    /// Whether callable without credentials.
    #[serde(default)]
    pub public: bool,
}

/// Every REST route, in declaration order.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
}

/// The outcome of matching a request.
pub enum Match<'a> {
    /// A route and its path variables.
    Found(&'a Route, Vec<(String, String)>),
    /// The path exists with other verbs.
    WrongVerb(Vec<http::Method>),
    /// Nothing matches.
    NotFound,
}

impl RouteTable {
    /// Builds the table from every RPC of `pool` that has an HTTP rule, plus
    /// `extra` rules. Fails on malformed or conflicting rules: a contract
    /// error must stop the edge at start-up, not surface at call time.
    pub fn build(pool: &DescriptorPool, extra: &[ExtraHttpRule]) -> Result<Self, String> {
        let mut routes = Vec::new();
        for service in pool.services() {
            for method in service.methods() {
                let Some(rule) = http_rule(&method) else { continue };
                let access = access_rule(&method);
                let public = access.as_ref().is_some_and(|a| a.public);
                let permission = access.map(|a| a.permission).filter(|p| !p.is_empty());
                routes.push(route(&method, &rule, public, permission)?);
            }
        }
        for rule in extra {
            let (service, name) = rule
                .selector
                .rsplit_once('.')
                .ok_or_else(|| format!("http rule selector `{}` is not `Service.Method`", rule.selector))?;
            let method = pool
                .get_service_by_name(service)
                .and_then(|s| s.methods().find(|m| m.name() == name))
                .ok_or_else(|| format!("http rule selector `{}` names no known RPC", rule.selector))?;
            let pattern = match rule.verb.to_ascii_lowercase().as_str() {
                "get" => Pattern::Get(rule.path.clone()),
                "post" => Pattern::Post(rule.path.clone()),
                "put" => Pattern::Put(rule.path.clone()),
                "patch" => Pattern::Patch(rule.path.clone()),
                "delete" => Pattern::Delete(rule.path.clone()),
                other => return Err(format!("http rule `{}`: unknown verb `{other}`", rule.selector)),
            };
            let http = HttpRule { pattern: Some(pattern), body: rule.body.clone(), response_body: String::new() };
            routes.push(route(&method, &http, rule.public, None)?);
        }
        // Custom verbs and literal segments win over variables: such
        // templates are tried first (`/x/{id}:verb` before `/x/{id}`).
        routes.sort_by_key(|r| {
            let literals = r.template.segments.iter().filter(|s| matches!(s, Segment::Literal(_))).count();
            std::cmp::Reverse((r.template.verb.is_some(), literals))
        });
        let mut seen = BTreeMap::new();
        for r in &routes {
            let key = (r.verb.to_string(), r.template.openapi_path(&r.method));
            if let Some(previous) = seen.insert(key, r.grpc_path()) {
                return Err(format!(
                    "{} {} is bound to both {previous} and {}",
                    r.verb,
                    r.template.text,
                    r.grpc_path()
                ));
            }
        }
        Ok(RouteTable { routes })
    }

    /// Finds the route for a request.
    pub fn find(&self, verb: &http::Method, path: &str) -> Match<'_> {
        let mut other_verbs = Vec::new();
        for route in &self.routes {
            if let Some(vars) = route.template.matches(path) {
                if route.verb == verb {
                    return Match::Found(route, vars);
                }
                other_verbs.push(route.verb.clone());
            }
        }
        if other_verbs.is_empty() { Match::NotFound } else { Match::WrongVerb(other_verbs) }
    }

    /// Every route.
    pub fn iter(&self) -> impl Iterator<Item = &Route> {
        self.routes.iter()
    }
}

fn route(
    method: &MethodDescriptor,
    rule: &HttpRule,
    public: bool,
    permission: Option<String>,
) -> Result<Route, String> {
    let rpc = method.full_name();
    let (verb, path) = match rule.pattern.as_ref() {
        Some(Pattern::Get(p)) => (http::Method::GET, p),
        Some(Pattern::Post(p)) => (http::Method::POST, p),
        Some(Pattern::Put(p)) => (http::Method::PUT, p),
        Some(Pattern::Patch(p)) => (http::Method::PATCH, p),
        Some(Pattern::Delete(p)) => (http::Method::DELETE, p),
        None => return Err(format!("{rpc}: http rule without a verb")),
    };
    let template = PathTemplate::parse(path).map_err(|e| format!("{rpc}: {e}"))?;
    let input = method.input();
    for var in template.variables() {
        let field = input
            .get_field_by_name(var)
            .ok_or_else(|| format!("{rpc}: path variable `{var}` is not a field of {}", input.full_name()))?;
        if field.cardinality() == Cardinality::Repeated || matches!(field.kind(), Kind::Message(_)) {
            return Err(format!("{rpc}: path variable `{var}` must be a scalar field"));
        }
    }
    let body = match rule.body.as_str() {
        "" => BodyRule::None,
        "*" => BodyRule::All,
        name => {
            let field = input
                .get_field_by_name(name)
                .ok_or_else(|| format!("{rpc}: body field `{name}` is not a field of {}", input.full_name()))?;
            BodyRule::Field(field)
        }
    };
    if matches!(verb, http::Method::GET | http::Method::DELETE) && !matches!(body, BodyRule::None) {
        return Err(format!("{rpc}: {verb} cannot have a body"));
    }
    if method.is_client_streaming() {
        // An upload: the raw HTTP body is streamed into a bytes field.
        let is_bytes = matches!(&body, BodyRule::Field(f) if f.kind() == Kind::Bytes && !f.is_list());
        if !is_bytes {
            return Err(format!("{rpc}: a client-streaming RPC needs `body` naming a bytes field (the upload)"));
        }
    }
    let response_body = match rule.response_body.as_str() {
        "" => None,
        name => Some(
            method
                .output()
                .get_field_by_name(name)
                .ok_or_else(|| format!("{rpc}: response_body `{name}` is not a field of the response"))?,
        ),
    };
    Ok(Route { verb, template, method: method.clone(), body, response_body, public, permission })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_match_variables_and_verbs() {
        let t = PathTemplate::parse("/api/v1/widgets/{widget_id}:polish").unwrap();
        assert_eq!(t.matches("/api/v1/widgets/abc:polish"), Some(vec![("widget_id".into(), "abc".into())]));
        assert_eq!(t.matches("/api/v1/widgets/abc"), None);
        assert_eq!(t.matches("/api/v1/widgets/abc:other"), None);
        let plain = PathTemplate::parse("/api/v1/widgets/{widget_id}").unwrap();
        assert_eq!(plain.matches("/api/v1/widgets/a%20b"), Some(vec![("widget_id".into(), "a b".into())]));
        assert_eq!(plain.matches("/api/v1/widgets/a/b"), None);
        assert_eq!(plain.matches("/api/v1/widgets/"), None);
        assert!(PathTemplate::parse("/api/{a.b}").is_err());
        assert!(PathTemplate::parse("api").is_err());
    }
}

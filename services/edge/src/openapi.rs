//! OpenAPI 3.1, generated from the same descriptors as the routes: one
//! operation per REST route, schemas following the proto3 JSON mapping,
//! descriptions from the proto comments, problem+json errors.

use std::collections::{BTreeMap, BTreeSet};

use prost_reflect::{Cardinality, DescriptorPool, FieldDescriptor, Kind, MessageDescriptor};
use serde_json::{Value as Json, json};

use crate::routes::{BodyRule, Route, RouteTable};

/// Leading comments by (file name, source path).
struct Comments {
    by_location: BTreeMap<(String, Vec<i32>), String>,
}

impl Comments {
    fn new(pool: &DescriptorPool) -> Self {
        let mut by_location = BTreeMap::new();
        for file in pool.files() {
            let proto = file.file_descriptor_proto();
            let Some(info) = &proto.source_code_info else { continue };
            for location in &info.location {
                if let Some(text) = &location.leading_comments {
                    let text = text.lines().map(str::trim).collect::<Vec<_>>().join("\n").trim().to_owned();
                    if !text.is_empty() {
                        by_location.insert((proto.name().to_owned(), location.path.clone()), text);
                    }
                }
            }
        }
        Comments { by_location }
    }

    fn get(&self, file: &str, path: &[i32]) -> Option<&str> {
        self.by_location.get(&(file.to_owned(), path.to_vec())).map(String::as_str)
    }

    fn message(&self, m: &MessageDescriptor) -> Option<&str> {
        self.get(m.parent_file().name(), m.path())
    }

    fn field(&self, f: &FieldDescriptor) -> Option<&str> {
        self.get(f.parent_file().name(), f.path())
    }
}

/// Builds the OpenAPI document.
pub fn document(pool: &DescriptorPool, routes: &RouteTable, title: &str, version: &str) -> Json {
    let comments = Comments::new(pool);
    let mut paths: BTreeMap<String, serde_json::Map<String, Json>> = BTreeMap::new();
    let mut needed: BTreeSet<String> = BTreeSet::new();
    let mut tags: BTreeSet<String> = BTreeSet::new();
    for route in routes.iter() {
        let path = route.template.openapi_path(&route.method);
        let operation = operation(route, &comments, &mut needed);
        tags.insert(route.method.parent_service().full_name().to_owned());
        paths.entry(path).or_default().insert(route.verb.as_str().to_ascii_lowercase(), operation);
    }

    let mut schemas = serde_json::Map::new();
    schemas.insert("Problem".into(), problem_schema());
    let mut queue: Vec<String> = needed.into_iter().collect();
    let mut done = BTreeSet::new();
    while let Some(name) = queue.pop() {
        if !done.insert(name.clone()) {
            continue;
        }
        if let Some(message) = pool.get_message_by_name(&name) {
            let mut refs = BTreeSet::new();
            schemas.insert(name.clone(), message_schema(&message, &comments, &mut refs));
            queue.extend(refs.into_iter().filter(|r| !done.contains(r)));
        }
    }

    let tag_list: Vec<Json> = tags
        .iter()
        .map(|t| {
            let description = pool
                .get_service_by_name(t)
                .and_then(|s| comments.get(s.parent_file().name(), s.path()).map(str::to_owned))
                .unwrap_or_default();
            json!({ "name": t, "description": description })
        })
        .collect();

    json!({
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": version,
            "description": "Generated from the Socle protobuf contracts. Errors are RFC 9457 problem documents; \
                            int64 values are strings, enums are names, timestamps are RFC 3339."
        },
        "servers": [{ "url": "/" }],
        "tags": tag_list,
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearerAuth": { "type": "http", "scheme": "bearer", "bearerFormat": "JWT" }
            }
        }
    })
}

fn operation(route: &Route, comments: &Comments, needed: &mut BTreeSet<String>) -> Json {
    let method = &route.method;
    let input = method.input();
    let description = comments.get(method.parent_file().name(), method.path()).unwrap_or("");
    let summary = description.lines().next().unwrap_or(method.name()).to_owned();
    let bound: BTreeSet<&str> = route.template.variables().collect();
    let mut parameters = Vec::new();
    for var in route.template.variables() {
        if let Some(field) = input.get_field_by_name(var) {
            parameters.push(json!({
                "name": field.json_name(),
                "in": "path",
                "required": true,
                "description": comments.field(&field).unwrap_or(""),
                "schema": field_schema(&field, &mut BTreeSet::new()),
            }));
        }
    }
    // Query parameters: every field not bound to the path or the body.
    let body_field = match &route.body {
        BodyRule::Field(f) => Some(f.name().to_owned()),
        _ => None,
    };
    if !matches!(route.body, BodyRule::All) {
        for field in input.fields() {
            if bound.contains(field.name()) || field.is_map() || body_field.as_deref() == Some(field.name()) {
                continue;
            }
            if let Kind::Message(m) = field.kind()
                && !is_string_like(&m)
            {
                continue;
            }
            let mut schema = field_schema(&field, &mut BTreeSet::new());
            if field.cardinality() == Cardinality::Repeated {
                schema = json!({ "type": "array", "items": scalar_schema(&field, &mut BTreeSet::new()) });
            }
            parameters.push(json!({
                "name": field.json_name(),
                "in": "query",
                "required": false,
                "description": comments.field(&field).unwrap_or(""),
                "schema": schema,
            }));
        }
    }
    let mut op = serde_json::Map::new();
    op.insert("operationId".into(), json!(format!("{}_{}", method.parent_service().name(), method.name())));
    op.insert("summary".into(), json!(summary));
    op.insert("description".into(), json!(description));
    op.insert("tags".into(), json!([method.parent_service().full_name()]));
    op.insert("parameters".into(), Json::Array(parameters));
    op.insert("x-grpc-method".into(), json!(route.grpc_path()));
    if let Some(permission) = &route.permission {
        op.insert("x-socle-permission".into(), json!(permission));
    }
    if route.public {
        op.insert("security".into(), json!([]));
    } else {
        op.insert("security".into(), json!([{ "bearerAuth": [] }]));
    }
    match &route.body {
        BodyRule::None => {}
        BodyRule::All => {
            needed.insert(input.full_name().to_owned());
            op.insert(
                "requestBody".into(),
                json!({ "required": true, "content": { "application/json": { "schema": reference(input.full_name()) } } }),
            );
        }
        // An upload: the raw body is streamed into the bytes field.
        BodyRule::Field(field) if method.is_client_streaming() => {
            let description = comments.field(field).unwrap_or("The file.");
            op.insert(
                "requestBody".into(),
                json!({ "required": true, "description": description, "content": {
                    "application/octet-stream": { "schema": { "type": "string", "contentMediaType": "application/octet-stream" } }
                } }),
            );
        }
        BodyRule::Field(field) => {
            let schema = field_schema(field, needed);
            op.insert(
                "requestBody".into(),
                json!({ "required": true, "content": { "application/json": { "schema": schema } } }),
            );
        }
    }
    let raw_download =
        method.is_server_streaming() && route.response_body.as_ref().is_some_and(|f| f.kind() == Kind::Bytes);
    let output = match &route.response_body {
        Some(field) => field_schema(field, needed),
        None => {
            needed.insert(method.output().full_name().to_owned());
            reference(method.output().full_name())
        }
    };
    let (content_type, schema) = if raw_download {
        // The media type is chosen by the service (its `content_type` field).
        ("*/*", json!({ "type": "string", "contentMediaType": "application/octet-stream" }))
    } else if method.is_server_streaming() {
        ("application/x-ndjson", output)
    } else {
        ("application/json", output)
    };
    let problem = json!({ "application/problem+json": { "schema": { "$ref": "#/components/schemas/Problem" } } });
    op.insert(
        "responses".into(),
        json!({
            "200": { "description": "OK", "content": { content_type: { "schema": schema } } },
            "400": { "description": "Invalid request (field violations)", "content": problem.clone() },
            "401": { "description": "Unauthenticated", "content": problem.clone() },
            "403": { "description": "Permission denied", "content": problem.clone() },
            "404": { "description": "Not found", "content": problem.clone() },
            "default": { "description": "Error", "content": problem },
        }),
    );
    Json::Object(op)
}

fn reference(name: &str) -> Json {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

fn is_string_like(message: &MessageDescriptor) -> bool {
    matches!(
        message.full_name(),
        "google.protobuf.Timestamp" | "google.protobuf.Duration" | "google.protobuf.FieldMask"
    ) || message.full_name().ends_with("Value")
        && message.package_name() == "google.protobuf"
        && !matches!(message.full_name(), "google.protobuf.Value" | "google.protobuf.ListValue")
}

fn message_schema(message: &MessageDescriptor, comments: &Comments, refs: &mut BTreeSet<String>) -> Json {
    let mut properties = serde_json::Map::new();
    for field in message.fields() {
        let mut schema = field_schema(&field, refs);
        if let (Some(text), Json::Object(map)) = (comments.field(&field), &mut schema)
            && !map.contains_key("$ref")
        {
            map.insert("description".into(), json!(text));
        }
        if let Some(text) = comments.field(&field) {
            if schema.get("$ref").is_some() {
                schema = json!({ "allOf": [schema], "description": text });
            }
            if text.contains("Output only")
                && let Json::Object(map) = &mut schema
            {
                map.insert("readOnly".into(), json!(true));
            }
        }
        properties.insert(field.json_name().to_owned(), schema);
    }
    json!({
        "type": "object",
        "description": comments.message(message).unwrap_or(""),
        "properties": properties,
        "additionalProperties": false,
    })
}

fn field_schema(field: &FieldDescriptor, refs: &mut BTreeSet<String>) -> Json {
    if field.is_map() {
        let Kind::Message(entry) = field.kind() else { unreachable!("map fields are messages") };
        let value = entry.map_entry_value_field();
        return json!({ "type": "object", "additionalProperties": scalar_schema(&value, refs) });
    }
    let item = scalar_schema(field, refs);
    if field.cardinality() == Cardinality::Repeated { json!({ "type": "array", "items": item }) } else { item }
}

fn scalar_schema(field: &FieldDescriptor, refs: &mut BTreeSet<String>) -> Json {
    match field.kind() {
        Kind::Double | Kind::Float => json!({ "type": "number" }),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => json!({ "type": "integer", "format": "int32" }),
        Kind::Uint32 | Kind::Fixed32 => json!({ "type": "integer", "format": "int64", "minimum": 0 }),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => json!({ "type": "string", "format": "int64" }),
        Kind::Uint64 | Kind::Fixed64 => json!({ "type": "string", "format": "uint64" }),
        Kind::Bool => json!({ "type": "boolean" }),
        Kind::String => json!({ "type": "string" }),
        Kind::Bytes => json!({ "type": "string", "contentEncoding": "base64" }),
        Kind::Enum(e) => {
            json!({ "type": "string", "enum": e.values().map(|v| v.name().to_owned()).collect::<Vec<_>>() })
        }
        Kind::Message(m) => match m.full_name() {
            "google.protobuf.Timestamp" => json!({ "type": "string", "format": "date-time" }),
            "google.protobuf.Duration" => json!({ "type": "string", "pattern": "^-?[0-9]+(\\.[0-9]+)?s$" }),
            "google.protobuf.FieldMask" => {
                json!({ "type": "string", "description": "Comma-separated field paths (camelCase)." })
            }
            "google.protobuf.Empty" => json!({ "type": "object" }),
            "google.protobuf.Struct" => json!({ "type": "object" }),
            "google.protobuf.Value" => json!({}),
            "google.protobuf.ListValue" => json!({ "type": "array" }),
            "google.protobuf.Any" => json!({ "type": "object", "properties": { "@type": { "type": "string" } } }),
            "google.protobuf.StringValue" => json!({ "type": ["string", "null"] }),
            "google.protobuf.BoolValue" => json!({ "type": ["boolean", "null"] }),
            "google.protobuf.Int32Value" | "google.protobuf.UInt32Value" => json!({ "type": ["integer", "null"] }),
            "google.protobuf.Int64Value" | "google.protobuf.UInt64Value" => json!({ "type": ["string", "null"] }),
            "google.protobuf.DoubleValue" | "google.protobuf.FloatValue" => json!({ "type": ["number", "null"] }),
            "google.protobuf.BytesValue" => json!({ "type": ["string", "null"] }),
            name => {
                refs.insert(name.to_owned());
                reference(name)
            }
        },
    }
}

fn problem_schema() -> Json {
    json!({
        "type": "object",
        "description": "An RFC 9457 problem document.",
        "required": ["type", "title", "status", "detail", "code"],
        "properties": {
            "type": { "type": "string", "description": "A URI naming the problem type." },
            "title": { "type": "string" },
            "status": { "type": "integer" },
            "detail": { "type": "string" },
            "code": { "type": "string", "description": "The gRPC status code name." },
            "reason": { "type": "string", "description": "A machine-readable reason, e.g. ETAG_MISMATCH." },
            "requestId": { "type": "string" },
            "details": {
                "type": "array",
                "description": "Service-specific details in proto3 JSON, each with its `@type`.",
                "items": { "type": "object", "properties": { "@type": { "type": "string" } } }
            },
            "violations": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["field", "description"],
                    "properties": { "field": { "type": "string" }, "description": { "type": "string" } }
                }
            }
        }
    })
}

/// A self-contained HTML page listing every operation, for humans.
pub fn docs_page(document: &Json) -> String {
    let esc = |s: &str| s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    let mut by_tag: BTreeMap<String, Vec<(String, String, &Json)>> = BTreeMap::new();
    if let Some(paths) = document["paths"].as_object() {
        for (path, ops) in paths {
            for (verb, op) in ops.as_object().into_iter().flatten() {
                let tag = op["tags"][0].as_str().unwrap_or("other").to_owned();
                by_tag.entry(tag).or_default().push((verb.to_uppercase(), path.clone(), op));
            }
        }
    }
    let mut html = String::from(
        "<!doctype html><html lang=\"fr\"><head><meta charset=\"utf-8\"><title>Socle — API REST</title>\
         <style>body{font-family:system-ui,sans-serif;max-width:70rem;margin:2rem auto;padding:0 1rem;color:#222}\
         h2{border-bottom:1px solid #ccc;padding-bottom:.3rem;margin-top:2rem}code{background:#f4f4f4;padding:.1rem .3rem}\
         .op{margin:.6rem 0}.verb{display:inline-block;min-width:4.5rem;font-weight:bold}\
         .perm{color:#666;font-size:.9em}</style></head><body>\
         <h1>Socle — API REST v1</h1><p>Documentation générée depuis les contrats protobuf. \
         Spécification machine : <a href=\"/api/v1/openapi.json\"><code>/api/v1/openapi.json</code></a>. \
         Les erreurs suivent la RFC 9457 (<code>application/problem+json</code>).</p>",
    );
    for (tag, ops) in by_tag {
        html.push_str(&format!("<h2>{}</h2>", esc(&tag)));
        for (verb, path, op) in ops {
            let permission =
                op["x-socle-permission"].as_str().map(|p| format!(" — permission <code>{}</code>", esc(p)));
            let public = op["security"].as_array().is_some_and(Vec::is_empty);
            html.push_str(&format!(
                "<div class=\"op\"><span class=\"verb\">{}</span><code>{}</code><br>{}<span class=\"perm\">{}{}</span></div>",
                esc(&verb),
                esc(&path),
                esc(op["summary"].as_str().unwrap_or("")),
                permission.unwrap_or_default(),
                if public { " — public" } else { "" },
            ));
        }
    }
    html.push_str("</body></html>");
    html
}

//! `GET /openapi.json`: an OpenAPI 3.1 description of every door exactly as it behaves:
//! what each accepts (the original door's lax values included, as patterns its parser
//! shares), every status it can answer, and its bodies. `tests/it/openapi.rs` runs
//! schemathesis against it with all its checks.

use std::sync::OnceLock;

use axum::Json;
use serde_json::{json, Value};

/// The original door's `max_tokens` as a string: digits for 1 ..= 4294967295, with an
/// optional `+`, leading zeros, and ASCII spaces around (`schema::lax_int`).
const MAX_TOKENS_STRING: &str = r"^[ \t\n\r]*\+?0*([1-9][0-9]{0,8}|[1-3][0-9]{9}|4[01][0-9]{8}|42[0-8][0-9]{7}|429[0-3][0-9]{6}|4294[0-8][0-9]{5}|42949[0-5][0-9]{4}|429496[0-6][0-9]{3}|4294967[01][0-9]{2}|42949672[0-8][0-9]|429496729[0-5])[ \t\n\r]*$";

/// The original door's `temperature` as a string: a plain decimal from 0 to 2
/// (`schema::is_plain_decimal`, then the range).
const TEMPERATURE_STRING: &str =
    r"^[ \t\n\r]*\+?(0*([01](\.[0-9]*)?|\.[0-9]+)|0*2(\.0*)?)[ \t\n\r]*$";

/// The original door's `stream` as a string: the words pydantic reads as booleans.
const STREAM_STRING: &str = r"^[ \t\n\r]*(0|1|[oO][nN]|[oO][fF][fF]|[tT]|[fF]|[tT][rR][uU][eE]|[fF][aA][lL][sS][eE]|[yY]|[nN]|[yY][eE][sS]|[nN][oO])[ \t\n\r]*$";

/// The largest `max_tokens` any door takes.
const MAX_TOKENS: u64 = u32::MAX as u64;

fn response(description: &str, schema: &str) -> Value {
    json!({
        "description": description,
        "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{schema}") } } }
    })
}

/// The statuses every chat operation of a door can answer besides 200, with its error
/// schema.
fn errors(schema: &str, invalid: (&str, &str)) -> Value {
    let mut responses = json!({
        "401": response("Invalid or missing API key", schema),
        "404": response("No such route, or (SDK doors) model", schema),
        "405": response("Wrong method", schema),
        "408": response("The body did not arrive within BODY_READ_TIMEOUT_SECONDS", schema),
        "413": response("Body larger than MAX_BODY_BYTES", schema),
        "429": response("Rate limited; see Retry-After and retry-after-ms", schema),
        "502": response("The provider failed after its retries", schema),
        "503": response("Rate limiter failing closed, or too many requests in flight", schema),
        "504": response("The provider timed out", schema),
    });
    responses["400"] = response("The body could not be read", schema);
    responses[invalid.0] = response("The body fails the schema", invalid.1);
    responses
}

fn chat_operation(
    summary: &str,
    security: Value,
    request: &str,
    answer: Value,
    error: &str,
    invalid: (&str, &str),
) -> Value {
    let mut responses = errors(error, invalid);
    responses["200"] = answer;
    json!({
        "summary": summary,
        "security": security,
        "requestBody": {
            "required": true,
            "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{request}") } } }
        },
        "responses": responses,
    })
}

/// A 200 that is JSON, or server-sent events when the request asked for a stream.
fn answer_or_stream(schema: &str) -> Value {
    json!({
        "description": "The answer; a stream of server-sent events when `stream` is true. Carries X-Cache and the rate-limit headers.",
        "content": {
            "application/json": { "schema": { "$ref": format!("#/components/schemas/{schema}") } },
            "text/event-stream": { "schema": {
                "description": "Each event: its name (`event`) and its JSON (`data`).",
                "type": "object",
                "properties": { "event": { "type": "string" }, "data": { "type": "string" } }
            } }
        }
    })
}

fn nullable(kind: &str) -> Value {
    json!([kind, "null"])
}

/// The schemas of tool calling, both dialects.
fn tool_schemas(function_name: &Value) -> Value {
    json!({
        "OpenAIToolCall": {
            "type": "object", "required": ["id", "type", "function"],
            "properties": {
                "id": { "type": "string", "minLength": 1 },
                "type": { "const": "function" },
                "function": { "type": "object", "required": ["name", "arguments"], "properties": {
                    "name": function_name, "arguments": { "type": "string" } } }
            }
        },
        "OpenAITool": {
            "type": "object", "required": ["type", "function"],
            "properties": {
                "type": { "const": "function" },
                "function": { "type": "object", "required": ["name"], "properties": {
                    "name": function_name,
                    "description": { "type": nullable("string") },
                    "parameters": { "type": nullable("object") },
                    "strict": { "type": nullable("boolean") }
                } }
            }
        },
        "AnthropicTool": {
            "type": "object", "required": ["name", "input_schema"], "additionalProperties": false,
            "properties": {
                "type": { "enum": ["custom", null] },
                "name": function_name,
                "description": { "type": nullable("string") },
                "input_schema": { "type": "object" },
                "cache_control": {}
            }
        },
        "ToolUseBlock": {
            "type": "object", "required": ["type", "id", "name", "input"],
            "properties": {
                "type": { "const": "tool_use" },
                "id": { "type": "string", "minLength": 1 },
                "name": function_name,
                "input": { "type": "object" }
            }
        },
        "ToolResultBlock": {
            "type": "object", "required": ["type", "tool_use_id"],
            "properties": {
                "type": { "const": "tool_result" },
                "tool_use_id": { "type": "string" },
                "content": { "anyOf": [
                    { "type": "null" },
                    { "type": "string" },
                    { "type": "array", "items": { "$ref": "#/components/schemas/TextPart" } }
                ] },
                "is_error": { "type": nullable("boolean") }
            }
        }
    })
}

fn schemas() -> Value {
    // The pattern generates names; the `not` keeps out a trailing newline, which `$`
    // lets through in some regex engines (Python's among them) and the doors refuse.
    let function_name = json!({
        "type": "string", "pattern": "^[a-zA-Z0-9_-]{1,64}$",
        "not": { "pattern": "[^a-zA-Z0-9_-]" }
    });
    let text_part = json!({
        "type": "object", "required": ["type", "text"],
        "properties": { "type": { "const": "text" }, "text": { "type": "string" } }
    });
    let usage = json!({
        "type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
        "properties": {
            "prompt_tokens": { "type": "integer" },
            "completion_tokens": { "type": "integer" },
            "total_tokens": { "type": "integer" }
        }
    });
    let mut schemas = json!({
        "Message": {
            "type": "object", "required": ["role", "content"],
            "properties": { "role": { "type": "string" }, "content": { "type": "string" } }
        },
        "ChatRequest": {
            "type": "object", "required": ["messages"],
            "description": "Unknown fields are ignored; null means the default. Numbers and booleans are also taken in pydantic's lax forms.",
            "properties": {
                "messages": { "type": "array", "minItems": 1, "items": { "$ref": "#/components/schemas/Message" } },
                "model": { "type": nullable("string") },
                "model_hint": { "type": nullable("string") },
                "max_tokens": { "default": 512, "anyOf": [
                    { "type": "integer", "minimum": 1, "maximum": MAX_TOKENS },
                    { "type": "string", "pattern": MAX_TOKENS_STRING },
                    { "type": "null" }
                ] },
                "temperature": { "default": 0.7, "anyOf": [
                    { "type": "number", "minimum": 0, "maximum": 2 },
                    { "type": "string", "pattern": TEMPERATURE_STRING },
                    { "type": "null" }
                ] },
                "stream": { "default": false, "description": "Accepted; this door always answers whole.", "anyOf": [
                    { "type": "boolean" },
                    { "type": "integer", "enum": [0, 1] },
                    { "type": "string", "pattern": STREAM_STRING },
                    { "type": "null" }
                ] }
            }
        },
        "Usage": usage,
        "ChatResponse": {
            "type": "object", "required": ["id", "provider", "content", "usage"],
            "properties": {
                "id": { "type": "string", "format": "uuid" },
                "provider": { "type": "string", "description": "The provider that answered: `ollama` or `gemini` by default, else a name of the registry" },
                "content": { "type": "string" },
                "usage": { "$ref": "#/components/schemas/Usage" }
            }
        },
        "Error": {
            "type": "object", "required": ["detail"],
            "properties": { "detail": { "type": "string" } }
        },
        "ValidationError": {
            "type": "object", "required": ["detail"],
            "properties": { "detail": { "type": "array", "items": {
                "type": "object", "required": ["type", "loc", "msg"],
                "properties": {
                    "type": { "type": "string" },
                    "loc": { "type": "array", "items": {} },
                    "msg": { "type": "string" }
                }
            } } }
        },
        "OpenAIMessage": { "anyOf": [
            { "$ref": "#/components/schemas/OpenAIPromptMessage" },
            { "$ref": "#/components/schemas/OpenAIAssistantMessage" },
            { "$ref": "#/components/schemas/OpenAIToolMessage" }
        ] },
        "OpenAIContent": { "anyOf": [
            { "type": "string" },
            { "type": "array", "items": { "$ref": "#/components/schemas/TextPart" } }
        ] },
        "OpenAIPromptMessage": {
            "type": "object", "required": ["role", "content"],
            "properties": {
                "role": { "enum": ["system", "developer", "user"] },
                "content": { "$ref": "#/components/schemas/OpenAIContent" },
                "tool_calls": { "anyOf": [{ "type": "null" }, { "type": "array", "maxItems": 0 }] }
            }
        },
        "OpenAIAssistantMessage": {
            "type": "object", "required": ["role"],
            "description": "Text, tool calls, or both. Each call's `arguments` is a JSON object as text (empty counts as {}).",
            "properties": {
                "role": { "const": "assistant" },
                "content": { "anyOf": [{ "type": "null" }, { "$ref": "#/components/schemas/OpenAIContent" }] },
                "tool_calls": { "anyOf": [{ "type": "null" }, { "type": "array", "items": { "$ref": "#/components/schemas/OpenAIToolCall" } }] }
            },
            "anyOf": [
                { "required": ["content"], "properties": { "content": { "not": { "type": "null" } } } },
                { "required": ["tool_calls"], "properties": { "tool_calls": { "type": "array", "minItems": 1 } } }
            ]
        },
        "OpenAIToolMessage": {
            "type": "object", "required": ["role", "content", "tool_call_id"],
            "description": "A tool's result: `tool_call_id` names a call of an earlier assistant message.",
            "properties": {
                "role": { "const": "tool" },
                "content": { "$ref": "#/components/schemas/OpenAIContent" },
                "tool_call_id": { "type": "string" }
            }
        },
        "TextPart": text_part,
        "ResponseFormat": { "oneOf": [
            { "type": "object", "required": ["type"], "properties": { "type": { "const": "text" } } },
            { "type": "object", "required": ["type"], "properties": { "type": { "const": "json_object" } } },
            { "type": "object", "required": ["type", "json_schema"], "properties": {
                "type": { "const": "json_schema" },
                "json_schema": { "type": "object", "required": ["schema"], "properties": { "schema": { "type": "object" } } }
            } }
        ] },
        "ChatCompletionRequest": {
            "type": "object", "required": ["model", "messages"], "additionalProperties": false,
            "description": "OpenAI's Chat Completions. Fields not listed here pass through to OpenAI-compatible upstreams of the registry; the upstreams of the default registry refuse them. A field the upstream cannot honour (logit_bias on Ollama, n > 1, parallel_tool_calls: false, ...) is a 400 naming it, and so is what the upstream serving the model cannot do: Ollama cannot force a tool call (tool_choice 'required' or a named function) or hold arguments to a strict schema. A named tool_choice names one of the tools.",
            "properties": {
                "model": { "type": "string", "minLength": 1 },
                "messages": { "type": "array", "minItems": 1, "items": { "$ref": "#/components/schemas/OpenAIMessage" } },
                "max_tokens": { "type": nullable("integer"), "minimum": 1, "maximum": MAX_TOKENS },
                "max_completion_tokens": { "type": nullable("integer"), "minimum": 1, "maximum": MAX_TOKENS },
                "temperature": { "type": nullable("number"), "minimum": 0, "maximum": 2 },
                "top_p": { "type": nullable("number"), "minimum": 0, "maximum": 1 },
                "n": { "type": nullable("integer"), "minimum": 1, "maximum": 1 },
                "stream": { "type": nullable("boolean") },
                "stream_options": { "type": nullable("object"), "properties": { "include_usage": { "type": nullable("boolean") } } },
                "stop": { "anyOf": [
                    { "type": "string" },
                    { "type": "array", "maxItems": 4, "items": { "type": "string" } },
                    { "type": "null" }
                ] },
                "seed": { "type": nullable("integer"), "minimum": i64::MIN, "maximum": i64::MAX },
                "presence_penalty": { "type": nullable("number"), "minimum": -2, "maximum": 2 },
                "frequency_penalty": { "type": nullable("number"), "minimum": -2, "maximum": 2 },
                "response_format": { "anyOf": [{ "type": "null" }, { "$ref": "#/components/schemas/ResponseFormat" }] },
                "user": { "type": nullable("string") },
                "logprobs": { "enum": [false, null] },
                "tools": { "anyOf": [
                    { "type": "null" },
                    { "type": "array", "minItems": 1, "maxItems": 128, "items": { "$ref": "#/components/schemas/OpenAITool" } }
                ] },
                "tool_choice": { "anyOf": [
                    { "type": "null" },
                    { "enum": ["none", "auto", "required"] },
                    { "type": "object", "required": ["type", "function"], "properties": {
                        "type": { "const": "function" },
                        "function": { "type": "object", "required": ["name"], "properties": { "name": function_name } }
                    } }
                ] },
                "parallel_tool_calls": { "enum": [true, null] }
            },
            "if": { "required": ["tool_choice"], "properties": { "tool_choice": { "anyOf": [{ "const": "required" }, { "type": "object" }] } } },
            "then": { "required": ["tools"], "properties": { "tools": { "type": "array" } } }
        },
        "ChatCompletion": {
            "type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
            "properties": {
                "id": { "type": "string", "pattern": "^chatcmpl-" },
                "object": { "const": "chat.completion" },
                "created": { "type": "integer" },
                "model": { "type": "string" },
                "choices": { "type": "array", "items": {
                    "type": "object", "required": ["index", "message", "finish_reason"],
                    "properties": {
                        "index": { "type": "integer" },
                        "message": { "type": "object", "required": ["role", "content"], "properties": {
                            "role": { "const": "assistant" },
                            "content": { "type": nullable("string") },
                            "tool_calls": { "type": "array", "items": { "$ref": "#/components/schemas/OpenAIToolCall" } } } },
                        "finish_reason": { "enum": ["stop", "length", "content_filter", "tool_calls"] }
                    }
                } },
                "usage": usage
            }
        },
        "ModelList": {
            "type": "object", "required": ["object", "data"],
            "properties": {
                "object": { "const": "list" },
                "data": { "type": "array", "items": { "$ref": "#/components/schemas/Model" } }
            }
        },
        "Model": {
            "type": "object", "required": ["id", "object", "created", "owned_by"],
            "properties": {
                "id": { "type": "string" }, "object": { "const": "model" },
                "created": { "type": "integer" }, "owned_by": { "type": "string" }
            }
        },
        "OpenAIError": {
            "type": "object", "required": ["error"],
            "properties": { "error": {
                "type": "object", "required": ["message", "type", "param", "code"],
                "properties": {
                    "message": { "type": "string" }, "type": { "type": "string" },
                    "param": { "type": nullable("string") }, "code": { "type": nullable("string") }
                }
            } }
        },
        "MessagesRequest": {
            "type": "object", "required": ["model", "max_tokens", "messages"], "additionalProperties": false,
            "description": "Anthropic's Messages. A field the upstreams cannot honour (thinking, images, server tools, disable_parallel_tool_use, ...) is a 400 naming it, and so is a forced tool call (tool_choice 'any' or 'tool') where the upstream serving the model cannot force one (Ollama). A tool_result answers a tool_use of an earlier assistant turn; a named tool_choice names one of the tools.",
            "properties": {
                "model": { "type": "string", "minLength": 1 },
                "max_tokens": { "type": "integer", "minimum": 1, "maximum": MAX_TOKENS },
                "system": { "anyOf": [
                    { "type": "string" },
                    { "type": "array", "items": { "$ref": "#/components/schemas/TextPart" } }
                ] },
                "messages": { "type": "array", "minItems": 1, "items": { "anyOf": [
                    { "type": "object", "required": ["role", "content"], "properties": {
                        "role": { "const": "user" },
                        "content": { "anyOf": [
                            { "type": "string" },
                            { "type": "array", "items": { "anyOf": [
                                { "$ref": "#/components/schemas/TextPart" },
                                { "$ref": "#/components/schemas/ToolResultBlock" }
                            ] } }
                        ] }
                    } },
                    { "type": "object", "required": ["role", "content"], "properties": {
                        "role": { "const": "assistant" },
                        "content": { "anyOf": [
                            { "type": "string" },
                            { "type": "array", "items": { "anyOf": [
                                { "$ref": "#/components/schemas/TextPart" },
                                { "$ref": "#/components/schemas/ToolUseBlock" }
                            ] } }
                        ] }
                    } }
                ] } },
                "temperature": { "type": nullable("number"), "minimum": 0, "maximum": 1 },
                "top_p": { "type": nullable("number"), "minimum": 0, "maximum": 1 },
                "top_k": { "type": nullable("integer"), "minimum": 0, "maximum": MAX_TOKENS },
                "stop_sequences": { "type": nullable("array"), "items": { "type": "string" } },
                "stream": { "type": nullable("boolean") },
                "metadata": { "type": nullable("object") },
                "tools": { "anyOf": [
                    { "type": "null" },
                    { "type": "array", "maxItems": 128, "items": { "$ref": "#/components/schemas/AnthropicTool" } }
                ] },
                "tool_choice": { "anyOf": [
                    { "type": "null" },
                    { "type": "object", "required": ["type"], "properties": {
                        "type": { "enum": ["auto", "any", "none"] },
                        "disable_parallel_tool_use": { "enum": [false, null] }
                    } },
                    { "type": "object", "required": ["type", "name"], "properties": {
                        "type": { "const": "tool" },
                        "name": function_name,
                        "disable_parallel_tool_use": { "enum": [false, null] }
                    } }
                ] }
            },
            "if": { "required": ["tool_choice"], "properties": { "tool_choice": {
                "type": "object", "required": ["type"], "properties": { "type": { "enum": ["any", "tool"] } } } } },
            "then": { "required": ["tools"], "properties": { "tools": { "type": "array", "minItems": 1 } } }
        },
        "AnthropicAnswer": {
            "type": "object", "required": ["id", "type", "role", "model", "content", "stop_reason", "usage"],
            "properties": {
                "id": { "type": "string", "pattern": "^msg_" },
                "type": { "const": "message" },
                "role": { "const": "assistant" },
                "model": { "type": "string" },
                "content": { "type": "array", "items": { "anyOf": [
                    { "$ref": "#/components/schemas/TextPart" },
                    { "$ref": "#/components/schemas/ToolUseBlock" }
                ] } },
                "stop_reason": { "enum": ["end_turn", "max_tokens", "refusal", "tool_use"] },
                "usage": { "type": "object", "required": ["input_tokens", "output_tokens"], "properties": {
                    "input_tokens": { "type": "integer" }, "output_tokens": { "type": "integer" } } }
            }
        },
        "AnthropicError": {
            "type": "object", "required": ["type", "error"],
            "properties": {
                "type": { "const": "error" },
                "error": { "type": "object", "required": ["type", "message"], "properties": {
                    "type": { "type": "string" }, "message": { "type": "string" } } }
            }
        }
    });
    if let (Value::Object(all), Value::Object(tools)) = (&mut schemas, tool_schemas(&function_name))
    {
        all.extend(tools);
    }
    schemas
}

fn document() -> Value {
    let health = json!({ "get": { "summary": "Liveness", "responses": {
        "200": { "description": "{\"status\":\"ok\"}", "content": { "application/json": { "schema": {
            "type": "object", "required": ["status"], "properties": { "status": { "const": "ok" } } } } } } } } });
    let ready = json!({ "get": { "summary": "Readiness: the limiter can decide through its store", "responses": {
        "200": { "description": "Ready", "content": { "application/json": { "schema": { "type": "object" } } } },
        "503": { "description": "Not ready; the body names what is down", "content": { "application/json": { "schema": { "type": "object" } } } } } } });
    let metrics = json!({ "get": { "summary": "Prometheus metrics", "responses": {
        "200": { "description": "Text format 0.0.4", "content": { "text/plain": { "schema": { "type": "string" } } } } } } });
    let sdk_keys = json!([{ "Bearer": [] }, { "ApiKey": [] }]);
    let original = chat_operation(
        "Chat completion (the original door)",
        json!([{ "ApiKey": [] }]),
        "ChatRequest",
        response(
            "The completion. Carries X-Cache and the rate-limit headers.",
            "ChatResponse",
        ),
        "Error",
        ("422", "ValidationError"),
    );
    let completions = chat_operation(
        "OpenAI Chat Completions",
        sdk_keys.clone(),
        "ChatCompletionRequest",
        answer_or_stream("ChatCompletion"),
        "OpenAIError",
        ("400", "OpenAIError"),
    );
    let messages = chat_operation(
        "Anthropic Messages",
        sdk_keys.clone(),
        "MessagesRequest",
        answer_or_stream("AnthropicAnswer"),
        "AnthropicError",
        ("400", "AnthropicError"),
    );
    let model_errors = json!({
        "401": response("Invalid or missing API key", "OpenAIError"),
        "404": response("No such model", "OpenAIError"),
    });
    let mut list_responses = model_errors.clone();
    list_responses["200"] = response("The models clients can pick", "ModelList");
    let mut model_responses = model_errors;
    model_responses["200"] = response("One model", "Model");
    json!({
        "openapi": "3.1.0",
        "info": { "title": "llm-gateway", "version": env!("CARGO_PKG_VERSION") },
        "paths": {
            "/api/v1/chat": { "post": original },
            "/v1/chat": { "post": original },
            "/v1/chat/completions": { "post": completions },
            "/v1/messages": { "post": messages },
            "/v1/models": { "get": { "summary": "The models", "security": sdk_keys, "responses": list_responses } },
            "/v1/models/{id}": { "get": {
                "summary": "One model", "security": sdk_keys,
                "parameters": [{ "name": "id", "in": "path", "required": true, "schema": { "type": "string" } }],
                "responses": model_responses
            } },
            "/api/v1/health": health, "/health": health,
            "/api/v1/ready": ready, "/ready": ready,
            "/api/v1/metrics": metrics, "/metrics": metrics,
        },
        "components": {
            "securitySchemes": {
                "ApiKey": { "type": "apiKey", "in": "header", "name": "X-API-Key" },
                "Bearer": { "type": "http", "scheme": "bearer" }
            },
            "schemas": schemas()
        }
    })
}

/// The document, built once.
pub async fn openapi() -> Json<&'static Value> {
    static DOCUMENT: OnceLock<Value> = OnceLock::new();
    Json(DOCUMENT.get_or_init(document))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether the original door takes `value` (JSON) for `field`.
    fn door_takes(field: &str, value: &str) -> bool {
        let body = format!(r#"{{"messages":[{{"role":"user","content":"x"}}],"{field}":{value}}}"#);
        crate::api::original::schema::parse_chat_request(body.as_bytes(), None).is_ok()
    }

    #[test]
    fn each_lax_string_pattern_matches_exactly_the_strings_the_parser_takes() {
        let cases: [(&str, &str, &[&str]); 3] = [
            (
                "max_tokens",
                MAX_TOKENS_STRING,
                &[
                    "1",
                    "64",
                    " +0064 ",
                    "\t5\n",
                    "4294967295",
                    "04294967295",
                    "4294967296",
                    "0",
                    "000",
                    "",
                    "+",
                    "-1",
                    "6.4e1",
                    "64.0",
                    "1_000",
                    " ",
                    "99999999999",
                    "1 2",
                ],
            ),
            (
                "temperature",
                TEMPERATURE_STRING,
                &[
                    "0", "0.7", ".5", "1.", "2", "2.000", "+1.5", " 1.25 ", "00.5", "2.5", "-0",
                    "1e0", "nan", "inf", ".", "", "1.2.3", "3", "1.999999",
                ],
            ),
            (
                "stream",
                STREAM_STRING,
                &[
                    "yes", "No", "TRUE", "f", " off ", "1", "0", "on", "maybe", "", "2", "yess",
                    "t r",
                ],
            ),
        ];
        for (field, pattern, samples) in cases {
            let regex = regex_automata::meta::Regex::new(pattern).unwrap();
            for sample in samples {
                let json = serde_json::to_string(sample).unwrap();
                assert_eq!(
                    regex.is_match(sample),
                    door_takes(field, &json),
                    "{field} = {json}"
                );
            }
        }
    }

    #[test]
    fn every_door_and_every_status_of_the_original_door_is_described() {
        let doc = document();
        for path in [
            "/api/v1/chat",
            "/v1/chat/completions",
            "/v1/messages",
            "/v1/models",
        ] {
            assert!(doc["paths"][path].is_object(), "{path}");
        }
        let original = &doc["paths"]["/api/v1/chat"]["post"]["responses"];
        for status in [
            "200", "400", "401", "404", "405", "408", "413", "422", "429", "502", "503", "504",
        ] {
            assert!(original[status].is_object(), "{status}");
        }
    }
}

//! Tool (function) calling as the core sees it: the tools a request offers, whether the
//! model may or must call one, the calls an answer makes, and the results sent back.

/// Tools a request may offer (OpenAI's limit; the doors share it).
pub const MAX_TOOLS: usize = 128;

/// A function name every upstream takes and every SDK sends: `^[a-zA-Z0-9_-]{1,64}$`.
pub fn is_function_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    /// The function's name (`^[a-zA-Z0-9_-]{1,64}$`, checked by the doors).
    pub name: String,
    /// What it does, for the model.
    pub description: Option<String>,
    /// A JSON Schema of its arguments (an object); `None` takes none.
    pub parameters: Option<serde_json::Value>,
    /// The arguments must match `parameters` exactly (OpenAI's `strict`).
    pub strict: bool,
}

/// Whether the model may, must, or must not call a tool.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum ToolChoice {
    /// The model decides.
    #[default]
    Auto,
    /// No tool call; answer in text.
    None,
    /// At least one tool call.
    Required,
    /// A call of this tool.
    Function(String),
}

/// One call the model made.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    /// Names the call, so its result can say which call it answers.
    pub id: String,
    /// The function called.
    pub name: String,
    /// Its arguments: a JSON object, as text.
    pub arguments: String,
}

impl ToolCall {
    /// A call named by the gateway, for upstreams that name none: `call_` and 24 hex
    /// digits of a random UUID.
    pub fn named(name: String, arguments: String) -> ToolCall {
        let id = uuid::Uuid::new_v4().simple().to_string();
        ToolCall {
            id: format!("call_{}", &id[..24]),
            name,
            arguments,
        }
    }

    /// The arguments as a JSON value: the object they hold, or (for text that is not a
    /// JSON object, which the doors refuse in requests) an empty object.
    pub fn arguments_value(&self) -> serde_json::Value {
        match serde_json::from_str::<serde_json::Value>(&self.arguments) {
            Ok(value @ serde_json::Value::Object(_)) => value,
            _ => serde_json::Value::Object(Default::default()),
        }
    }
}

/// What a `tool` turn answers: the call, and the name of the function called (Gemini and
/// Ollama name results by function; the doors find it from the call's id).
#[derive(Debug, Clone, PartialEq)]
pub struct ToolResult {
    /// The id of the call this answers.
    pub call_id: String,
    /// The function that was called.
    pub name: String,
    /// The tool failed; the content says how.
    pub is_error: bool,
}

/// A part of a request an upstream cannot honour; each door names its own field for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unsupported {
    /// A `tool_choice` that forces a call (`required`, a named function).
    ForcedToolChoice,
    /// Tools whose arguments must match their schema exactly (`strict`).
    StrictTools,
    /// A request field the upstream has no equivalent of, by its OpenAI name
    /// (`temperature` above 1, `seed`, `presence_penalty`, ...).
    Field(&'static str),
    /// A field the gateway does not read, for OpenAI-compatible upstreams only.
    PassedThrough(String),
}

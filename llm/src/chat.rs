//! Chat templates: turning `messages` into a prompt the way the model was trained.
//!
//! The template is the Jinja text in the model's `tokenizer_config.json`
//! (`chat_template`), rendered with `minijinja` and its Python-compatible methods
//! (`.strip()`, `.startswith()`, ...) that Hugging Face templates use.

use std::path::Path;

use serde::Serialize;
use volley_common::{Result, VolleyError};

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A message from `role`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A model's chat template.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

fn special(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Object(o)) => o
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// A template from its Jinja text and the special tokens it may refer to.
    pub fn new(source: impl Into<String>, bos_token: &str, eos_token: &str) -> Self {
        Self {
            source: source.into(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        }
    }

    /// The template of a model folder, or `None` if it has none: `chat_template.jinja`
    /// (where transformers saves it since 4.43), else `tokenizer_config.json`'s
    /// `chat_template`. The special tokens come from `tokenizer_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join("tokenizer_config.json");
        let config: serde_json::Value = if path.exists() {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| VolleyError::plan(format!("cannot read {}: {e}", path.display())))?;
            serde_json::from_str(&text).map_err(|e| {
                VolleyError::plan(format!("{}: not valid JSON: {e}", path.display()))
            })?
        } else {
            serde_json::Value::Null
        };
        let jinja = dir.join("chat_template.jinja");
        let source = if jinja.exists() {
            std::fs::read_to_string(&jinja)
                .map_err(|e| VolleyError::plan(format!("cannot read {}: {e}", jinja.display())))?
        } else {
            // A string, or a list of named templates of which `default` is the one.
            match config.get("chat_template") {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(serde_json::Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .or(list.first())
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                    .map(str::to_string)
                    .ok_or_else(|| {
                        VolleyError::plan(format!(
                            "{}: `chat_template` list has no template",
                            path.display()
                        ))
                    })?,
                _ => return Ok(None),
            }
        };
        Ok(Some(Self::new(
            source,
            &special(config.get("bos_token")),
            &special(config.get("eos_token")),
        )))
    }

    /// The prompt for `messages`; `add_generation_prompt` opens the assistant's turn.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let mut env = minijinja::Environment::new();
        // As transformers compiles chat templates: a newline after a block tag and the
        // spaces before one are not part of the prompt.
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| VolleyError::internal(format!("chat template syntax: {e}")))?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", &self.source)
            .map_err(|e| VolleyError::plan(format!("the chat template does not parse: {e}")))?;
        let template = env
            .get_template("chat")
            .map_err(|e| VolleyError::internal(e.to_string()))?;
        template
            .render(minijinja::context! {
                messages => messages
                    .iter()
                    .map(|m| minijinja::Value::from_pairs([
                        ("role", minijinja::Value::from(m.role.as_str())),
                        ("content", minijinja::Value::from(m.content.as_str())),
                    ]))
                    .collect::<minijinja::Value>(),
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.as_str(),
                eos_token => self.eos_token.as_str(),
            })
            .map_err(|e| VolleyError::plan(format!("rendering the chat template: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of TinyLlama's (Zephyr's) template.
    const ZEPHYR: &str = "{% for message in messages %}{% if message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] + eos_token }}\n{% endif %}{% if loop.last and add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}{% endfor %}";

    /// A system message and a user's, rendered with `template` to open the reply.
    fn system_and_user(template: &str) -> String {
        ChatTemplate::new(template, "<s>", "</s>")
            .render(
                &[
                    Message::new("system", "Be brief."),
                    Message::new("user", "Hi"),
                ],
                true,
            )
            .unwrap()
    }

    #[test]
    fn renders_a_conversation() {
        let out = system_and_user(ZEPHYR);
        assert_eq!(
            out,
            "<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>"
        );
    }

    /// TinyLlama-1.1B-Chat's template as its `tokenizer_config.json` holds it, with a
    /// newline after each block tag.
    const TINYLLAMA: &str = "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}";

    #[test]
    fn block_tags_leave_no_newlines_as_transformers_renders() {
        let out = system_and_user(TINYLLAMA);
        // transformers' `apply_chat_template(..., tokenize=False)` gives exactly this.
        assert_eq!(
            out,
            "<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n"
        );
    }

    #[test]
    fn python_methods_and_raised_errors() {
        let t = ChatTemplate::new(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}{{ bos_token }}{{ messages[0]['content'].strip() }}",
            "<s>",
            "</s>",
        );
        assert_eq!(
            t.render(&[Message::new("user", "  hi  ")], false).unwrap(),
            "<s>hi"
        );
        let err = t
            .render(&[Message::new("system", "x")], false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("first message must be from the user"), "{err}");
        let bad = ChatTemplate::new("{% for %}", "", "");
        assert!(bad
            .render(&[], false)
            .unwrap_err()
            .to_string()
            .contains("does not parse"));
    }
}

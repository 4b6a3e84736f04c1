//! Chat prompts rendered with minijinja from the model's own template
//! (GGUF `tokenizer.chat_template`), or the built-in Gemma template for
//! GGUFs that carry none (like the base Gemma 3 270M).

use minijinja::{Environment, context};
use serde::Serialize;

use crate::error::WorkerError;

/// Gemma's turn format: a system message is folded into the first user
/// turn, `assistant` is spelled `model`.
pub const GEMMA_TEMPLATE: &str = r#"{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set first_user_prefix = "" -%}
{%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
{%- if message['role'] == 'assistant' -%}{%- set role = "model" -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}
{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") + (message['content'] | trim) + '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"#;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    pub fn new(source: Option<String>, bos_token: String, eos_token: String) -> Result<ChatTemplate, WorkerError> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, message))
        });
        env.add_template_owned("chat", source.unwrap_or_else(|| GEMMA_TEMPLATE.to_owned()))?;
        Ok(ChatTemplate { env, bos_token, eos_token })
    }

    pub fn render(&self, messages: &[Message]) -> Result<String, WorkerError> {
        if messages.is_empty() {
            return Err(WorkerError::InvalidRequest("messages must hold at least one message".into()));
        }
        let template = self.env.get_template("chat")?;
        Ok(template.render(context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(role: &str, content: &str) -> Message {
        Message { role: role.into(), content: content.into() }
    }

    #[test]
    fn gemma_template_folds_system_and_renames_assistant() {
        let template = ChatTemplate::new(None, "<bos>".into(), "<eos>".into()).unwrap();
        let text = template
            .render(&[
                message("system", "Be brief."),
                message("user", "Hi "),
                message("assistant", "Hello"),
                message("user", "Bye"),
            ])
            .unwrap();
        assert_eq!(
            text,
            "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n\
             <start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn empty_messages_are_refused() {
        let template = ChatTemplate::new(None, "<bos>".into(), "<eos>".into()).unwrap();
        assert!(matches!(template.render(&[]), Err(WorkerError::InvalidRequest(_))));
    }
}

"""The chat-templated prompt a question becomes: one function, so the rollout worker, the start-up
length check and the SFT sample builder ask the policy in exactly the same tokens.

Imports nothing heavy: the tokenizer is passed in (vLLM's, or one loaded with transformers).
"""

from __future__ import annotations

from typing import Any


def chat_prompt_ids(tokenizer: Any, question_text: str, system_prompt: str, prompt_template: str) -> list[int]:
    """The question in `prompt_template` as the user turn (after `system_prompt`, when set), chat-templated
    with the assistant's turn opened, as token ids."""
    messages = [{"role": "user", "content": prompt_template.format(question=question_text)}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # The template already holds the special tokens; encoding must not add a second BOS.
    return tokenizer.encode(text, add_special_tokens=False)


def question_prompt_ids(tokenizer: Any, question: Any, system_prompt: str, prompt_template: str) -> list[int]:
    """A question's prompt as token ids: a conversational row's own messages (TRL's chat-template
    utility renders them; `system_prompt` goes first where the row has no system turn), else the
    question text in `prompt_template` (`chat_prompt_ids`)."""
    if not question.messages:
        return chat_prompt_ids(tokenizer, question.prompt, system_prompt, prompt_template)
    from trl.data_utils import maybe_apply_chat_template

    messages = [{"role": role, "content": content} for role, content in question.messages]
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    text = maybe_apply_chat_template({"prompt": messages}, tokenizer)["prompt"]
    return tokenizer.encode(text, add_special_tokens=False)


def model_length_limit(model_path: str, wanted: int) -> int:
    """The tokens one sequence may hold: the configured length, capped at what the model's positions
    allow (vLLM refuses more)."""
    from transformers import AutoConfig

    limit = getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", None)
    return min(wanted, limit) if limit else wanted

"""The task helpers' prompts: each task is a system message and a user message template,
sent as chat turns so the model's own chat template applies."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    system: str
    user: str  # str.format template over the helper's arguments


TASKS: dict[str, Task] = {
    "translate": Task(
        "You are a translator. Reply with the translation only, no explanations.",
        "Translate the following text into {target_language}:\n\n{text}"),
    "summarize": Task(
        "You write short, faithful summaries. Reply with the summary only.",
        "Summarize the following text in a few sentences:\n\n{text}"),
    "answer": Task(
        "You are a helpful assistant. Answer briefly and accurately.",
        "{question}"),
    "answer_in_context": Task(
        "You are a helpful assistant. Answer from the given context; if it does not say, "
        "say that you do not know.",
        "Context:\n{context}\n\nQuestion: {question}"),
    "generate_code": Task(
        "You are an expert programmer. Reply with one {language} code block and nothing else.",
        "Write {language} code that does the following: {description}"),
}


def messages(task: str, **args: str) -> list[dict[str, str]]:
    """The chat turns for one task, e.g. messages("translate", text=..., target_language=...)."""
    t = TASKS[task]
    return [{"role": "system", "content": t.system.format(**args)},
            {"role": "user", "content": t.user.format(**args)}]


# One function per client helper, so LLMClient and AsyncLLMClient build the same turns.
def translate(text: str, target_language: str = "English") -> list[dict[str, str]]:
    return messages("translate", text=text, target_language=target_language)


def summarize(text: str) -> list[dict[str, str]]:
    return messages("summarize", text=text)


def answer(question: str, context: str | None = None) -> list[dict[str, str]]:
    if context:
        return messages("answer_in_context", question=question, context=context)
    return messages("answer", question=question)


def generate_code(description: str, language: str = "Python") -> list[dict[str, str]]:
    return messages("generate_code", description=description, language=language)

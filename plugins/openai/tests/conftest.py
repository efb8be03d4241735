import pytest

from pocketbatch import LLMRequest
from pocketbatch_openai import OpenAIProvider


@pytest.fixture
def openai_provider(openai_emulator) -> OpenAIProvider:
    """A provider whose clients validate every response strictly, talking to the emulator."""
    return OpenAIProvider(client_options={"_strict_response_validation": True})


@pytest.fixture
def make_request():
    """make_request("prompt", model=..., **LLMRequest fields) -> LLMRequest with one user message."""

    def make(prompt: str = "hello there", model: str = "gpt-4o-mini", **fields) -> LLMRequest:
        return LLMRequest(messages=[{"role": "user", "content": prompt}], model=model, **fields)

    return make

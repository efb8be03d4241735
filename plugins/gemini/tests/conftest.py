import pytest

from pocketbatch import LLMRequest
from pocketbatch_gemini import GeminiProvider


@pytest.fixture
def provider(gemini_emulator) -> GeminiProvider:
    """A provider talking to the emulator (its clients are built inside each test's event loop)."""
    return GeminiProvider()


@pytest.fixture
def make_request():
    """make_request("prompt", model=..., **LLMRequest fields) -> LLMRequest with one user message."""

    def make(prompt: str = "hello there", model: str = "gemini-2.5-flash", **fields) -> LLMRequest:
        return LLMRequest(messages=[{"role": "user", "content": prompt}], model=model, **fields)

    return make

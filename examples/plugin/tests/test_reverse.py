import pytest
from pocketbatch_reverse import ReverseProvider

from pocketbatch import RequestError, call_llm_async


@pytest.fixture
def reverse(register_provider):
    return register_provider(ReverseProvider(), aliases=("reverse-words",))


async def test_reverses_words(reverse):
    response = await call_llm_async("one two three", model="reverse/reverse-words")
    assert response == "three two one"
    assert response.provider == "reverse"
    assert response.usage.input_tokens == 3


async def test_alias_and_chars(reverse):
    assert await call_llm_async("abc", model="reverse-words") == "abc"
    assert await call_llm_async("abc", model="reverse/reverse-chars") == "cba"


async def test_empty_prompt_is_a_final_error(reverse):
    with pytest.raises(RequestError, match="empty"):
        await call_llm_async("  ", model="reverse/reverse-words")

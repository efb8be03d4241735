"""A complete pocketbatch provider plugin in one module: the one docs/plugins.md builds step by step."""

import asyncio

from pocketbatch import LLMRequest, LLMResponse, Provider, RequestError, Usage, hookimpl


@hookimpl
def register_providers(register):
    register(ReverseProvider(), aliases=("reverse-words",))


class ReverseProvider(Provider):
    name = "reverse"  # the prefix in "reverse/reverse-words"
    key_env_var = None  # a real API names its key variable here, e.g. "REVERSE_API_KEY"
    default_model = "reverse-words"
    models = ("reverse-words", "reverse-chars")
    rpm = 600  # where the engine's rate limit starts; it learns the real one from 429s
    prices = {"reverse-words": (0.10, 0.40)}  # USD per million input/output tokens

    async def call_llm_async(self, request: LLMRequest) -> LLMResponse:
        prompt = request.messages[-1]["content"]
        if not prompt.strip():
            # Errors are pocketbatch's, so the engine knows what to retry: this one is final.
            raise RequestError("reverse: the prompt is empty", status=400)
        await asyncio.sleep(0.01)  # a real plugin awaits its SDK client here
        if request.model == "reverse-chars":
            text = prompt[::-1]
        else:
            text = " ".join(reversed(prompt.split()))
        usage = Usage(input_tokens=len(prompt.split()), output_tokens=len(text.split()))
        return LLMResponse(text, usage=usage, model=request.model, provider=self.name)

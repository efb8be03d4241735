"""A port of PocketFlow's cookbook `pocketflow-parallel-batch`: translate one document into eight
languages with an AsyncParallelBatchNode, and write each translation to a file.

The cookbook calls Anthropic's SDK directly inside the node; here the node calls `call_llm_async`, so
its eight calls form one round that pocketbatch rate-limits and retries (or sends to the batch API).
The translations go to a temporary folder. Runs on the offline provider with no key (its "translations"
echo the prompt); set OPENAI_API_KEY (or ANTHROPIC_API_KEY) to use a real one.
"""

import asyncio
import tempfile
import time
from pathlib import Path

from pocketbatch import AsyncFlow, AsyncParallelBatchNode, call_llm_async

DOCUMENT = """# pocketbatch

pocketbatch runs [PocketFlow](https://github.com/The-Pocket/PocketFlow) pipelines. Its parallel nodes
send their LLM calls either one by one, rate limited, or as one batch job at half the price.

```python
flow = AsyncFlow(start=ParallelSummaries())
```
"""

LANGUAGES = ["Chinese", "Spanish", "Japanese", "German", "Russian", "Portuguese", "French", "Korean"]


class TranslateTextNodeParallel(AsyncParallelBatchNode):
    async def prep_async(self, shared):
        return [(shared["text"], language) for language in shared["languages"]]

    async def exec_async(self, data):
        text, language = data
        prompt = f"""Please translate the following markdown file into {language}.
Keep the original markdown format, links and code blocks.
Directly return the translated text, without any other text or comments.

Original:
{text}

Translated:"""
        translation = await call_llm_async(prompt)
        print(f"Translated {language} text")
        return {"language": language, "translation": translation}

    async def post_async(self, shared, prep_res, exec_res_list):
        folder = Path(shared["output_dir"])
        for result in exec_res_list:
            path = folder / f"README_{result['language'].upper()}.md"
            path.write_text(result["translation"], encoding="utf-8")
            print(f"Saved {path.name}")
        return "default"


def create_parallel_translation_flow() -> AsyncFlow:
    return AsyncFlow(start=TranslateTextNodeParallel(max_retries=3))


async def main() -> None:
    with tempfile.TemporaryDirectory() as output_dir:
        shared = {"text": DOCUMENT, "languages": LANGUAGES, "output_dir": output_dir}
        start = time.perf_counter()
        await create_parallel_translation_flow().run_async(shared)
        print(f"Translated into {len(LANGUAGES)} languages in {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    asyncio.run(main())

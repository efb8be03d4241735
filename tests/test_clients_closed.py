"""SDK clients are closed when the event loop they belong to ends, not dropped with open connections."""

import asyncio
import threading

from pocketbatch.llm import _end_sync_loop
from pocketbatch.providers import close_with_loop


class Client:
    def __init__(self) -> None:
        self.closed = 0

    async def close(self) -> None:
        await asyncio.sleep(0)  # closing awaits, as an SDK client's does: the loop must still run
        self.closed += 1


def test_clients_close_when_asyncio_run_ends():
    clients = [Client(), Client()]

    async def use() -> None:
        before = [c.closed for c in clients]
        for client in clients:
            close_with_loop(client)
        await asyncio.sleep(0)
        assert [c.closed for c in clients] == before  # open while the loop runs

    asyncio.run(use())
    assert [c.closed for c in clients] == [1, 1]
    asyncio.run(use())  # a new loop: registered again, closed again, each once per loop
    assert [c.closed for c in clients] == [2, 2]


def test_the_sync_loop_closes_its_clients_at_exit():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    client = Client()

    async def use() -> None:
        close_with_loop(client)

    asyncio.run_coroutine_threadsafe(use(), loop).result()
    assert client.closed == 0
    _end_sync_loop(loop)  # what atexit does for call_llm's loop
    assert client.closed == 1
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()

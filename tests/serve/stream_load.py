"""`python -m tests.serve.stream_load URL API_KEY`: load for a server under test, from its own process (so that
the load's client work does not slow the test's measurements): 64 streamed completions, then, once all of
them are flowing, two 10 MB prompts (a completion, and an unauthenticated /tokenize). Prints "streaming" when
the streams flow and "done PATH STATUS" as each 10 MB request is answered; runs until killed."""

from __future__ import annotations

import asyncio
import sys

import httpx

NUM_STREAMS = 64
TEN_MB = 10 * 1024 * 1024


def ten_mb_prompt() -> str:
    sentence = "Once upon a time, there was a little girl named Lily. She loved to play outside in the sunshine. "
    return sentence * (TEN_MB // len(sentence))


async def main(url: str, api_key: str) -> None:
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {api_key}"}, timeout=120,
                                 limits=httpx.Limits(max_connections=None)) as client:
        flowing = asyncio.Semaphore(0)
        streams = [asyncio.create_task(_stream(client, flowing)) for _ in range(NUM_STREAMS)]
        for _ in range(NUM_STREAMS):
            await flowing.acquire()
        print("streaming", flush=True)
        await asyncio.gather(
            _big(client, "/v1/completions", {"prompt": ten_mb_prompt(), "max_tokens": 4}, {}),
            _big(client, "/tokenize", {"prompt": ten_mb_prompt()}, {"Authorization": ""}),
            *streams,
        )


async def _stream(client: httpx.AsyncClient, flowing: asyncio.Semaphore) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        chunks = response.aiter_raw()
        await anext(chunks)
        flowing.release()
        async for _ in chunks:
            pass


async def _big(client: httpx.AsyncClient, path: str, body: dict[str, object], headers: dict[str, str]) -> None:
    response = await client.post(path, json=body, headers=headers)
    print("done", path, response.status_code, flush=True)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:3]))

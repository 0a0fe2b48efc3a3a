"""Client-side CPU per request of five HTTP clients, side by side in one run: the OpenAI
client's `chat.completions.create` or its raw `client.post(..., cast_to=httpx2.Response)`,
each over the HTTPX transport and over aiohttp (`DefaultAioHttpClient`), and
`distillprompt.llm.Endpoint` (the optimizer's own, a JSON POST on aiohttp). A scoring-sized
request goes to a scripted endpoint (its own process, no latency) N times with C in
flight; this process's CPU time over N is reported, and the import time of each client.

    python benchmarks/http_client.py                  # 2,000 requests, 64 in flight, each way twice
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time

import httpx2
import openai

from common import ROOT, start_endpoint

MESSAGES = [{"role": "user", "content": "Classify.\n\nPossible answers: negative, positive.\nInput: a fine movie\n\nAnswer:"}]


async def measure(base_url: str, transport: str, call: str, requests: int, in_flight: int) -> tuple[float, float]:
    if call == "endpoint":
        return await measure_endpoint(base_url, requests, in_flight)
    http_client = openai.DefaultAioHttpClient(verify=False) if transport == "aiohttp" else openai.DefaultAsyncHttpxClient(verify=False)
    client = openai.AsyncOpenAI(base_url=base_url, api_key="not-needed", max_retries=0, http_client=http_client)
    arguments = {"model": "test-model", "messages": MESSAGES, "temperature": 0.0, "max_tokens": 16, "stop": ["</ans>"]}
    slots = asyncio.Semaphore(in_flight)

    async def one() -> str:
        async with slots:
            if call == "create":
                reply = await client.chat.completions.create(**arguments)
                return reply.choices[0].message.content or ""
            raw = await client.post("/chat/completions", body=arguments, cast_to=httpx2.Response)
            return raw.json()["choices"][0]["message"]["content"]

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one() for _ in range(requests)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await client.close()
    return 1000 * cpu / requests, requests / wall


async def measure_endpoint(base_url: str, requests: int, in_flight: int) -> tuple[float, float]:
    from distillprompt.llm import Endpoint

    endpoint = Endpoint(base_url, None)
    arguments = {"model": "test-model", "messages": MESSAGES, "temperature": 0.0, "max_tokens": 16, "stop": ["</ans>"]}
    slots = asyncio.Semaphore(in_flight)

    async def one() -> str:
        async with slots:
            return (await endpoint.post_chat(arguments)).texts[0]

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one() for _ in range(requests)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await endpoint.close()
    return 1000 * cpu / requests, requests / wall


def import_seconds(module: str) -> float:
    """Wall time of importing a module in a fresh interpreter, less the interpreter's start."""
    def timed(code: str) -> float:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
        return time.perf_counter() - started

    return min(timed(f"import {module}") for _ in range(3)) - min(timed("pass") for _ in range(3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    server, base_url = start_endpoint(0.0, 0, [])
    try:
        print(f"{args.requests} requests, {args.in_flight} in flight, endpoint latency 0")
        print("| transport | call | client CPU ms / request | requests / s |")
        print("|---|---|---:|---:|")
        ways = [("httpx", "create"), ("httpx", "post"), ("aiohttp", "create"), ("aiohttp", "post"), ("aiohttp", "endpoint")]
        for _ in range(args.repeat):
            for transport, call in ways:
                cpu, rate = asyncio.run(measure(base_url, transport, call, args.requests, args.in_flight))
                print(f"| {transport} | {call} | {cpu:.2f} | {rate:.0f} |")
        print()
        print("import time in a fresh interpreter (best of 3): "
              f"openai {import_seconds('openai'):.2f} s, aiohttp {import_seconds('aiohttp'):.2f} s")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()

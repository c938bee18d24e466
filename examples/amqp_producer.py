"""Submit one completion straight to RabbitMQ and print the streamed answer.

    python examples/amqp_producer.py --url amqp://acme:secret@127.0.0.1:5672/ "Hello"

The RabbitMQ user in the URL is the tenant. See README.md, "AMQP producers".
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from services import messages as m
from services.client import AmqpClient
from services.settings import DEFAULT_MODEL_NAME


async def run(url: str, model: str, prompt: str, max_tokens: int) -> int:
    async with AmqpClient(url) as client:
        request = client.completion(model, prompt, max_tokens=max_tokens)
        async for reply in client.submit(request):
            if isinstance(reply, m.TokenChunk):
                print(reply.text, end="", flush=True)
            else:
                print()
                if reply.error:
                    print(f"error {reply.error.status}: {reply.error.message}", file=sys.stderr)
                    return 1
                print(f"[{reply.finish_reason}; {reply.prompt_tokens} prompt + "
                      f"{reply.completion_tokens} completion tokens]", file=sys.stderr)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt")
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--model", default=DEFAULT_MODEL_NAME)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    return asyncio.run(run(args.url, args.model, args.prompt, args.max_tokens))


if __name__ == "__main__":
    sys.exit(main())

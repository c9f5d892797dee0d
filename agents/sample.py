"""Code samples: the offline coder's templates and running a sample.

:func:`run` executes a Python sample in a child interpreter (isolated mode, a temporary
working directory, a timeout), as the coder does before handing it over and the
reviewer does again on the draft's code block. It is a check, not a sandbox: a
sample written by a model runs with this process's permissions, so run the coder
and the reviewer where that is acceptable.

Example:
    >>> run("print(6 * 7)").stdout
    '42\\n'
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from dataclasses import dataclass

TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class Ran:
    """What running a sample gave."""

    exit_code: int
    stdout: str
    stderr: str


def run(code: str, *, timeout: float = TIMEOUT_S) -> Ran:
    """Run ``code`` with ``python -I`` in a fresh temporary directory; a timeout is
    exit code -9 with the reason in ``stderr``."""
    import subprocess

    with tempfile.TemporaryDirectory(prefix="mesh-sample-") as cwd:
        try:
            done = subprocess.run([sys.executable, "-I", "-c", code], cwd=cwd,
                                  capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return Ran(-9, "", f"the sample ran longer than {timeout:.0f} s")
    return Ran(done.returncode, done.stdout, done.stderr[-2000:])


async def run_async(code: str, *, timeout: float = TIMEOUT_S) -> Ran:
    """:func:`run` in a thread, so an agent's event loop keeps serving."""
    return await asyncio.to_thread(run, code, timeout=timeout)


MCP_SERVER = '''"""A minimal MCP-style tool server: JSON-RPC 2.0 messages, one per line.

Run it as a stdio server (python mcp_server.py --stdio) or, as here, feed it a few
requests in-process and print what it answers.
"""
import json
import sys

TOOLS = {
    "word_count": {
        "description": "Count the words of a text.",
        "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}},
                        "required": ["text"]},
        "run": lambda args: str(len(args["text"].split())),
    },
    "add": {
        "description": "Add two integers.",
        "inputSchema": {"type": "object",
                        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                        "required": ["a", "b"]},
        "run": lambda args: str(int(args["a"]) + int(args["b"])),
    },
}


def handle(message):
    """One JSON-RPC request -> its response (None for a notification)."""
    method, params = message.get("method"), message.get("params", {})
    if "id" not in message:
        return None  # notifications (e.g. notifications/initialized) get no answer
    if method == "initialize":
        result = {"protocolVersion": "2025-06-18",
                  "capabilities": {"tools": {"listChanged": False}},
                  "serverInfo": {"name": "demo-server", "version": "0.1.0"}}
    elif method == "tools/list":
        result = {"tools": [{"name": name, "description": tool["description"],
                             "inputSchema": tool["inputSchema"]}
                            for name, tool in TOOLS.items()]}
    elif method == "tools/call":
        tool = TOOLS.get(params.get("name"))
        if tool is None:
            return {"jsonrpc": "2.0", "id": message["id"],
                    "error": {"code": -32602, "message": f"unknown tool {params.get('name')}"}}
        try:
            text, failed = tool["run"](params.get("arguments", {})), False
        except (KeyError, ValueError) as exc:
            text, failed = f"bad arguments: {exc}", True
        result = {"content": [{"type": "text", "text": text}], "isError": failed}
    else:
        return {"jsonrpc": "2.0", "id": message["id"],
                "error": {"code": -32601, "message": f"method not found: {method}"}}
    return {"jsonrpc": "2.0", "id": message["id"], "result": result}


def serve(lines, write):
    for line in lines:
        if line.strip():
            response = handle(json.loads(line))
            if response is not None:
                write(json.dumps(response))


if __name__ == "__main__":
    if "--stdio" in sys.argv:
        serve(sys.stdin, lambda text: print(text, flush=True))
    else:
        session = [
            {"jsonrpc": "2.0", "id": 1, "method": "initialize",
             "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                        "clientInfo": {"name": "demo-client", "version": "0.1.0"}}},
            {"jsonrpc": "2.0", "method": "notifications/initialized"},
            {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
            {"jsonrpc": "2.0", "id": 3, "method": "tools/call",
             "params": {"name": "add", "arguments": {"a": 2, "b": 3}}},
            {"jsonrpc": "2.0", "id": 4, "method": "tools/call",
             "params": {"name": "translate", "arguments": {}}},
        ]
        answers = []
        serve([json.dumps(m) for m in session], answers.append)
        for text in answers:
            reply = json.loads(text)
            if "error" in reply:
                print(f"id {reply['id']}: error {reply['error']['code']}")
            elif "tools" in reply["result"]:
                print(f"id {reply['id']}: tools", [t["name"] for t in reply["result"]["tools"]])
            elif "content" in reply["result"]:
                print(f"id {reply['id']}: result", reply["result"]["content"][0]["text"])
            else:
                print(f"id {reply['id']}: server", reply["result"]["serverInfo"]["name"])
'''

PARTITIONED_LOG = '''"""A partitioned, keyed log with consumer offsets: Kafka's model, small."""
import zlib

PARTITIONS = 3
log = [[] for _ in range(PARTITIONS)]


def produce(key, value):
    partition = zlib.crc32(key.encode()) % PARTITIONS  # same key, same partition
    log[partition].append((key, value))
    return partition, len(log[partition]) - 1


def consume(offsets):
    """Everything after the committed offsets, partition by partition."""
    for partition, records in enumerate(log):
        for offset in range(offsets[partition], len(records)):
            yield partition, offset, records[offset]
            offsets[partition] = offset + 1


for n in range(6):
    produce(f"order-{n % 2}", f"event {n}")
offsets = [0] * PARTITIONS
seen = list(consume(offsets))
print("consumed", len(seen), "records; per key in order:",
      all(a[1] < b[1] for a, b in zip(seen, seen[1:]) if a[0] == b[0]))
print("committed offsets", offsets)
'''

KEY_TERMS = '''"""The key terms of {subject!r}, counted over the analyst's key points."""
import re
from collections import Counter

POINTS = {points!r}
STOP = set("the a an and or of to in is are for with that this it as on by be can".split())

words = Counter(w for p in POINTS for w in re.findall(r"[a-z][a-z0-9-]+", p.lower())
                if w not in STOP)
for word, count in words.most_common(5):
    print(f"{{word}}: {{count}}")
print("points:", len(POINTS))
'''


def template_for(subject: str, points: list[str]) -> tuple[str, str, str]:
    """(filename, code, explanation) of the offline coder's sample for ``subject``."""
    lowered = subject.lower()
    if "mcp" in lowered or "model context protocol" in lowered:
        return ("mcp_server.py", MCP_SERVER,
                "A minimal MCP-style server with two tools. It answers initialize, "
                "tools/list and tools/call over JSON-RPC 2.0, ignores the initialized "
                "notification and reports an unknown tool as error -32602; run with "
                "--stdio it speaks the stdio transport, one message per line.")
    if any(word in lowered for word in ("kafka", "stream", "partition", "topic", "log")):
        return ("partitioned_log.py", PARTITIONED_LOG,
                "A keyed, partitioned log with committed offsets: records with the same "
                "key land in the same partition and are read in order.")
    return ("key_terms.py", KEY_TERMS.format(subject=subject, points=points[:8]),
            "Counts the most frequent terms of the key points, a quick check of what "
            "the document is about.")

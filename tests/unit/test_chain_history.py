"""ChainHistory.of(ctx) (mesh.patterns.chain): how a chain step that takes no third
argument, an agent's handler, reads the history, in memory, no broker."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from mesh import Agent, Context, Topic
from mesh.errors import ConfigError
from mesh.patterns.chain import Chain, ChainHistory
from mesh.testing import InMemoryMesh


class Note(BaseModel):
    note_id: str
    text: str


class Words(BaseModel):
    note_id: str
    words: list[str]


notes = Topic("ch.notes", Note, key="note_id", partitions=2)
words = Topic("ch.words", Words, key="note_id", partitions=2)
counts = Topic("ch.counts", Words, key="note_id", partitions=2)


async def split(note: Note, ctx: Context) -> Words:
    return Words(note_id=note.note_id, words=note.text.split())


async def test_an_agent_step_and_a_third_argument_step_get_the_same_history() -> None:
    """Pass: the last step, an Agent, reads through ChainHistory.of(ctx) what a function
    step taking a third argument gets in it: step 0's output typed as Words, the seed's
    dict with step_0_output and step_1_output; the chain completes."""
    given: list[ChainHistory] = []
    asked: list[ChainHistory] = []

    async def upper(found: Words, ctx: Context, history: ChainHistory) -> Words:
        given.append(history)
        return Words(note_id=found.note_id, words=[w.upper() for w in found.words])

    async def count(found: Words, ctx: Context) -> Words:
        history = ChainHistory.of(ctx)
        asked.append(history)
        first = history.output("split")
        return Words(note_id=found.note_id, words=[*found.words, str(len(first.words))])

    counter = Agent("count", consumes=words, produces=counts, handler=count)
    chain = Chain("ch.notes", [split, upper, counter], key="note_id")
    async with InMemoryMesh(chain.app) as mesh:
        await mesh.emit(chain.source, Note(note_id="n1", text="a b"))
        await mesh.drain()
        [done] = mesh.payloads(chain.completed)
    assert done.result == {"note_id": "n1", "words": ["A", "B", "2"]}
    assert given[-1].as_dict() == {"note_id": "n1", "text": "a b",
                                   "step_0_output": {"note_id": "n1", "words": ["a", "b"]},
                                   "previous_output": {"note_id": "n1", "words": ["a", "b"]}}
    assert asked[-1].output("split") == Words(note_id="n1", words=["a", "b"])
    assert sorted(asked[-1].as_dict()) == [
        "note_id", "previous_output", "step_0_output", "step_1_output", "text"]


async def test_asking_for_the_history_outside_a_chain_names_the_agent_and_the_fix() -> None:
    """Pass: an agent run on its own (not as a chain step) that asks for the history gets
    a ConfigError naming the agent and saying to call it from a chain step; its input
    goes to the dead-letter topic."""
    async def count(found: Words, ctx: Context) -> Words:
        ChainHistory.of(ctx)
        return found

    counter = Agent("ch.alone", consumes=words, produces=counts, handler=count)
    async with InMemoryMesh(counter) as mesh:
        await mesh.emit(words, Words(note_id="n1", words=["a"]))
        await mesh.drain()
        [letter] = mesh.dead_letters(words)
        assert mesh.payloads(counts) == []
    assert "'ch.alone' is not running as a chain step" in letter.error
    assert "from a step of a Chain" in letter.error


async def test_a_context_kept_past_its_step_no_longer_gives_the_history() -> None:
    """Pass: while the step runs, ChainHistory.of(ctx) works; once the step has returned,
    the same ctx raises ConfigError (the history is the step's, not kept around)."""
    kept: list[Context] = []

    async def keep(found: Words, ctx: Context) -> Words:
        ChainHistory.of(ctx)
        kept.append(ctx)
        return found

    chain = Chain("ch.kept", [split, keep], key="note_id")
    async with InMemoryMesh(chain.app) as mesh:
        await mesh.emit(chain.source, Note(note_id="n1", text="a"))
        await mesh.drain()
        assert len(mesh.payloads(chain.completed)) == 1
    with pytest.raises(ConfigError, match="not running as a chain step"):
        ChainHistory.of(kept[0])

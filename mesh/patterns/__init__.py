"""The orchestration patterns as Kafka-native building blocks.

Each builds agents (see :mod:`mesh.agent`) whose wiring makes the pattern: nothing
orchestrates them from outside, and every piece of state lives in a compacted topic.
"""

"""Which Kafka topics the group reads (`kafka.topics`, `kafka.topic_pattern`), and how they appear as metric labels."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class TopicSelection:
    """Which topics the group reads: the named ones, and every topic whose whole name matches the pattern."""

    topics: tuple[str, ...]
    topic_pattern: str | None = None

    def label(self, topic: str) -> str:
        """The `topic` label of a record's metrics: the pattern, for a topic only the pattern names.

        Debezium's topics are one per table of each workspace, named after the workspace's schema: as labels they
        would be as many series as workspaces, and carry workspace ids, which no label may.
        """
        if self.topic_pattern is None or topic in self.topics:
            return topic
        return self.topic_pattern

    def pattern(self) -> str | None:
        """One regular expression for aiokafka, which takes a list of topics or a pattern but not both."""
        if self.topic_pattern is None:
            return None
        named = "|".join(re.escape(topic) for topic in self.topics)
        # aiokafka matches from the start only; the end anchor makes it the whole name, as Kafka's clients do.
        return f"(?:{self.topic_pattern})\\Z" if not named else f"(?:{named})\\Z|(?:{self.topic_pattern})\\Z"

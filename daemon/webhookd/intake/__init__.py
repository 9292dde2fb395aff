"""From Kafka to events: the consumer, and each record read as an Event, a Skip or a BadEvent.

- `consumer`: group membership, the fetch loop and its backpressure, rebalances, commits; `offsets`: which offsets
  are done and the prefix that may be committed; `topics`: which topics are read; `rejects`: skips and bad events.
- `readers`: the reader `kafka.input_format` chooses; `native`: the contract's own JSON events.
- Debezium's change records of Twenty's database, read as Twenty's own events: `debezium` (one change record's
  envelope, plain, wrapped in `{"schema","payload"}` or flattened by ExtractNewRecordState -> a `Change`, or why it is
  skipped or bad), `column_values` (Debezium's encodings of Postgres values -> the values Twenty's API shows),
  `twenty_layout` (one workspace's objects and fields), `twenty_catalog` (those layouts loaded on demand and kept
  current), `twenty_events` (a `Change` and its workspace's layout -> an `Event` in Twenty's terms).
"""

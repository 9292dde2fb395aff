"""From Kafka records to events: Debezium's change records of Twenty's database, read as Twenty's own events.

- `debezium`: one change record's envelope (plain, wrapped in `{"schema","payload"}`, or flattened by
  ExtractNewRecordState) -> a `Change`, or why it is skipped or bad.
- `column_values`: Debezium's encodings of Postgres values -> the values Twenty's API shows.
- `twenty_layout`: Twenty's object and field metadata for one workspace, as read from its database.
- `twenty_catalog`: those layouts loaded on demand and kept current.
- `twenty_events`: a `Change` and its workspace's layout -> an `Event` in Twenty's terms.
"""

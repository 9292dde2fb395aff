"""Reading Kafka: records decoded (native and Debezium), offsets committed, bad events kept, backpressure."""

"""The suites that need Apache Kafka, Kafka Connect and Debezium (Java and Maven): `make test-kafka` runs them,
`make test` never collects them."""

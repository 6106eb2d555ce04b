"""Native tensor parallelism: messages, the service-side engine and client, rank processes."""

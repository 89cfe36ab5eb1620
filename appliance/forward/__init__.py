"""Store-and-forward: routing rules, the durable job queue, the forwarder service."""

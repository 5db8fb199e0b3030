"""Stage 1: LAION shards in, clean shards and a quarantine with reasons out."""

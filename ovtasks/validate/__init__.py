"""Stage 3: the Great Expectations gate over pseudo-label shards."""

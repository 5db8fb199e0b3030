"""Shared plumbing: settings, the object store, shard I/O, image checks, logging, run history."""

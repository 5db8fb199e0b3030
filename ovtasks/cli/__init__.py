"""The `ovtasks` command: `main` parses the configuration once and dispatches; the sub-commands live by group
(`data`, `models`, `ops`)."""

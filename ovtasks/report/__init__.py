"""Every picture the project draws: instance overlays, the ingest overview, pseudo-label sheets, loss curves,
and the palette and font they share."""

"""Cross-cutting helpers with no model or data knowledge: torch-matching image resizes, the
compilation cache and timer, host-memory policy, command-line error handling."""

"""Drop-in replacements for other Flask SSE libraries' APIs."""

"""Small stand-ins for remote-code DLM modeling files (structure and signatures only)."""

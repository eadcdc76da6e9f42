"""hublabd: the daemon (service = ops, server = Unix socket, http = OpenAI API, notify = systemd)."""

"""Who may call what: API keys, the scope table read from the protos, rate limits."""

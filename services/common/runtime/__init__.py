"""The serving process: its run(), the gRPC host, the wrapper every call runs in, safe retries."""

"""What the API says: descriptors, AIP-193 errors, field behavior, request checks, etags, pages, limits, forwarding."""

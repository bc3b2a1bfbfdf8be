"""The database (one interface over two engines), its migrations, outages, and the shared repositories."""

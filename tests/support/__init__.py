"""What several test modules share, one module per topic; test modules import their
helpers from here, never from one another."""

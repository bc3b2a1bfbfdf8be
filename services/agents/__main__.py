"""`python -m services.agents`: serves AgentsService and ApiKeysService on AGENTS_ADDR."""

from services.agents.server import main

main()

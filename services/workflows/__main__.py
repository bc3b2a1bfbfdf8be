"""`python -m services.workflows`: serves WorkflowsService and EventsService on WORKFLOWS_ADDR."""

from services.workflows.server import main

main()

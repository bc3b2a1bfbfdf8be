"""DevOps Hub's Python client: the generated stubs (devops_hub.v1), the .proto files
they come from (devops_hub/protos), an asyncio client (devops_hub.client) and the
`devops-hub` command (devops_hub.cli)."""
